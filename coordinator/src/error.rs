//! Errors of the coordinator, and their one conversion to gRPC statuses at the API edge.

/// What went wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model could not be opened or run.
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    /// Identity, transport or discovery failed.
    #[error(transparent)]
    Net(#[from] strata_net::Error),
    /// The cluster cannot serve right now.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests wait for room: retry after a while.
    #[error("{message}")]
    Busy {
        /// What to tell the client.
        message: String,
        /// When a place is likely to be free.
        retry_after: std::time::Duration,
    },
    /// A request was malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// A model spec for planning on paper is unknown.
    #[error("{0}")]
    UnknownSpec(String),
    /// An answer failed while it was generated.
    #[error(transparent)]
    Sequence(#[from] crate::sequence::SequenceError),
    /// No worker with that id.
    #[error("no worker `{0}`; `strata cluster status` lists them")]
    NoSuchWorker(String),
    /// A socket failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// A gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// The upstream API of the hybrid route cannot be used.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidRequest(_) | Error::UnknownSpec(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::NoSuchWorker(_) => tonic::Status::not_found(msg),
            Error::Busy { retry_after, .. } => {
                let mut status = tonic::Status::resource_exhausted(msg);
                if let Ok(v) = retry_after.as_secs().max(1).to_string().parse() {
                    status.metadata_mut().insert("retry-after", v);
                }
                status
            }
            Error::Unavailable(_) | Error::Sequence(_) => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
