//! `strata-worker`: the stage runtime of one machine — the QUIC data plane, the control
//! service, and the mDNS advertiser — around a `strata_model` slice.
//!
//! Not yet written: the cluster issue builds it. Model math stays in `strata-model`.
