//! What crosses the gateway: one JSON request type per operation, one [`Reply`] shape.

use serde::{Deserialize, Serialize};

use crate::meta::{KeyValue, MetaError, WatchEvent};
use crate::pubsub::{ConsumedRecord, PubSubError};

/// Every answer: the result, or the error the backend returned (kind kept, so a client maps it
/// back to the same variant).
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply<T> {
    Ok(T),
    Err(WireError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    pub context: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    Unavailable,
    Failed,
    WatchEnded,
    UnknownTopic,
}

impl From<MetaError> for WireError {
    fn from(e: MetaError) -> WireError {
        match e {
            MetaError::Unavailable { context, detail } => WireError {
                kind: ErrorKind::Unavailable,
                context,
                detail,
            },
            MetaError::Failed { context, detail } => WireError {
                kind: ErrorKind::Failed,
                context,
                detail,
            },
            MetaError::WatchEnded(prefix) => WireError {
                kind: ErrorKind::WatchEnded,
                context: prefix,
                detail: String::new(),
            },
        }
    }
}

impl From<WireError> for MetaError {
    fn from(e: WireError) -> MetaError {
        match e.kind {
            ErrorKind::Unavailable => MetaError::Unavailable {
                context: e.context,
                detail: e.detail,
            },
            ErrorKind::WatchEnded => MetaError::WatchEnded(e.context),
            ErrorKind::Failed | ErrorKind::UnknownTopic => MetaError::Failed {
                context: e.context,
                detail: e.detail,
            },
        }
    }
}

impl From<PubSubError> for WireError {
    fn from(e: PubSubError) -> WireError {
        match e {
            PubSubError::Unavailable { context, detail } => WireError {
                kind: ErrorKind::Unavailable,
                context,
                detail,
            },
            PubSubError::Failed { context, detail } => WireError {
                kind: ErrorKind::Failed,
                context,
                detail,
            },
            PubSubError::UnknownTopic(topic) => WireError {
                kind: ErrorKind::UnknownTopic,
                context: topic,
                detail: String::new(),
            },
        }
    }
}

impl From<WireError> for PubSubError {
    fn from(e: WireError) -> PubSubError {
        match e.kind {
            ErrorKind::Unavailable => PubSubError::Unavailable {
                context: e.context,
                detail: e.detail,
            },
            ErrorKind::UnknownTopic => PubSubError::UnknownTopic(e.context),
            ErrorKind::Failed | ErrorKind::WatchEnded => PubSubError::Failed {
                context: e.context,
                detail: e.detail,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireKeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

impl From<KeyValue> for WireKeyValue {
    fn from(kv: KeyValue) -> Self {
        WireKeyValue {
            key: kv.key,
            value: kv.value,
            mod_revision: kv.mod_revision,
        }
    }
}

impl From<WireKeyValue> for KeyValue {
    fn from(kv: WireKeyValue) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value,
            mod_revision: kv.mod_revision,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireEvent {
    Put(WireKeyValue),
    Delete { key: String, mod_revision: i64 },
}

impl WireEvent {
    pub fn revision(&self) -> i64 {
        match self {
            WireEvent::Put(kv) => kv.mod_revision,
            WireEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

impl From<WatchEvent> for WireEvent {
    fn from(e: WatchEvent) -> Self {
        match e {
            WatchEvent::Put(kv) => WireEvent::Put(kv.into()),
            WatchEvent::Delete { key, mod_revision } => WireEvent::Delete { key, mod_revision },
        }
    }
}

impl From<WireEvent> for WatchEvent {
    fn from(e: WireEvent) -> Self {
        match e {
            WireEvent::Put(kv) => WatchEvent::Put(kv.into()),
            WireEvent::Delete { key, mod_revision } => WatchEvent::Delete { key, mod_revision },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecord {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl From<ConsumedRecord> for WireRecord {
    fn from(r: ConsumedRecord) -> Self {
        WireRecord {
            offset: r.offset,
            key: r.key,
            value: r.value,
        }
    }
}

impl From<WireRecord> for ConsumedRecord {
    fn from(r: WireRecord) -> Self {
        ConsumedRecord {
            offset: r.offset,
            key: r.key,
            value: r.value,
        }
    }
}

/// One record of a [`PubSubRequest::Send`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSend {
    pub topic: String,
    pub partition: u32,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// The metadata operations, each a `POST /meta/<op>` with this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaRequest {
    Get {
        key: String,
    },
    List {
        prefix: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    CompareAndPut {
        key: String,
        expected: Option<i64>,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    /// The revisions from `from` on under `prefix`, waiting up to `wait_ms` for the first.
    Watch {
        prefix: String,
        from: i64,
        wait_ms: u64,
    },
    GrantLease {
        ttl_s: i64,
    },
    KeepAlive {
        id: i64,
    },
    RevokeLease {
        id: i64,
    },
}

/// The broker operations, each a `POST /pubsub` with this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PubSubRequest {
    Create {
        topic: String,
        partitions: u32,
        retention_ms: Option<u64>,
    },
    Delete {
        topic: String,
    },
    PartitionCount {
        topic: String,
    },
    Watermarks {
        topic: String,
        partition: u32,
    },
    OffsetForTime {
        topic: String,
        partition: u32,
        timestamp_ms: i64,
    },
    /// Records appended in order; one offset or error per record, in the same order.
    Send {
        records: Vec<WireSend>,
    },
    /// Up to `max` records from `offset`, waiting up to `wait_ms` for the first.
    Fetch {
        topic: String,
        partition: u32,
        offset: i64,
        max: usize,
        wait_ms: u64,
    },
}
