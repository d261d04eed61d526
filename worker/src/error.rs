//! Errors of the worker crate: identity and TLS, the data plane, the stage runtime.

use std::path::{Path, PathBuf};

/// What went wrong in a worker, or in the transport a coordinator shares with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The join token text is malformed.
    #[error("bad join token: {0}")]
    BadToken(String),
    /// The coordinator refused to admit this worker.
    #[error("the coordinator at {address} refused to admit this worker: {reason}")]
    Refused {
        /// Coordinator address.
        address: String,
        /// Its reason.
        reason: String,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// Saved cluster state is unusable.
    #[error("cluster state: {0}")]
    State(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("network: {0}")]
    Net(#[from] std::io::Error),
    /// A frame broke the data-plane format.
    #[error("bad frame from {peer}: {reason}")]
    BadFrame {
        /// Who sent it.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// A QUIC connection failed.
    #[error("QUIC connection to {peer}: {reason}")]
    Connection {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The requested device is unavailable in this build or on this machine.
    #[error("--device {device}: {reason}")]
    Device {
        /// What was asked for.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// No usable memory budget.
    #[error("memory budget: {0}")]
    Budget(String),
    /// mDNS failed.
    #[error("mDNS: {0}")]
    Mdns(String),
    /// The model runtime failed.
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A gRPC call failed.
    #[error("gRPC: {0}")]
    Rpc(String),
    /// The worker is shutting down.
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<rustls::Error> for Error {
    fn from(e: rustls::Error) -> Self {
        Error::Tls(e.to_string())
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc(s.message().to_string())
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Rpc(format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        ))
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
