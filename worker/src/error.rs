//! Errors of the worker crate: joining, the device and budget, the stage runtime.

/// What went wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator refused to admit this worker.
    #[error("the coordinator at {address} refused to admit this worker: {reason}")]
    Refused {
        /// Coordinator address.
        address: String,
        /// Its reason.
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
    /// Identity, transport, frames or discovery failed.
    #[error(transparent)]
    Net(#[from] strata_net::Error),
    /// A socket or file operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The slice cache could not be opened.
    #[error("slice cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
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
