//! Errors of identity, transport, frames and discovery.

use std::path::{Path, PathBuf};

/// What went wrong in the parts every node shares.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The join token text is malformed.
    #[error("bad join token: {0}")]
    BadToken(String),
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
    /// A network operation did not finish in time.
    #[error("{what} took longer than {seconds:.1}s")]
    Timeout {
        /// What was being done.
        what: String,
        /// The deadline.
        seconds: f64,
    },
    /// mDNS failed.
    #[error("mDNS: {0}")]
    Mdns(String),
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

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
