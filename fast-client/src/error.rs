//! The one error type of the client, [`ClientError`].
//!
//! Every message says what happened and what the application engineer can do about it.
//! [`ClientError::is_retryable`] says whether the same read may succeed on another replica; the
//! client uses it to decide when to fail over, applications may use it to decide whether to retry
//! later.

use std::time::Duration;

use rialto_backends::MetaError;
use rialto_protocol::avro::AvroError;
use rialto_protocol::wire::{self, ErrorBody};
use rialto_protocol::ErrorCode;

/// A failed read or a failed client start-up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The store record does not exist in etcd.
    #[error(
        "store `{store}` does not exist in cluster root {root}: check the store name and \
         `ClientConfig::meta_root`, or create the store with `rialto-admin`"
    )]
    UnknownStore { store: String, root: String },

    /// The store exists but no version has gone live yet.
    #[error(
        "store `{store}` has no current version: the first push has not finished; run a push \
         (`rialto-push`) or wait for the running one, or set `ClientConfig::routing_wait`"
    )]
    NoCurrentVersion { store: String },

    /// No replica of the partition is ONLINE on a registered server.
    #[error(
        "no ONLINE replica of partition {partition} of version {version}: every server hosting it \
         is down or still ingesting; check `rialto-admin` replicas for the store and retry later"
    )]
    NoReplica { partition: u32, version: u32 },

    /// The server could not be reached, or the connection broke during the request.
    #[error(
        "storage server {address} is unreachable: {detail}; the client retries other replicas \
         and reconnects on the next request"
    )]
    Unreachable { address: String, detail: String },

    /// The server answered with an error code.
    #[error("storage server {address} answered {code}: {message}")]
    Server {
        address: String,
        code: ErrorCode,
        message: String,
    },

    /// The store's read quota is used up: the application reads faster than the store's owner
    /// allowed. Not retried on another replica (each enforces its share of the quota).
    #[error(
        "read quota exceeded at storage server {address}: {message}; slow down, or raise the \
         store's quota with `rialto-admin stores update --read-quota`"
    )]
    QuotaExceeded { address: String, message: String },

    /// This client's principal (from its certificate) lacks `read` on the store. Not retried:
    /// every replica checks the same ACLs.
    #[error(
        "forbidden by storage server {address}: {message}; ask the store's owner for `read` \
         (`rialto-admin acl grant STORE --permissions read --principal PRINCIPAL`)"
    )]
    Forbidden { address: String, message: String },

    /// The read did not finish within `ClientConfig::request_timeout`.
    #[error(
        "read from storage server {address} did not finish within {after:?}; the server may be \
         overloaded, or raise `ClientConfig::request_timeout`"
    )]
    Timeout { address: String, after: Duration },

    /// A key or value did not convert between the application's type and the store's schema
    /// ([`Client::get_as`](crate::Client::get_as) and the other typed reads).
    #[error("the {what} does not fit {type_name}: {detail}")]
    Typed {
        what: &'static str,
        type_name: &'static str,
        detail: String,
    },

    /// A key or value did not match the store's schemas.
    #[error("schema problem: {0}")]
    Schema(#[from] AvroError),

    /// A compute request refused before it was sent (limits, a field the reader schema lacks,
    /// a reader schema that is not registered), or a result that does not decode.
    #[error("compute: {0}")]
    Compute(String),

    /// The metadata store (etcd) could not be read.
    #[error("could not read cluster metadata: {0}; check that etcd is reachable from this host")]
    Metadata(#[from] MetaError),

    /// A server sent something this client does not understand.
    #[error(
        "protocol error: {0}; the server and client versions may be incompatible, report this \
         with both versions"
    )]
    Protocol(String),

    /// A batch-get with more keys than the client sends in one call.
    #[error(
        "batch-get of {count} keys exceeds the limit of {max} keys per call: split the keys into \
         smaller batches"
    )]
    TooManyKeys { count: usize, max: usize },

    /// A compressed value could not be decompressed.
    #[error(
        "value from version {version} could not be decompressed: {detail}; the push that wrote \
         it and this client disagree on its compression, report this with the store and version"
    )]
    Decompression { version: u32, detail: String },

    /// A value does not match the checksum the push job wrote with it: it was altered between
    /// the push and this client. Never returned as a value; the client tries another replica.
    #[error(
        "value of key {key} from storage server {address} (version {version} of `{store}`) fails \
         its checksum (written {stored:016x}, read {computed:016x}): it was altered after the \
         push, and no other replica had it intact; report this with the server, whose copy of \
         the version is damaged"
    )]
    Checksum {
        store: String,
        version: u32,
        key: String,
        address: String,
        stored: u64,
        computed: u64,
    },

    /// A server returned something that is not a value of the version's layout (shorter than
    /// its checksum, or a chunk record instead of the reassembled value).
    #[error(
        "value of key {key} from storage server {address} (version {version} of `{store}`) is \
         unreadable: {detail}; no other replica answered it"
    )]
    BadValue {
        store: String,
        version: u32,
        key: String,
        address: String,
        detail: String,
    },

    /// The compression dictionary of a version could not be fetched from any of its servers.
    #[error(
        "the compression dictionary of version {version} could not be fetched from any of its \
         servers: {detail}; reads of this version fail until one answers"
    )]
    Dictionary { version: u32, detail: String },

    /// The client configuration cannot be used (for example, an unreadable CA certificate).
    #[error("invalid client configuration: {0}")]
    Config(String),

    /// Some keys of a batch-get could not be read, even after a retry on another replica.
    #[error(
        "batch-get incomplete: {failed_keys} keys could not be read even after a retry on another \
         replica; first error: {first_error}"
    )]
    Incomplete {
        failed_keys: usize,
        first_error: String,
    },
}

impl ClientError {
    /// Whether a server answered that it does not host the version the read was routed to.
    pub fn is_version_gone(&self) -> bool {
        matches!(
            self,
            ClientError::Server {
                code: ErrorCode::UnknownVersion,
                ..
            }
        )
    }

    /// Whether the same read may succeed on another replica (or later).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::NoReplica { .. }
            | ClientError::Dictionary { .. }
            | ClientError::Checksum { .. }
            | ClientError::BadValue { .. }
            | ClientError::Decompression { .. } => true,
            ClientError::Server { code, .. } => code.retryable(),
            _ => false,
        }
    }
}

/// Largest error-response body the client reads.
pub(crate) const ERROR_BODY_BYTES_MAX: usize = 64 * 1024;

/// The error a non-200 response stands for.
pub(crate) fn error_response(
    address: &str,
    parts: &http::response::Parts,
    body: &[u8],
) -> ClientError {
    if let Ok(error) = ErrorBody::decode(body) {
        let address = address.to_string();
        let message = error.message;
        return match error.code {
            ErrorCode::QuotaExceeded => ClientError::QuotaExceeded { address, message },
            ErrorCode::Forbidden => ClientError::Forbidden { address, message },
            code => ClientError::Server {
                address,
                code,
                message,
            },
        };
    }
    let header_code = parts
        .headers
        .get(wire::ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(ErrorCode::from_u16);
    match header_code {
        Some(code) => ClientError::Server {
            address: address.to_string(),
            code,
            message: format!("HTTP {}", parts.status),
        },
        None => ClientError::Protocol(format!(
            "{address} answered HTTP {} without a Rialto error body",
            parts.status
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_map_to_codes() {
        let (parts, _) = http::Response::builder()
            .status(503)
            .body(())
            .unwrap()
            .into_parts();
        let body = ErrorBody {
            code: ErrorCode::PartitionNotServed,
            message: "p3 bootstrapping".into(),
        }
        .encode();
        match error_response("s:1", &parts, &body) {
            ClientError::Server { code, message, .. } => {
                assert_eq!(code, ErrorCode::PartitionNotServed);
                assert_eq!(message, "p3 bootstrapping");
            }
            e => panic!("unexpected {e}"),
        }
        let (parts, _) = http::Response::builder()
            .status(503)
            .header(wire::ERROR_CODE_HEADER, "9")
            .body(())
            .unwrap()
            .into_parts();
        assert!(matches!(
            error_response("s:1", &parts, b""),
            ClientError::Server {
                code: ErrorCode::Overloaded,
                ..
            }
        ));
        let (parts, _) = http::Response::builder()
            .status(502)
            .body(())
            .unwrap()
            .into_parts();
        assert!(matches!(
            error_response("s:1", &parts, b""),
            ClientError::Protocol(_)
        ));
    }

    #[test]
    fn retryability_follows_error_codes() {
        let server = |code| ClientError::Server {
            address: "a:1".into(),
            code,
            message: String::new(),
        };
        assert!(server(ErrorCode::PartitionNotServed).is_retryable());
        assert!(!server(ErrorCode::BadRequest).is_retryable());
        assert!(ClientError::Unreachable {
            address: "a:1".into(),
            detail: "refused".into()
        }
        .is_retryable());
        assert!(!ClientError::Protocol("x".into()).is_retryable());
    }

    #[test]
    fn messages_name_the_store_and_the_remedy() {
        let e = ClientError::UnknownStore {
            store: "x".into(),
            root: "/rialto".into(),
        };
        assert!(
            e.to_string()
                .starts_with("store `x` does not exist in cluster root /rialto"),
            "{e}"
        );
        let e = ClientError::NoCurrentVersion { store: "x".into() };
        assert!(
            e.to_string()
                .starts_with("store `x` has no current version: the first push has not finished"),
            "{e}"
        );
    }
}
