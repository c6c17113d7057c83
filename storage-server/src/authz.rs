//! Read authorization: every get, batch-get and dictionary request names a store, and with
//! authorization on its caller's principal (from the client certificate of its connection; see
//! `rialto_security::Principal`) must hold `read` on that store (`rialto_protocol::acl`).
//!
//! The ACL records are mirrored from etcd (`{root}/acls/`) and rebuilt on every change, so a
//! revoked grant takes effect on a connected client's next request, within the watch's delay.
//! The mirror is loaded before the server serves; if it cannot be followed afterwards the last
//! copy stays (etcd being unreachable must not open or close the whole cluster), and the mirror
//! re-lists when etcd returns. With authorization off every request is allowed.

use std::sync::{Arc, RwLock};

use rialto_backends::mirror::PrefixMap;
use rialto_backends::PrefixMirror;
use rialto_protocol::acl::{forbidden_message, AclRecord, Acls, Permission};
use rialto_protocol::meta::Layout;
use rialto_security::principal::name_of;
use rialto_security::Principal;
use tokio::sync::watch;

use crate::Stop;

/// Who may read what on this server.
#[derive(Debug)]
pub struct Authorizer {
    enabled: bool,
    acls: RwLock<Arc<Acls>>,
}

impl Authorizer {
    /// An authorizer that allows everything (authorization off).
    pub fn disabled() -> Authorizer {
        Authorizer {
            enabled: false,
            acls: RwLock::new(Arc::default()),
        }
    }

    /// An authorizer that denies whatever the ACLs do not grant.
    pub fn enabled(acls: Acls) -> Authorizer {
        Authorizer {
            enabled: true,
            acls: RwLock::new(Arc::new(acls)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the ACLs this authorizer checks against.
    pub fn set(&self, acls: Acls) {
        *self.acls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acls);
    }

    /// `Ok` if `principal` may do `permission` on `store`; else the message a refused caller
    /// reads.
    pub fn check(
        &self,
        principal: Option<&Principal>,
        store: &str,
        permission: Permission,
    ) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let allowed = principal.is_some_and(|p| {
            self.acls.read().unwrap_or_else(|e| e.into_inner()).allows(
                p.as_str(),
                store,
                permission,
            )
        });
        if allowed {
            Ok(())
        } else {
            Err(forbidden_message(
                name_of(principal),
                permission,
                &format!("store `{store}`"),
            ))
        }
    }

    /// `Ok` if the caller is authenticated (authorization off: always), for `/metrics`.
    pub fn check_authenticated(&self, principal: Option<&Principal>) -> Result<(), String> {
        if !self.enabled || principal.is_some() {
            Ok(())
        } else {
            Err("metrics need an authenticated caller (a client certificate)".into())
        }
    }
}

/// The ACLs held in a mirror of `{root}/acls/`. Records that do not parse are skipped and
/// logged: they grant nothing.
pub fn acls_from(layout: &Layout, map: &PrefixMap) -> Acls {
    let mut acls = Acls::default();
    let cluster_key = layout.cluster_acl();
    for (key, value) in map {
        let record = match rialto_protocol::meta::decode_record::<AclRecord>(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%key, error = %e, "unreadable ACL record grants nothing");
                continue;
            }
        };
        if *key == cluster_key {
            acls.cluster = record;
        } else if let Some(store) = layout.parse_store_acl_key(key) {
            acls.stores.insert(store.to_string(), record);
        }
    }
    acls
}

/// Lists the ACLs (failing if etcd is unreachable) and returns the mirror to follow.
pub(crate) async fn load(
    meta: Arc<dyn rialto_backends::MetaStore>,
    layout: &Layout,
) -> Result<(Acls, PrefixMirror), rialto_backends::MetaError> {
    let mirror = PrefixMirror::start(meta, layout.acls_prefix()).await?;
    let acls = mirror.with(|map| acls_from(layout, map)).await;
    Ok((acls, mirror))
}

/// Keeps `authorizer` equal to the mirrored ACLs until shutdown.
pub(crate) async fn follow(
    layout: Layout,
    mirror: PrefixMirror,
    authorizer: Arc<Authorizer>,
    mut shutdown: watch::Receiver<Stop>,
) {
    let mut changed = mirror.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s != Stop::Running) => return,
            r = changed.changed() => if r.is_err() { return },
        }
        let acls = mirror.with(|map| acls_from(&layout, map)).await;
        authorizer.set(acls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_principal_the_store_and_the_permission() {
        let layout = Layout::new("/r");
        let mut record = AclRecord::default();
        record.grant("alice", &[Permission::Read]);
        let map: PrefixMap = [
            (
                layout.store_acl("feed"),
                serde_json::to_vec(&record).unwrap(),
            ),
            (layout.store_acl("broken"), b"{not json".to_vec()),
        ]
        .into_iter()
        .collect();
        let authorizer = Authorizer::enabled(acls_from(&layout, &map));
        let alice = Principal::new("alice");
        assert!(authorizer
            .check(Some(&alice), "feed", Permission::Read)
            .is_ok());
        let err = authorizer
            .check(Some(&Principal::new("bob")), "feed", Permission::Read)
            .unwrap_err();
        assert!(
            err.contains("`bob`") && err.contains("`read`") && err.contains("`feed`"),
            "{err}"
        );
        let err = authorizer
            .check(None, "feed", Permission::Read)
            .unwrap_err();
        assert!(err.contains("anonymous"), "{err}");
        assert!(authorizer
            .check(Some(&alice), "broken", Permission::Read)
            .is_err());
        assert!(authorizer.check_authenticated(None).is_err());

        authorizer.set(Acls::default());
        assert!(authorizer
            .check(Some(&alice), "feed", Permission::Read)
            .is_err());
        assert!(Authorizer::disabled()
            .check(None, "feed", Permission::Read)
            .is_ok());
    }
}
