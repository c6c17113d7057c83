//! Authorization: which principal may do what to which store.
//!
//! Records live in etcd as JSON: one per store (`{root}/acls/stores/<store>`) and one for the
//! cluster (`{root}/acls/cluster`). A record maps a principal (as its certificate names it; see
//! `rialto_security::Principal`) to the permissions granted. The principal [`ANY`] (`*`) stands
//! for every authenticated caller. A cluster grant of `admin` makes a cluster administrator,
//! allowed everything on every store; a cluster grant of `read` or `write` applies to every
//! store. Store permissions are independent: `admin` on a store does not imply `read`.
//! Nothing is allowed that is not granted (with authorization on, the default is deny).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// The principal that stands for every authenticated caller.
pub const ANY: &str = "*";
/// Longest principal name a record accepts.
pub const PRINCIPAL_BYTES_MAX: usize = 512;
/// Most principals one record holds.
pub const GRANTS_MAX: usize = 10_000;

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Get, batch-get and read compute.
    Read,
    /// Pushes and real-time writes.
    Write,
    /// Create, update, delete, rollback, versions, quotas and the store's ACL.
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 3] = [Permission::Read, Permission::Write, Permission::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Permission, String> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| format!("unknown permission `{text}`; use read, write or admin"))
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One ACL record: principal → permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRecord {
    #[serde(default)]
    pub grants: BTreeMap<String, BTreeSet<Permission>>,
}

/// Checks a principal name for a grant: 1 to [`PRINCIPAL_BYTES_MAX`] printable ASCII
/// characters without spaces.
pub fn validate_principal(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > PRINCIPAL_BYTES_MAX {
        return Err(format!(
            "principal must be 1 to {PRINCIPAL_BYTES_MAX} characters"
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "principal `{}` contains {c:?}; principals are printable ASCII without spaces",
            name.escape_debug()
        ));
    }
    Ok(())
}

impl AclRecord {
    /// Whether this record grants `permission` to `principal` (or to [`ANY`]).
    pub fn grants(&self, principal: &str, permission: Permission) -> bool {
        [principal, ANY].iter().any(|p| {
            self.grants
                .get(*p)
                .is_some_and(|set| set.contains(&permission))
        })
    }

    /// Whether this record grants `principal` (or [`ANY`]) anything at all.
    pub fn grants_any(&self, principal: &str) -> bool {
        [principal, ANY]
            .iter()
            .any(|p| self.grants.get(*p).is_some_and(|set| !set.is_empty()))
    }

    /// Adds grants; `true` if anything changed.
    pub fn grant(&mut self, principal: &str, permissions: &[Permission]) -> bool {
        let set = self.grants.entry(principal.to_string()).or_default();
        let before = set.len();
        set.extend(permissions.iter().copied());
        set.len() != before
    }

    /// Removes grants (a principal left with none is removed); `true` if anything changed.
    pub fn revoke(&mut self, principal: &str, permissions: &[Permission]) -> bool {
        let Some(set) = self.grants.get_mut(principal) else {
            return false;
        };
        let before = set.len();
        for p in permissions {
            set.remove(p);
        }
        let changed = set.len() != before;
        if set.is_empty() {
            self.grants.remove(principal);
        }
        changed
    }
}

/// The ACL records of a cluster, as a process holds them (a mirror of `{root}/acls/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acls {
    pub cluster: AclRecord,
    pub stores: HashMap<String, AclRecord>,
}

impl Acls {
    /// Whether `principal` may do `permission` on `store`: a cluster administrator may do
    /// anything; otherwise the cluster record or the store's record must grant it.
    pub fn allows(&self, principal: &str, store: &str, permission: Permission) -> bool {
        self.is_cluster_admin(principal)
            || self.cluster.grants(principal, permission)
            || self
                .stores
                .get(store)
                .is_some_and(|r| r.grants(principal, permission))
    }

    /// Whether `principal` holds any permission on `store` (may see its description).
    pub fn allows_any(&self, principal: &str, store: &str) -> bool {
        self.is_cluster_admin(principal)
            || self.cluster.grants_any(principal)
            || self
                .stores
                .get(store)
                .is_some_and(|r| r.grants_any(principal))
    }

    /// Whether `principal` is a cluster administrator.
    pub fn is_cluster_admin(&self, principal: &str) -> bool {
        self.cluster.grants(principal, Permission::Admin)
    }
}

/// The sentence a refused caller reads: who, what, on which resource.
pub fn forbidden_message(principal: &str, permission: Permission, resource: &str) -> String {
    format!("principal `{principal}` lacks `{permission}` on {resource}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acls() -> Acls {
        let mut cluster = AclRecord::default();
        cluster.grant("root", &[Permission::Admin]);
        cluster.grant("auditor", &[Permission::Read]);
        let mut feed = AclRecord::default();
        feed.grant("alice", &[Permission::Read]);
        feed.grant("pusher", &[Permission::Write]);
        feed.grant("owner", &[Permission::Admin]);
        let mut public = AclRecord::default();
        public.grant(ANY, &[Permission::Read]);
        Acls {
            cluster,
            stores: [("feed".to_string(), feed), ("public".to_string(), public)].into(),
        }
    }

    #[test]
    fn nothing_is_allowed_that_is_not_granted() {
        let a = acls();
        assert!(a.allows("alice", "feed", Permission::Read));
        assert!(!a.allows("alice", "feed", Permission::Write));
        assert!(!a.allows("alice", "other", Permission::Read));
        assert!(
            !a.allows("owner", "feed", Permission::Read),
            "admin does not imply read"
        );
        assert!(a.allows("owner", "feed", Permission::Admin));
        assert!(!a.allows("mallory", "feed", Permission::Read));
        assert!(!Acls::default().allows("alice", "feed", Permission::Read));
    }

    #[test]
    fn cluster_grants_and_the_wildcard_reach_every_store() {
        let a = acls();
        for p in Permission::ALL {
            assert!(a.allows("root", "anything", p));
        }
        assert!(a.allows("auditor", "feed", Permission::Read));
        assert!(!a.allows("auditor", "feed", Permission::Write));
        assert!(a.allows("mallory", "public", Permission::Read));
        assert!(!a.allows("mallory", "public", Permission::Write));
        assert!(a.allows_any("pusher", "feed") && !a.allows_any("pusher", "other"));
    }

    #[test]
    fn grant_and_revoke_report_changes_and_drop_empty_principals() {
        let mut r = AclRecord::default();
        assert!(r.grant("bob", &[Permission::Read, Permission::Write]));
        assert!(!r.grant("bob", &[Permission::Read]));
        assert!(r.revoke("bob", &[Permission::Read]));
        assert!(!r.grants("bob", Permission::Read) && r.grants("bob", Permission::Write));
        assert!(r.revoke("bob", &[Permission::Write]));
        assert!(r.grants.is_empty());
        assert!(!r.revoke("bob", &[Permission::Write]));
        let json = serde_json::to_string(&acls().stores["feed"]).unwrap();
        assert!(json.contains(r#""alice":["read"]"#), "{json}");
    }

    #[test]
    fn principals_are_checked() {
        assert!(validate_principal("spiffe://example.org/ns/feed").is_ok());
        assert!(validate_principal("").is_err());
        assert!(validate_principal("a b").is_err());
        assert!(validate_principal(&"x".repeat(PRINCIPAL_BYTES_MAX + 1)).is_err());
    }
}
