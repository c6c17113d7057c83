//! Authorization of admin API calls.
//!
//! With authorization on, every request but `/health` needs a caller principal (a client
//! certificate; see [`crate::serve`]) holding what its route requires ([`requirement`]), read
//! from the ACL records in etcd at each call (the admin API is not a hot path, and a revoked
//! grant is then refused at once). Principals named by `--admin-principal` are cluster
//! administrators whatever etcd says, so a cluster can be bootstrapped and cannot lock out its
//! operators. A refusal answers `403 forbidden` naming the principal, the permission and the
//! resource, is counted in `/metrics` and logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::Method;
use rialto_protocol::acl::{forbidden_message, AclRecord, Acls, Permission};
use rialto_security::principal::name_of;

use crate::api::ApiState;
use crate::error::{parse_record, ControllerError};
use crate::serve::Caller;

/// What a route requires of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Nothing (health).
    Public,
    /// Any authenticated caller.
    Authenticated,
    /// A cluster administrator.
    ClusterAdmin,
    /// This permission on this store.
    Store(String, Permission),
    /// Any permission on this store (to describe it).
    StoreAny(String),
}

/// How authorization is configured on this controller.
#[derive(Debug, Default)]
pub struct AuthzConfig {
    pub enabled: bool,
    /// Refused requests since start.
    pub refused: AtomicU64,
}

fn decode_segment(segment: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `method path` requires. Unknown routes require a cluster administrator (they answer
/// 404 to one).
pub fn requirement(method: &Method, path: &str) -> Requirement {
    use Requirement::*;
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(decode_segment)
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let read = *method == Method::GET || *method == Method::HEAD;
    match s.as_slice() {
        ["health"] => Public,
        ["metrics"] => Authenticated,
        ["v1", "controllers"] if read => Authenticated,
        ["v1", "stores"] if read => Authenticated,
        ["v1", "stores"] => ClusterAdmin,
        ["v1", "stores", store]
        | ["v1", "stores", store, "versions", _]
        | ["v1", "stores", store, "value-schemas"]
            if read =>
        {
            StoreAny(store.to_string())
        }
        ["v1", "stores", store, "versions"] if *method == Method::POST => {
            Store(store.to_string(), Permission::Write)
        }
        ["v1", "stores", store, "realtime"] if read => Store(store.to_string(), Permission::Write),
        ["v1", "stores", store, "realtime", "writers"] if *method == Method::POST => {
            Store(store.to_string(), Permission::Write)
        }
        ["v1", "stores", store, "versions", _, "written" | "fail"] => {
            Store(store.to_string(), Permission::Write)
        }
        ["v1", "stores", store, ..] => Store(store.to_string(), Permission::Admin),
        ["v1", "acls", "stores", store, ..] => Store(store.to_string(), Permission::Admin),
        _ => ClusterAdmin,
    }
}

/// The ACLs that decide a requirement: the cluster record plus, for a store requirement, that
/// store's record. Administrators named on the command line are in the cluster record (granted
/// at start), so the controller and the servers read one source: a revoke in etcd holds at both.
pub(crate) async fn acls_for(
    state: &ApiState,
    requirement: &Requirement,
) -> Result<Acls, ControllerError> {
    let mut acls = Acls::default();
    let cluster_key = state.layout.cluster_acl();
    if let Some(kv) = state.meta.get(&cluster_key).await? {
        acls.cluster = parse_record::<AclRecord>(&cluster_key, &kv.value)?;
    }
    if let Requirement::Store(store, _) | Requirement::StoreAny(store) = requirement {
        let key = state.layout.store_acl(store);
        if let Some(kv) = state.meta.get(&key).await? {
            acls.stores
                .insert(store.clone(), parse_record::<AclRecord>(&key, &kv.value)?);
        }
    }
    Ok(acls)
}

/// Whether `principal` meets `requirement` under `acls`; the refusal message if not.
pub fn decide(
    acls: &Acls,
    principal: Option<&str>,
    requirement: &Requirement,
) -> Result<(), String> {
    let name = principal.unwrap_or(rialto_security::principal::ANONYMOUS);
    if *requirement == Requirement::Public {
        return Ok(());
    }
    let allowed = match (requirement, principal) {
        (Requirement::Public, _) => true,
        (_, None) => false,
        (Requirement::Authenticated, Some(_)) => true,
        (Requirement::ClusterAdmin, Some(p)) => acls.is_cluster_admin(p),
        (Requirement::Store(store, permission), Some(p)) => acls.allows(p, store, *permission),
        (Requirement::StoreAny(store), Some(p)) => acls.allows_any(p, store),
    };
    if allowed {
        return Ok(());
    }
    Err(match requirement {
        Requirement::Public | Requirement::Authenticated => {
            "this call needs an authenticated caller: present a client certificate".to_string()
        }
        Requirement::ClusterAdmin => forbidden_message(name, Permission::Admin, "the cluster"),
        Requirement::Store(store, permission) => {
            forbidden_message(name, *permission, &format!("store `{store}`"))
        }
        Requirement::StoreAny(store) => {
            format!("principal `{name}` holds no permission on store `{store}`")
        }
    })
}

/// The middleware: checks every request before its handler runs.
pub(crate) async fn check(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    if !state.authz.enabled {
        return next.run(request).await;
    }
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default();
    let principal = caller.0.as_ref().map(|p| p.as_str());
    let requirement = requirement(request.method(), request.uri().path());
    let decision = match &requirement {
        Requirement::Public => Ok(()),
        r => match acls_for(&state, r).await {
            Ok(acls) => decide(&acls, principal, r),
            Err(e) => return e.into_response(),
        },
    };
    match decision {
        Ok(()) => {
            if request.method() != Method::GET {
                tracing::info!(principal = name_of(caller.0.as_ref()), method = %request.method(), path = request.uri().path(), "admin call");
            }
            next.run(request).await
        }
        Err(message) => {
            state.authz.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(principal = name_of(caller.0.as_ref()), method = %request.method(), path = request.uri().path(), %message, "admin call refused");
            ControllerError::Forbidden(message).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_require_what_they_change() {
        use Requirement::*;
        let store = |p| Store("feed".into(), p);
        assert_eq!(requirement(&Method::GET, "/health"), Public);
        assert_eq!(requirement(&Method::POST, "/v1/stores"), ClusterAdmin);
        assert_eq!(requirement(&Method::GET, "/v1/stores"), Authenticated);
        assert_eq!(requirement(&Method::GET, "/v1/controllers"), Authenticated);
        assert_eq!(
            requirement(&Method::GET, "/v1/stores/feed"),
            StoreAny("feed".into())
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/stores/feed/versions"),
            store(Permission::Write)
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/stores/feed/versions/3/written"),
            store(Permission::Write)
        );
        assert_eq!(
            requirement(&Method::DELETE, "/v1/stores/feed/versions/3"),
            store(Permission::Admin)
        );
        assert_eq!(
            requirement(&Method::PATCH, "/v1/stores/feed"),
            store(Permission::Admin)
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/stores/feed/rollback"),
            store(Permission::Admin)
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/acls/stores/feed/grant"),
            store(Permission::Admin)
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/stores/feed/realtime/writers"),
            store(Permission::Write)
        );
        assert_eq!(
            requirement(&Method::GET, "/v1/stores/feed/realtime/writers"),
            store(Permission::Admin),
            "listing writers is the administrators'"
        );
        assert_eq!(
            requirement(&Method::DELETE, "/v1/stores/feed/realtime/writers/00"),
            store(Permission::Admin)
        );
        for method in [Method::GET, Method::POST] {
            assert_eq!(
                requirement(&method, "/v1/stores/feed/realtime/decisions"),
                store(Permission::Admin),
                "deciding what becomes of real-time records is the store's administrators'"
            );
        }
        assert_eq!(requirement(&Method::GET, "/v1/acls/cluster"), ClusterAdmin);
        assert_eq!(
            requirement(&Method::POST, "/v1/nodes/n1/drain"),
            ClusterAdmin
        );
        assert_eq!(requirement(&Method::GET, "/v1/nodes"), ClusterAdmin);
        assert_eq!(requirement(&Method::GET, "/no/such/route"), ClusterAdmin);
        // A percent-encoded store name is checked as the handler will see it.
        assert_eq!(
            requirement(&Method::PATCH, "/v1/stores/%66eed"),
            store(Permission::Admin)
        );
    }

    #[test]
    fn decisions_default_to_deny_and_name_who_lacks_what() {
        let mut acls = Acls::default();
        acls.cluster.grant("root", &[Permission::Admin]);
        let mut feed = AclRecord::default();
        feed.grant("pusher", &[Permission::Write]);
        acls.stores.insert("feed".into(), feed);
        let write = Requirement::Store("feed".into(), Permission::Write);
        assert!(decide(&acls, Some("pusher"), &write).is_ok());
        assert!(decide(&acls, Some("root"), &write).is_ok());
        let err = decide(&acls, Some("alice"), &write).unwrap_err();
        assert_eq!(err, "principal `alice` lacks `write` on store `feed`");
        assert!(decide(&acls, None, &Requirement::Authenticated).is_err());
        assert!(decide(&acls, None, &Requirement::Public).is_ok());
        assert!(decide(&acls, Some("pusher"), &Requirement::ClusterAdmin).is_err());
        assert!(decide(&acls, Some("pusher"), &Requirement::StoreAny("feed".into())).is_ok());
        assert!(decide(
            &acls,
            Some("pusher"),
            &Requirement::StoreAny("other".into())
        )
        .is_err());
    }
}
