//! A typed client of the admin API, used by `rialto-admin` and the push job.
//!
//! HTTP/1.1 through hyper-util's pooled client, over TCP or, for an `https://` URL, TLS
//! ([`AdminClient::with_tls`]: the CA to trust and, for a controller that requires mutual TLS,
//! this caller's certificate). A non-2xx answer becomes [`ControllerError::Api`] with the
//! server's kind and message; a connection failure, timeout or undecodable answer becomes
//! [`ControllerError::Unreachable`].

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rialto_backends::Network;
use rialto_protocol::admin::{
    AclChangeRequest, AclRecord, AddValueSchemaRequest, AddValueSchemaResponse, ApiError,
    ControllersView, CreateStoreRequest, FailPushRequest, NodeDescription, RealtimeDecision,
    RealtimeDecisionRequest, RealtimeTarget, RealtimeWriterGrant, RealtimeWriterView,
    StartPushRequest, StartPushResponse, StoreDescription, UpdateStoreRequest, VersionDescription,
};
use rialto_protocol::meta::{NodeRecord, StoreRecord, ValueSchema};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ControllerError;
use crate::ClientTlsFiles;

/// How long one admin call may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer the client reads (a store description with thousands of replicas fits).
pub const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Tries of a call the controller throttles (`429`), each after the wait it names.
pub const THROTTLED_ATTEMPTS: u32 = 8;
/// Longest wait before trying a throttled call again.
pub const THROTTLED_WAIT_MAX: Duration = Duration::from_secs(5);

/// Sends `req` on a fresh HTTP/1.1 connection over `network`.
async fn direct_call(
    network: &Network,
    mut req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| format!("no host in `{}`", req.uri()))?
        .to_string();
    // A connection of its own takes the origin form, with the host in its header.
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = path.parse().map_err(|e| format!("invalid path: {e}"))?;
    let host = http::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?;
    req.headers_mut().insert(http::header::HOST, host);
    let conn = network
        .connect(&authority)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|e| error_chain(&e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "admin connection ended");
        }
    });
    sender.send_request(req).await.map_err(|e| error_chain(&e))
}

/// A client of one controller's admin API. Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct AdminClient {
    base_url: String,
    http: Transport,
    tls: bool,
}

/// How calls reach the controller.
#[derive(Clone)]
enum Transport {
    /// hyper-util's pooled client over the operating system's TCP (and TLS).
    Pooled(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
    /// A plaintext connection per call over the given network (a simulated one).
    Direct(Network),
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
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Self::no_tls_config())
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new()).build(connector);
        AdminClient {
            base_url,
            http: Transport::Pooled(http),
            tls: false,
        }
    }

    /// A plaintext client of the controller at `base_url` (`http://host:port`) reached over
    /// `network`, one connection per call: how a simulation's processes reach its controller.
    pub fn over(network: Network, base_url: impl Into<String>) -> AdminClient {
        AdminClient {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            http: Transport::Direct(network),
            tls: false,
        }
    }

    /// A client of the controller at `base_url` (`https://host:port`) over TLS: trusting the CA
    /// in `files`, and presenting its certificate if it has one.
    pub fn with_tls(
        base_url: impl Into<String>,
        files: &ClientTlsFiles,
    ) -> Result<AdminClient, ControllerError> {
        let base_url = base_url.into().trim_end_matches('/').to_string();
        // hyper-rustls sets ALPN itself (`enable_http1`).
        let config = rialto_security::tls::client_config(files, &[])
            .map_err(|e| ControllerError::BadRequest(format!("admin client TLS: {e}")))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(AdminClient {
            base_url,
            http: Transport::Pooled(http),
            tls: true,
        })
    }

    /// [`with_tls`](Self::with_tls) when `tls` is given, else [`new`](Self::new).
    pub fn connect(
        base_url: impl Into<String>,
        tls: Option<&ClientTlsFiles>,
    ) -> Result<AdminClient, ControllerError> {
        match tls {
            Some(files) => AdminClient::with_tls(base_url, files),
            None => Ok(AdminClient::new(base_url)),
        }
    }

    /// A plaintext client still needs a TLS configuration for its connector; it trusts
    /// nothing, so an `https://` URL without [`with_tls`](Self::with_tls) cannot connect.
    fn no_tls_config() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    }

    /// The base URL this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends one call; the answer's bytes on success, the error the answer stands for
    /// otherwise.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ControllerError> {
        let url = format!("{}{path}", self.base_url);
        let unreachable = |detail: String| ControllerError::Unreachable {
            url: url.clone(),
            detail,
        };
        if url.starts_with("https://") && !self.tls {
            return Err(unreachable(
                "an https:// controller needs TLS settings: give --tls-ca-cert (and \
                 --tls-cert/--tls-key if it requires client certificates)"
                    .into(),
            ));
        }
        let body = Bytes::from(body.unwrap_or_default());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (status, retry_after, bytes) = self
                .exchange(&method, &url, body.clone(), &unreachable)
                .await?;
            if status.is_success() {
                return Ok(bytes);
            }
            // Throttled: nothing was done, so the same call goes again once the controller
            // says it may.
            if status == http::StatusCode::TOO_MANY_REQUESTS && attempt < THROTTLED_ATTEMPTS {
                let wait = retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(THROTTLED_WAIT_MAX);
                tracing::debug!(%url, ?wait, attempt, "admin call throttled; trying again");
                tokio::time::sleep(wait).await;
                continue;
            }
            let (kind, message) = match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => (e.kind, e.message),
                Err(_) => (
                    "internal".to_string(),
                    format!(
                        "{path} answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    ),
                ),
            };
            return Err(ControllerError::Api {
                status: status.as_u16(),
                kind,
                message,
            });
        }
    }

    /// One request and its answer: status, `Retry-After` and body.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        body: Bytes,
        unreachable: &impl Fn(String) -> ControllerError,
    ) -> Result<(http::StatusCode, Option<Duration>, Bytes), ControllerError> {
        let mut req = Request::builder().method(method.clone()).uri(url);
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| unreachable(format!("invalid URL: {e}")))?;
        let call = async {
            let resp = match &self.http {
                Transport::Pooled(http) => http
                    .request(req)
                    .await
                    .map_err(|e| unreachable(error_chain(&e)))?,
                Transport::Direct(network) => {
                    direct_call(network, req).await.map_err(unreachable)?
                }
            };
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = Limited::new(resp.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ControllerError>((status, retry_after, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ControllerError> {
        let bytes = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ControllerError::Unreachable {
            url: format!("{}{path}", self.base_url),
            detail: format!("undecodable answer: {e}"),
        })
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

    /// `GET /v1/stores/{store}/realtime`: what a real-time writer needs (needs `write`).
    pub async fn realtime_target(&self, store: &str) -> Result<RealtimeTarget, ControllerError> {
        self.call(
            Method::GET,
            &format!("/v1/stores/{}/realtime", segment(store)),
            None,
        )
        .await
    }

    /// `POST /v1/stores/{store}/realtime/decisions`: what the halted partition leader does with
    /// the real-time record it refused at `offset` of `partition` (needs `admin`).
    pub async fn decide_realtime_record(
        &self,
        store: &str,
        request: &RealtimeDecisionRequest,
    ) -> Result<RealtimeDecision, ControllerError> {
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/realtime/decisions", segment(store)),
            Self::json(request)?,
        )
        .await
    }

    /// `POST /v1/stores/{store}/realtime/writers`: registers a real-time writer (needs `write`).
    pub async fn register_realtime_writer(
        &self,
        store: &str,
    ) -> Result<RealtimeWriterGrant, ControllerError> {
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/realtime/writers", segment(store)),
            None,
        )
        .await
    }

    /// `GET /v1/stores/{store}/realtime/writers`: the registered writers (needs `admin`).
    pub async fn realtime_writers(
        &self,
        store: &str,
    ) -> Result<Vec<RealtimeWriterView>, ControllerError> {
        self.call(
            Method::GET,
            &format!("/v1/stores/{}/realtime/writers", segment(store)),
            None,
        )
        .await
    }

    /// `DELETE /v1/stores/{store}/realtime/writers/{producer}`: revokes a writer (needs `admin`).
    pub async fn revoke_realtime_writer(
        &self,
        store: &str,
        producer: &str,
    ) -> Result<RealtimeWriterView, ControllerError> {
        self.call(
            Method::DELETE,
            &format!(
                "/v1/stores/{}/realtime/writers/{}",
                segment(store),
                segment(producer)
            ),
            None,
        )
        .await
    }

    /// `GET /v1/stores/{store}/realtime/decisions` (needs `admin`).
    pub async fn realtime_decisions(
        &self,
        store: &str,
    ) -> Result<Vec<RealtimeDecision>, ControllerError> {
        self.call(
            Method::GET,
            &format!("/v1/stores/{}/realtime/decisions", segment(store)),
            None,
        )
        .await
    }

    /// `GET /v1/stores/{store}/value-schemas`.
    pub async fn value_schemas(&self, store: &str) -> Result<Vec<ValueSchema>, ControllerError> {
        self.call(
            Method::GET,
            &format!("/v1/stores/{}/value-schemas", segment(store)),
            None,
        )
        .await
    }

    /// `POST /v1/stores/{store}/value-schemas`: registers a fully compatible value schema.
    pub async fn add_value_schema(
        &self,
        store: &str,
        schema: &str,
    ) -> Result<AddValueSchemaResponse, ControllerError> {
        let req = AddValueSchemaRequest {
            schema: schema.to_string(),
        };
        self.call(
            Method::POST,
            &format!("/v1/stores/{}/value-schemas", segment(store)),
            Self::json(&req)?,
        )
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

    /// `GET /v1/controllers`: which controller leads.
    pub async fn controllers(&self) -> Result<ControllersView, ControllerError> {
        self.call(Method::GET, "/v1/controllers", None).await
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
        let bytes = self.send(Method::GET, path, None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `GET /v1/acls/cluster` or, with a store, `GET /v1/acls/stores/{store}`.
    pub async fn acl(&self, store: Option<&str>) -> Result<AclRecord, ControllerError> {
        self.call(Method::GET, &acl_path(store), None).await
    }

    /// Grants (`grant` true) or revokes permissions on a store (or, without one, the cluster).
    pub async fn change_acl(
        &self,
        store: Option<&str>,
        grant: bool,
        req: &AclChangeRequest,
    ) -> Result<AclRecord, ControllerError> {
        let op = if grant { "grant" } else { "revoke" };
        let path = format!("{}/{op}", acl_path(store));
        self.call(Method::POST, &path, Self::json(req)?).await
    }
}

/// The flags every tool that calls the controller (or reads from servers) shares:
/// `--tls-ca-cert`, `--tls-cert`, `--tls-key` (or `RIALTO_CA_CERT`, `RIALTO_CERT`, `RIALTO_KEY`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ControllerTlsArgs {
    /// CA certificate (PEM) the controller's and servers' certificates are checked against;
    /// needed for an https:// controller.
    #[arg(
        long = "tls-ca-cert",
        id = "tls_ca_cert",
        env = "RIALTO_CA_CERT",
        global = true
    )]
    pub ca_cert: Option<std::path::PathBuf>,
    /// This caller's certificate (PEM), for endpoints that require client certificates; it
    /// names the caller's principal.
    #[arg(
        long = "tls-cert",
        id = "tls_cert",
        env = "RIALTO_CERT",
        requires = "tls_key",
        global = true
    )]
    pub cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long = "tls-key",
        id = "tls_key",
        env = "RIALTO_KEY",
        requires = "tls_cert",
        global = true
    )]
    pub key: Option<std::path::PathBuf>,
}

impl ControllerTlsArgs {
    /// The TLS files these flags name, if any (`--tls-cert` without `--tls-ca-cert` is refused).
    pub fn files(&self) -> Result<Option<ClientTlsFiles>, ControllerError> {
        match (&self.ca_cert, &self.cert, &self.key) {
            (None, None, _) => Ok(None),
            (None, Some(_), _) => Err(ControllerError::BadRequest(
                "--tls-cert needs --tls-ca-cert: the CA that signed the controller's certificate"
                    .into(),
            )),
            (Some(ca), cert, key) => Ok(Some(ClientTlsFiles {
                ca: ca.clone(),
                identity: cert.clone().zip(key.clone()),
            })),
        }
    }
}

fn acl_path(store: Option<&str>) -> String {
    match store {
        Some(store) => format!("/v1/acls/stores/{}", segment(store)),
        None => "/v1/acls/cluster".to_string(),
    }
}

/// An error with its sources, so a TLS failure under a connection error is visible.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
