//! `strata-net`: what every Strata node speaks, so that workers and the coordinator are
//! peers that share it rather than one depending on the other.
//!
//! - [`identity`]: the join token, the cluster CA, certificates, mutual-TLS configs (rustls
//!   for QUIC, tonic's for the gRPC control plane);
//! - [`api_tls`]: TLS beside plaintext on the coordinator's API port, for joins, and the
//!   worker's connector that pins the coordinator to its token's CA;
//! - [`certificate`]: a node's certified key, renewed while it runs, and the TLS
//!   configurations that present it;
//! - [`frame`]: the data-plane frame (a prost header and raw tensor bytes), pure encode,
//!   decode and validation;
//! - [`slice_stream`]: the framing of a slice load on a worker's control port (raw bytes
//!   on TLS, ALPN `strata-slices/1`);
//! - [`transport`]: the QUIC data plane (quinn, ALPN `strata/1`) that carries frames;
//! - [`discovery`]: mDNS announce and browse (`_strata._udp.local.`);
//! - [`operator`]: the operator credential that signs cluster changes (drain, remove);
//! - [`listen`]: accepting a server's TCP connections, a bounded number at once;
//! - [`memory`]: what a node measures of its own and its machine's memory;
//! - [`progress`]: bars (or log lines) for slice transfers and loads, drawn the same way
//!   by every node.
//!
//! It must not plan, tokenize or run the model: that is the coordinator's and the
//! worker's.
//!
//! Dependencies, and why: `quinn` (QUIC: streams without head-of-line blocking, idle
//! timeouts for failure detection) over `rustls` with the `ring` provider (no C toolchain
//! beyond `cc`); `rcgen` (the cluster CA and certificate requests); `hmac`/`sha2` (token
//! proofs, fingerprints); `mdns-sd` (pure-Rust mDNS responder and browser that shares port
//! 5353 with avahi/mDNSResponder); `indicatif` (progress bars that share the terminal with
//! logs); `socket2` (a connection's send buffer, which tokio's `TcpStream` does not
//! expose).

pub mod api_tls;
pub mod certificate;
pub mod discovery;
pub mod error;
pub mod frame;
pub mod identity;
pub mod listen;
pub mod memory;
pub mod operator;
pub mod progress;
pub mod slice_stream;
pub mod transport;

pub use error::{Error, Result};
