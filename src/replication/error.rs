//! Why talking to a peer failed.
//!
//! Owns: [`ReplicationError`], the one error type of every call this node
//! makes to a peer (fan-out, hello, bootstrap, anti-entropy). Must not
//! touch: what the caller does about it (the link's state machine decides
//! that from [`ReplicationError::is_unimplemented`] and the rest).

/// Which call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `Replica/Hello`.
    Hello,
    /// `Replica/ReplicateStream`.
    ReplicateStream,
    /// `Replica/Replicate`.
    Replicate,
    /// The original `Sync/Set`.
    Set,
    /// The original `Sync/GetAll`.
    GetAll,
    /// `Replica/Snapshot`.
    Snapshot,
    /// `Replica/Digest`.
    Digest,
    /// `Replica/Repair`.
    Repair,
}

impl Call {
    /// The name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Hello => "hello",
            Call::ReplicateStream => "replicate stream",
            Call::Replicate => "replicate",
            Call::Set => "set",
            Call::GetAll => "getall",
            Call::Snapshot => "snapshot",
            Call::Digest => "digest",
            Call::Repair => "repair",
        }
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed exchange with a peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicationError {
    /// The peer's address cannot be dialled.
    #[error("bad peer address {addr:?}: {reason}")]
    BadAddress {
        /// The address as discovery gave it.
        addr: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The peer does not serve this call (a node built from the original
    /// proto alone, or a podcache from before the call existed).
    #[error("{call}: not served by the peer")]
    Unimplemented {
        /// The call.
        call: Call,
    },
    /// The call did not complete within the RPC timeout.
    #[error("{call}: timed out")]
    TimedOut {
        /// The call.
        call: Call,
    },
    /// The peer answered with an error, or the connection failed.
    #[error("{call}: {message}")]
    Status {
        /// The call.
        call: Call,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// A streamed answer ended before everything announced arrived.
    #[error("{call}: the stream ended after {received} of {expected} entries")]
    Incomplete {
        /// The call.
        call: Call,
        /// Entries received.
        received: u64,
        /// Entries announced.
        expected: u64,
    },
}

impl ReplicationError {
    /// The error of `call` answering `status`.
    pub fn from_status(call: Call, status: &tonic::Status) -> Self {
        if status.code() == tonic::Code::Unimplemented {
            return Self::Unimplemented { call };
        }
        Self::Status {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// True when the peer turned the call away for now (it serves as many
    /// snapshots as it takes): ask another, or the same one later.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            Self::Status {
                code: tonic::Code::ResourceExhausted,
                ..
            }
        )
    }

    /// True when the peer does not serve the call at all: a reason to fall
    /// back to an older way, not to retry.
    pub fn is_unimplemented(&self) -> bool {
        matches!(self, Self::Unimplemented { .. })
    }
}

/// Runs `call` within `timeout`, mapping a tonic error or the timeout.
pub(crate) async fn within<T>(
    call: Call,
    timeout: std::time::Duration,
    future: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, ReplicationError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(status)) => Err(ReplicationError::from_status(call, &status)),
        Err(_) => Err(ReplicationError::TimedOut { call }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_is_told_apart_and_messages_name_the_call() {
        let err = ReplicationError::from_status(
            Call::ReplicateStream,
            &tonic::Status::unimplemented("x"),
        );
        assert!(err.is_unimplemented());
        let err =
            ReplicationError::from_status(Call::Hello, &tonic::Status::unavailable("refused"));
        assert!(!err.is_unimplemented());
        assert_eq!(err.to_string(), "hello: refused");
        assert_eq!(
            ReplicationError::TimedOut { call: Call::Set }.to_string(),
            "set: timed out"
        );
    }
}
