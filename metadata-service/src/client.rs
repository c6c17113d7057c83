//! A typed client of the admin API, used by `rialto-admin` and the push job.
//!
//! HTTP/1.1 over plain TCP (no TLS yet) through hyper-util's pooled client. A non-2xx answer
//! becomes [`ControllerError::Api`] with the server's kind and message; a connection failure,
//! timeout or undecodable answer becomes [`ControllerError::Unreachable`].

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rialto_protocol::admin::{
    ApiError, CreateStoreRequest, FailPushRequest, NodeDescription, StartPushRequest,
    StartPushResponse, StoreDescription, UpdateStoreRequest, VersionDescription,
};
use rialto_protocol::meta::{NodeRecord, StoreRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ControllerError;

/// How long one admin call may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer the client reads (a store description with thousands of replicas fits).
pub const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// A client of one controller's admin API. Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct AdminClient {
    base_url: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// Percent-encodes one URL path segment (store names are `[A-Za-z0-9_-]`, but the client does not
/// trust its caller).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' || b == b'~' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AdminClient {
    /// A client of the controller at `base_url` (`http://host:port`). Nothing is contacted yet;
    /// an invalid URL surfaces as [`ControllerError::Unreachable`] on the first call.
    pub fn new(base_url: impl Into<String>) -> AdminClient {
        let base_url = base_url.into().trim_end_matches('/').to_string();
        let http = Client::builder(TokioExecutor::new()).build_http();
        AdminClient { base_url, http }
    }

    /// The base URL this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ControllerError> {
        let url = format!("{}{path}", self.base_url);
        let unreachable = |detail: String| ControllerError::Unreachable {
            url: url.clone(),
            detail,
        };
        if self.base_url.starts_with("https://") {
            return Err(unreachable(
                "TLS to the controller is not supported yet; use http://".into(),
            ));
        }
        let mut req = Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(format!("invalid URL: {e}")))?;
        let call = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(format!("{e}")))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ControllerError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        if !status.is_success() {
            let (kind, message) = match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => (e.kind, e.message),
                Err(_) => (
                    "internal".to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ),
            };
            return Err(ControllerError::Api {
                status: status.as_u16(),
                kind,
                message,
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| unreachable(format!("undecodable answer ({status}): {e}")))
    }

    fn json<T: Serialize>(value: &T) -> Result<Option<Vec<u8>>, ControllerError> {
        serde_json::to_vec(value)
            .map(Some)
            .map_err(|e| ControllerError::Internal(format!("cannot encode request: {e}")))
    }

    /// `POST /v1/stores`.
    pub async fn create_store(
        &self,
        req: &CreateStoreRequest,
    ) -> Result<StoreRecord, ControllerError> {
        self.call(Method::POST, "/v1/stores", Self::json(req)?)
            .await
    }

    /// `PATCH /v1/stores/{store}`.
    pub async fn update_store(
        &self,
        store: &str,
        req: &UpdateStoreRequest,
    ) -> Result<StoreRecord, ControllerError> {
        self.call(
            Method::PATCH,
            &format!("/v1/stores/{}", segment(store)),
            Self::json(req)?,
        )
        .await
    }

    /// `GET /v1/stores`.
    pub async fn list_stores(&self) -> Result<Vec<StoreRecord>, ControllerError> {
        self.call(Method::GET, "/v1/stores", None).await
    }

    /// `GET /v1/stores/{store}`.
    pub async fn describe_store(&self, store: &str) -> Result<StoreDescription, ControllerError> {
        self.call(Method::GET, &format!("/v1/stores/{}", segment(store)), None)
            .await
    }

    /// `POST /v1/stores/{store}/versions`: allocates a version, creates its topic, places replicas.
    pub async fn start_push(
        &self,
        store: &str,
        req: &StartPushRequest,
    ) -> Result<StartPushResponse, ControllerError> {
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/versions", segment(store)),
            Self::json(req)?,
        )
        .await
    }

    /// `GET /v1/stores/{store}/versions/{version}`.
    pub async fn describe_version(
        &self,
        store: &str,
        version: u32,
    ) -> Result<VersionDescription, ControllerError> {
        self.call(
            Method::GET,
            &format!("/v1/stores/{}/versions/{version}", segment(store)),
            None,
        )
        .await
    }

    /// `POST /v1/stores/{store}/versions/{version}/written`: the push wrote END_OF_PUSH everywhere.
    pub async fn push_written(
        &self,
        store: &str,
        version: u32,
    ) -> Result<VersionDescription, ControllerError> {
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/versions/{version}/written", segment(store)),
            None,
        )
        .await
    }

    /// `POST /v1/stores/{store}/versions/{version}/fail`: the push gave up; the version never serves.
    pub async fn fail_push(
        &self,
        store: &str,
        version: u32,
        reason: &str,
    ) -> Result<VersionDescription, ControllerError> {
        let body = Self::json(&FailPushRequest {
            reason: reason.to_string(),
        })?;
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/versions/{version}/fail", segment(store)),
            body,
        )
        .await
    }

    /// `GET /v1/nodes`.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, ControllerError> {
        self.call(Method::GET, "/v1/nodes", None).await
    }

    /// `DELETE /v1/stores/{store}`: marks the store for deletion (the leader finishes it).
    pub async fn delete_store(&self, store: &str) -> Result<StoreRecord, ControllerError> {
        self.call(
            Method::DELETE,
            &format!("/v1/stores/{}", segment(store)),
            None,
        )
        .await
    }

    /// `POST /v1/stores/{store}/rollback`: the backup becomes current.
    pub async fn rollback(&self, store: &str) -> Result<StoreRecord, ControllerError> {
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/rollback", segment(store)),
            None,
        )
        .await
    }

    /// `POST /v1/stores/{store}/roll-forward`: undoes a rollback.
    pub async fn roll_forward(&self, store: &str) -> Result<StoreRecord, ControllerError> {
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/roll-forward", segment(store)),
            None,
        )
        .await
    }

    /// `DELETE /v1/stores/{store}/versions/{version}`: removes a version that is not current.
    pub async fn delete_version(
        &self,
        store: &str,
        version: u32,
    ) -> Result<VersionDescription, ControllerError> {
        self.call(
            Method::DELETE,
            &format!("/v1/stores/{}/versions/{version}", segment(store)),
            None,
        )
        .await
    }

    /// `GET /v1/nodes/{node}`.
    pub async fn describe_node(&self, node: &str) -> Result<NodeDescription, ControllerError> {
        self.call(Method::GET, &format!("/v1/nodes/{}", segment(node)), None)
            .await
    }

    /// `POST /v1/nodes/{node}/drain` (`drain`) or `DELETE` (`!drain`).
    pub async fn drain_node(
        &self,
        node: &str,
        drain: bool,
    ) -> Result<NodeDescription, ControllerError> {
        let method = if drain { Method::POST } else { Method::DELETE };
        self.call(method, &format!("/v1/nodes/{}/drain", segment(node)), None)
            .await
    }

    /// `GET /health`: `Ok(())` when the controller answers.
    pub async fn health(&self) -> Result<(), ControllerError> {
        self.get_text("/health").await.map(|_| ())
    }

    /// `GET /metrics`: the controller's Prometheus text.
    pub async fn metrics(&self) -> Result<String, ControllerError> {
        self.get_text("/metrics").await
    }

    /// A GET whose answer is text, not JSON.
    async fn get_text(&self, path: &str) -> Result<String, ControllerError> {
        let url = format!("{}{path}", self.base_url);
        let unreachable = |detail: String| ControllerError::Unreachable {
            url: url.clone(),
            detail,
        };
        let req = Request::get(&url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| unreachable(format!("invalid URL: {e}")))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| unreachable("timed out reading the answer".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(ControllerError::Api {
                status: status.as_u16(),
                kind: "internal".into(),
                message: format!("{path} answered {status}"),
            });
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("ads_v2-x"), "ads_v2-x");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[tokio::test]
    async fn unreachable_controller_is_reported_with_its_url() {
        // Port 9 (discard) on loopback is closed in test environments.
        let c = AdminClient::new("http://127.0.0.1:9/");
        match c.list_stores().await {
            Err(ControllerError::Unreachable { url, .. }) => {
                assert_eq!(url, "http://127.0.0.1:9/v1/stores")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        let bad = AdminClient::new("not a url");
        assert!(matches!(
            bad.list_nodes().await,
            Err(ControllerError::Unreachable { .. })
        ));
    }
}
