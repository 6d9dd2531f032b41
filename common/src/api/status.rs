//! The one place store errors become gRPC statuses.

use tonic::Status;

use crate::store::StoreError;

/// The precise status for a store error; the message says what was wrong.
pub fn from_store(err: StoreError) -> Status {
    let message = err.to_string();
    match err {
        StoreError::SchemaSyntax(_)
        | StoreError::SchemaRefused(_)
        | StoreError::BadStatement { .. }
        | StoreError::Refused { .. }
        | StoreError::Constraint { .. }
        | StoreError::NotReadOnly(_)
        | StoreError::Malformed(_) => Status::invalid_argument(message),
        StoreError::UnknownTable { .. } => Status::not_found(message),
        StoreError::TooLarge { .. } | StoreError::Overloaded(_) => {
            Status::resource_exhausted(message)
        }
        StoreError::Closed => Status::unavailable(message),
        StoreError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
        StoreError::Cancelled(_) => Status::cancelled(message),
        // The writer logs the change to and from a full disk once; not here per request.
        StoreError::DiskFull { .. } => Status::resource_exhausted(message),
        StoreError::Corrupt(_) | StoreError::Sqlite(_) | StoreError::Io(_) => {
            tracing::error!(error = %message, "storage failed");
            Status::internal(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_kind_of_failure_gets_its_code() {
        let cases = [
            (
                StoreError::BadStatement {
                    index: 0,
                    message: "syntax".into(),
                },
                Code::InvalidArgument,
            ),
            (
                StoreError::UnknownTable {
                    index: 0,
                    table: "t".into(),
                },
                Code::NotFound,
            ),
            (
                StoreError::TooLarge {
                    what: "cells",
                    size: 2,
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                StoreError::NotReadOnly("DELETE".into()),
                Code::InvalidArgument,
            ),
            (StoreError::Closed, Code::Unavailable),
            (
                StoreError::DeadlineExceeded {
                    what: "query".into(),
                    limit: "1s".into(),
                },
                Code::DeadlineExceeded,
            ),
            (StoreError::Cancelled("query".into()), Code::Cancelled),
            (
                StoreError::DiskFull {
                    file: "/d/store.db".into(),
                    dir: "/d".into(),
                },
                Code::ResourceExhausted,
            ),
            (StoreError::Corrupt("x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = from_store(err);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }
}
