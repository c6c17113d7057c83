//! The controller's one error type, shared by the server side (mapped to HTTP status + [`ApiError`]
//! body) and the admin client (which turns an error body back into [`ControllerError::Api`]).

use rialto_backends::{MetaError, PubSubError};
use rialto_protocol::admin::ApiError;
use thiserror::Error;

use crate::placement::PlacementError;

/// Everything that can go wrong in the controller or when talking to it.
#[derive(Debug, Error)]
pub enum ControllerError {
    /// The request is invalid; the message says which field and why.
    #[error("{0}")]
    BadRequest(String),
    /// A store or version does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller's principal lacks the permission the request needs; the message names the
    /// principal, the permission and the resource.
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with the current state (store exists, version already online, ...).
    #[error("{0}")]
    Conflict(String),
    /// The cluster cannot do this right now (too few nodes, broker down); retry later.
    #[error("{0}")]
    Unavailable(String),
    /// etcd failed or is unreachable.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The pub-sub broker failed or is unreachable.
    #[error(transparent)]
    PubSub(#[from] PubSubError),
    /// Replicas could not be placed on the live nodes.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A record in etcd is not valid JSON of the expected type: someone wrote it by hand or a
    /// newer controller wrote a format this one does not know.
    #[error("metadata record `{key}` is corrupt ({detail}); inspect it with `etcdctl get {key}`")]
    Corrupt { key: String, detail: String },
    /// A compare-and-put kept losing against concurrent writers.
    #[error(
        "gave up updating `{key}` after {attempts} concurrent modifications; retry the request"
    )]
    Contended { key: String, attempts: usize },
    /// The controller could not listen on its address.
    #[error("cannot listen on {addr}: {detail}; pick a free address with --listen")]
    Bind { addr: String, detail: String },
    /// The controller answered with an error (admin client side).
    #[error("controller refused the request ({status} {kind}): {message}")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    /// The controller could not be reached or answered garbage (admin client side).
    #[error("controller at {url} unreachable: {detail}; check --controller / RIALTO_CONTROLLER and that rialto-controller runs")]
    Unreachable { url: String, detail: String },
    /// The caller is over its rate of admin calls; nothing was done, the same call may be
    /// sent again after `retry_after`.
    #[error("{message}")]
    Throttled {
        message: String,
        retry_after: std::time::Duration,
    },
    /// A bug or an unexpected internal failure.
    #[error("internal controller error: {0}")]
    Internal(String),
}

impl ControllerError {
    /// HTTP status and stable kind this error is reported with by the admin API.
    pub fn status_and_kind(&self) -> (u16, &'static str) {
        match self {
            ControllerError::BadRequest(_) => (400, "bad_request"),
            ControllerError::NotFound(_) => (404, "not_found"),
            ControllerError::Forbidden(_) => (403, "forbidden"),
            ControllerError::Conflict(_) => (409, "conflict"),
            ControllerError::Throttled { .. } => (429, "throttled"),
            ControllerError::Unavailable(_)
            | ControllerError::Placement(_)
            | ControllerError::Contended { .. } => (503, "unavailable"),
            ControllerError::Meta(MetaError::Unavailable { .. }) => (503, "unavailable"),
            ControllerError::PubSub(e) if e.retryable() => (503, "unavailable"),
            ControllerError::Unreachable { .. } => (503, "unavailable"),
            ControllerError::Api { status, .. } => (*status, "internal"),
            _ => (500, "internal"),
        }
    }

    /// The [`ApiError`] body of this error.
    pub fn to_api_error(&self) -> ApiError {
        let (_, kind) = self.status_and_kind();
        ApiError {
            kind: kind.to_string(),
            message: self.to_string(),
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ControllerError::Api { kind, .. } => kind == "unavailable" || kind == "throttled",
            other => matches!(other.status_and_kind().1, "unavailable" | "throttled"),
        }
    }
}

/// Parses a metadata record, naming the key when it is corrupt or of a newer format.
pub(crate) fn parse_record<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, ControllerError> {
    rialto_protocol::meta::decode_record(bytes).map_err(|e| ControllerError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })
}

/// Serializes a metadata record (JSON, with its format).
pub(crate) fn encode_record<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, ControllerError> {
    rialto_protocol::meta::encode_record(record)
        .map_err(|e| ControllerError::Internal(format!("cannot encode record: {e}")))
}
