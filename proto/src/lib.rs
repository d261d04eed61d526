//! `strata-proto`: the wire messages of every Strata plane (`strata.v1` public API, the
//! coordinator <-> worker control service, the data-plane frame header), generated from
//! the `.proto` files under `proto/` with protox so no system `protoc` is needed.
//!
//! Not yet written: the cluster issue builds it. It must never hold logic beyond message
//! definitions and their size limits.
