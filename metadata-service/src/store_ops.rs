//! Read-modify-write of store and version records with compare-and-put, so concurrent controllers
//! (and the API next to the reconciler) never lose each other's updates.

use rialto_backends::MetaStore;
use rialto_protocol::acl::{AclRecord, Permission};
use rialto_protocol::meta::{Layout, StoreRecord, VersionRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{encode_record, parse_record, ControllerError};

/// Most compare-and-put attempts on one key before giving up with [`ControllerError::Contended`].
pub const CAS_ATTEMPTS_MAX: usize = 32;

/// Applies `change` to the record at `key` until the compare-and-put wins.
///
/// `change` returns `Ok(false)` to leave the record as it is. Returns the written record, or
/// `None` when `change` declined. A missing key is `not_found(...)`.
pub(crate) async fn update_record<T, F>(
    meta: &dyn MetaStore,
    key: &str,
    not_found: impl Fn() -> ControllerError,
    mut change: F,
) -> Result<Option<T>, ControllerError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(&mut T) -> Result<bool, ControllerError>,
{
    for _ in 0..CAS_ATTEMPTS_MAX {
        let Some(kv) = meta.get(key).await? else {
            return Err(not_found());
        };
        let mut record: T = parse_record(key, &kv.value)?;
        if !change(&mut record)? {
            return Ok(None);
        }
        if meta
            .compare_and_put(key, Some(kv.mod_revision), encode_record(&record)?, None)
            .await?
        {
            return Ok(Some(record));
        }
    }
    Err(ControllerError::Contended {
        key: key.to_string(),
        attempts: CAS_ATTEMPTS_MAX,
    })
}

/// The "store does not exist" error every endpoint uses.
pub fn store_not_found(store: &str) -> ControllerError {
    ControllerError::NotFound(format!(
        "store `{store}` does not exist; create it with `rialto-admin stores create`"
    ))
}

/// The "version does not exist" error every endpoint uses.
pub fn version_not_found(store: &str, version: u32) -> ControllerError {
    ControllerError::NotFound(format!(
        "version {version} of store `{store}` does not exist (it may have been retired); \
         see `rialto-admin stores describe {store}`"
    ))
}

/// Read-modify-write of a store record.
pub(crate) async fn update_store<F>(
    meta: &dyn MetaStore,
    layout: &Layout,
    store: &str,
    change: F,
) -> Result<Option<StoreRecord>, ControllerError>
where
    F: FnMut(&mut StoreRecord) -> Result<bool, ControllerError>,
{
    update_record(
        meta,
        &layout.store(store),
        || store_not_found(store),
        change,
    )
    .await
}

/// Read-modify-write of a version record.
pub(crate) async fn update_version<F>(
    meta: &dyn MetaStore,
    layout: &Layout,
    store: &str,
    version: u32,
    change: F,
) -> Result<Option<VersionRecord>, ControllerError>
where
    F: FnMut(&mut VersionRecord) -> Result<bool, ControllerError>,
{
    update_record(
        meta,
        &layout.version(store, version),
        || version_not_found(store, version),
        change,
    )
    .await
}

/// Marks a version failed with `reason`, whatever its state (servers then drop its replicas);
/// `None` when it had failed already.
pub(crate) async fn fail_version(
    meta: &dyn MetaStore,
    layout: &Layout,
    store: &str,
    version: u32,
    reason: &str,
) -> Result<Option<VersionRecord>, ControllerError> {
    update_version(meta, layout, store, version, |v| {
        if matches!(
            v.status,
            rialto_protocol::meta::VersionStatus::Failed { .. }
        ) {
            return Ok(false);
        }
        v.status = rialto_protocol::meta::VersionStatus::Failed {
            reason: reason.to_string(),
        };
        Ok(true)
    })
    .await
}

/// Read-modify-write of an ACL record (a missing record is an empty one). `change` returns
/// whether it changed anything; the record as stored afterwards is returned.
pub(crate) async fn update_acl<F>(
    meta: &dyn MetaStore,
    key: &str,
    mut change: F,
) -> Result<AclRecord, ControllerError>
where
    F: FnMut(&mut AclRecord) -> Result<bool, ControllerError>,
{
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (mut record, revision) = match meta.get(key).await? {
            Some(kv) => (parse_record(key, &kv.value)?, Some(kv.mod_revision)),
            None => (AclRecord::default(), None),
        };
        if !change(&mut record)? {
            return Ok(record);
        }
        if meta
            .compare_and_put(key, revision, encode_record(&record)?, None)
            .await?
        {
            return Ok(record);
        }
    }
    Err(ControllerError::Contended {
        key: key.to_string(),
        attempts: CAS_ATTEMPTS_MAX,
    })
}

/// Grants cluster `admin` to each of `principals` in etcd (a controller's `--admin-principal`
/// list), so that storage servers, which read only etcd, know them too.
pub(crate) async fn grant_cluster_admins(
    meta: &dyn MetaStore,
    layout: &Layout,
    principals: &[String],
) -> Result<(), ControllerError> {
    if principals.is_empty() {
        return Ok(());
    }
    update_acl(meta, &layout.cluster_acl(), |record| {
        let mut changed = false;
        for p in principals {
            changed |= record.grant(p, &[Permission::Admin]);
        }
        Ok(changed)
    })
    .await
    .map(|_| ())
}

/// Before a topic is created: if a topic of that name awaits a deferred deletion (a store
/// deleted and created again under its name), that topic is deleted now, so the new one starts
/// empty and the deferred deletion cannot remove it later.
pub(crate) async fn clear_deferred_deletion(
    meta: &dyn MetaStore,
    pubsub: &dyn rialto_backends::PubSub,
    layout: &Layout,
    topic: &str,
) -> Result<(), ControllerError> {
    let key = layout.topic_deletion(topic);
    if meta.get(&key).await?.is_none() {
        return Ok(());
    }
    tracing::warn!(%topic, "a topic of this name awaited deletion; deleting it before creating the new one");
    pubsub.delete_topic(topic).await?;
    meta.delete(&key).await?;
    Ok(())
}
