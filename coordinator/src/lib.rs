//! `strata-coordinator`: discovery, the planner, sessions and scheduling, recovery, and the
//! public gRPC and HTTP APIs.
//!
//! Not yet written: the cluster issue builds it. Model math never enters this crate.
