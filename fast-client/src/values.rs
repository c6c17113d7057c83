//! Turning stored values back into the datums the push job wrote, per store version: checksum
//! verification and decompression.
//!
//! A version's value layout comes from its version record (through the routing table). In a
//! checksummed version every value carries the xxh3 checksum of its schema id and uncompressed
//! datum (`rialto_protocol::stored`); the client checks it on every read (unless
//! `ClientConfig::verify_checksums` is off), so a value altered anywhere after the push is an
//! error naming the key, the server and the version — never a wrong value. Values of
//! a `zstd-dictionary` version need the dictionary the push job trained, which the servers hosting
//! the version serve at `wire::dictionary_path`: it is fetched once per version — ahead of
//! routing to the version when the metadata changes (like connection warming), or on the first
//! read otherwise — and digested once; zstd contexts are pooled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rialto_protocol::codec::{CodecError, DecompressionDictionary, DecompressorPool};
use rialto_protocol::envelope::DICTIONARY_BYTES_MAX;
use rialto_protocol::meta::{Compression, ValueFormat};
use rialto_protocol::stored::{value_checksum, CHECKSUM_BYTES, RESERVED_SCHEMA_IDS};
use rialto_protocol::wire;
use tokio::sync::OnceCell;

use crate::pool::ConnectionPool;
use crate::response::RawValue;
use crate::routing::{RoutingTable, ValueLayout};
use crate::ClientError;

/// How one version's values are turned back into what the push job read.
pub(crate) struct VersionValues {
    version: u32,
    layout: ValueLayout,
    decompressors: DecompressorPool,
}

/// Why a stored value could not be turned back into its datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ValueFault {
    /// Not a value of this version's layout (too short, a reserved schema id).
    Malformed(String),
    Decompression(String),
    /// The datum does not match the checksum written with it.
    Checksum {
        stored: u64,
        computed: u64,
    },
}

impl ValueFault {
    /// The error for the application: which key, which server, which version.
    pub(crate) fn into_error(
        self,
        store: &str,
        version: u32,
        key: String,
        address: &str,
    ) -> ClientError {
        match self {
            ValueFault::Checksum { stored, computed } => ClientError::Checksum {
                store: store.to_string(),
                version,
                key,
                address: address.to_string(),
                stored,
                computed,
            },
            ValueFault::Malformed(detail) => ClientError::BadValue {
                store: store.to_string(),
                version,
                key,
                address: address.to_string(),
                detail,
            },
            ValueFault::Decompression(detail) => ClientError::Decompression {
                version,
                detail: format!("value of key {key} from {address}: {detail}"),
            },
        }
    }
}

impl VersionValues {
    pub(crate) fn new(
        version: u32,
        layout: ValueLayout,
        dictionary: Option<Arc<DecompressionDictionary>>,
    ) -> VersionValues {
        VersionValues {
            version,
            layout,
            decompressors: DecompressorPool::new(dictionary),
        }
    }

    /// Values stored as written, without checksums.
    pub(crate) fn plain() -> Arc<VersionValues> {
        Arc::new(VersionValues::new(0, ValueLayout::default(), None))
    }

    /// Whether this version's values carry checksums.
    pub(crate) fn checksummed(&self) -> bool {
        self.layout.format == ValueFormat::Checksummed
    }

    /// The datum as written by the push job: the checksum split off and verified (when
    /// `verify`), the payload decompressed.
    pub(crate) fn decode(&self, raw: RawValue, verify: bool) -> Result<RawValue, ValueFault> {
        if raw.schema_id >= RESERVED_SCHEMA_IDS {
            return Err(ValueFault::Malformed(format!(
                "the server returned a record with reserved schema id {} instead of a value",
                raw.schema_id
            )));
        }
        let (stored, payload) = match self.layout.format {
            ValueFormat::SchemaIdPrefixed => (None, raw.bytes),
            ValueFormat::Checksummed => {
                if raw.bytes.len() < CHECKSUM_BYTES {
                    return Err(ValueFault::Malformed(format!(
                        "{} bytes, shorter than its checksum",
                        raw.bytes.len()
                    )));
                }
                let mut checksum = [0u8; CHECKSUM_BYTES];
                checksum.copy_from_slice(&raw.bytes[..CHECKSUM_BYTES]);
                (
                    Some(u64::from_be_bytes(checksum)),
                    raw.bytes.slice(CHECKSUM_BYTES..),
                )
            }
        };
        let datum = match self.layout.compression {
            Compression::None => payload,
            Compression::Zstd | Compression::ZstdDictionary => Bytes::from(
                self.decompress(&payload)
                    .map_err(|e| ValueFault::Decompression(e.to_string()))?,
            ),
        };
        if let (Some(stored), true) = (stored, verify) {
            let computed = value_checksum(raw.schema_id, &datum);
            if computed != stored {
                return Err(ValueFault::Checksum { stored, computed });
            }
        }
        Ok(RawValue {
            schema_id: raw.schema_id,
            bytes: datum,
        })
    }

    fn decompress(&self, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
        let max = usize::try_from(self.layout.max_value_bytes).unwrap_or(usize::MAX);
        self.decompressors.decompress(payload, max)
    }

    pub(crate) fn version(&self) -> u32 {
        self.version
    }
}

/// The [`VersionValues`] of the versions the client routes to.
#[derive(Default)]
pub(crate) struct ValueCodecs {
    versions: Mutex<HashMap<u32, Arc<OnceCell<Arc<VersionValues>>>>>,
}

impl ValueCodecs {
    /// The values of `table`'s version, fetching its dictionary from its servers if needed.
    pub(crate) async fn for_table(
        &self,
        pool: &ConnectionPool,
        store: &str,
        table: &RoutingTable,
    ) -> Result<Arc<VersionValues>, ClientError> {
        let (Some(version), layout) = (table.version, table.values) else {
            return Ok(VersionValues::plain());
        };
        let compression = layout.compression;
        let cell = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(version)
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let dictionary = match compression {
                Compression::ZstdDictionary => {
                    Some(fetch_dictionary(pool, store, table, version).await?)
                }
                Compression::None | Compression::Zstd => None,
            };
            Ok(Arc::new(VersionValues::new(version, layout, dictionary)))
        })
        .await
        .cloned()
    }

    /// Forgets versions other than `keep`.
    pub(crate) fn retain(&self, keep: &[u32]) {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|v, _| keep.contains(v));
    }
}

/// Asks the servers of `table` for `version`'s dictionary, one after the other.
async fn fetch_dictionary(
    pool: &ConnectionPool,
    store: &str,
    table: &RoutingTable,
    version: u32,
) -> Result<Arc<DecompressionDictionary>, ClientError> {
    let path = wire::dictionary_path(store, version);
    let mut last = String::from("no server hosts the version");
    for (address, tls) in table.addresses() {
        let answer = async {
            let (parts, mut body) = pool
                .send(&address, tls, http::Method::GET, &path, None)
                .await?;
            let bytes = pool
                .read_body(&address, &mut body, DICTIONARY_BYTES_MAX)
                .await?;
            if parts.status != http::StatusCode::OK {
                return Err(crate::error::error_response(&address, &parts, &bytes));
            }
            DecompressionDictionary::new(&bytes).map_err(|e| ClientError::Dictionary {
                version,
                detail: format!("{address} sent an unusable dictionary: {e}"),
            })
        }
        .await;
        match answer {
            Ok(dictionary) => {
                tracing::info!(store, version, %address, bytes = dictionary.len(), "compression dictionary fetched");
                return Ok(Arc::new(dictionary));
            }
            Err(e) => {
                tracing::warn!(store, version, %address, error = %e, "could not fetch the compression dictionary");
                last = e.to_string();
            }
        }
    }
    Err(ClientError::Dictionary {
        version,
        detail: last,
    })
}
