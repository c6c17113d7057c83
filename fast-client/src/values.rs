//! Decompression of values, per store version.
//!
//! A version's compression comes from its version record (through the routing table). Values of
//! a `zstd-dictionary` version need the dictionary the push job trained, which the servers hosting
//! the version serve at `wire::dictionary_path`: it is fetched once per version — ahead of
//! routing to the version when the metadata changes (like connection warming), or on the first
//! read otherwise — and digested once; zstd contexts are pooled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rialto_protocol::codec::{CodecError, DecompressionDictionary, ValueDecompressor};
use rialto_protocol::envelope::DICTIONARY_BYTES_MAX;
use rialto_protocol::meta::Compression;
use rialto_protocol::wire;
use tokio::sync::OnceCell;

use crate::client::Shared;
use crate::response::RawValue;
use crate::routing::RoutingTable;
use crate::ClientError;

/// How one version's values are turned back into what the push job read.
pub(crate) struct VersionValues {
    version: u32,
    compression: Compression,
    dictionary: Option<Arc<DecompressionDictionary>>,
    contexts: Mutex<Vec<ValueDecompressor>>,
}

impl VersionValues {
    fn new(
        version: u32,
        compression: Compression,
        dictionary: Option<Arc<DecompressionDictionary>>,
    ) -> VersionValues {
        VersionValues {
            version,
            compression,
            dictionary,
            contexts: Mutex::new(Vec::new()),
        }
    }

    /// Values stored as written.
    pub(crate) fn plain() -> Arc<VersionValues> {
        Arc::new(VersionValues::new(0, Compression::None, None))
    }

    /// The value as written by the push job.
    pub(crate) fn decode(&self, raw: RawValue) -> Result<RawValue, ClientError> {
        if self.compression == Compression::None {
            return Ok(raw);
        }
        let pooled = self
            .contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut context = match pooled {
            Some(c) => c,
            None => ValueDecompressor::new(self.dictionary.clone()).map_err(|e| self.error(e))?,
        };
        let result = context.decompress(&raw.bytes);
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(context);
        Ok(RawValue {
            schema_id: raw.schema_id,
            bytes: Bytes::from(result.map_err(|e| self.error(e))?),
        })
    }

    fn error(&self, e: CodecError) -> ClientError {
        ClientError::Decompression {
            version: self.version,
            detail: e.to_string(),
        }
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
        shared: &Shared,
        table: &RoutingTable,
    ) -> Result<Arc<VersionValues>, ClientError> {
        let (Some(version), compression) = (table.version, table.compression) else {
            return Ok(VersionValues::plain());
        };
        if compression == Compression::None {
            return Ok(VersionValues::plain());
        }
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
                    Some(fetch_dictionary(shared, table, version).await?)
                }
                Compression::None | Compression::Zstd => None,
            };
            Ok(Arc::new(VersionValues::new(
                version,
                compression,
                dictionary,
            )))
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
    shared: &Shared,
    table: &RoutingTable,
    version: u32,
) -> Result<Arc<DecompressionDictionary>, ClientError> {
    let path = wire::dictionary_path(&shared.store, version);
    let mut last = String::from("no server hosts the version");
    let mut addresses: Vec<(String, bool)> = table.addresses().into_iter().collect();
    addresses.sort();
    for (address, tls) in addresses {
        let answer = async {
            let (parts, mut body) = shared
                .pool
                .send(&address, tls, http::Method::GET, &path, None)
                .await?;
            let bytes = shared
                .pool
                .read_body(&address, &mut body, DICTIONARY_BYTES_MAX)
                .await?;
            if parts.status != http::StatusCode::OK {
                return Err(crate::client::error_response(&address, &parts, &bytes));
            }
            DecompressionDictionary::new(&bytes).map_err(|e| ClientError::Dictionary {
                version,
                detail: format!("{address} sent an unusable dictionary: {e}"),
            })
        }
        .await;
        match answer {
            Ok(dictionary) => {
                tracing::info!(store = shared.store, version, %address, bytes = dictionary.len(), "compression dictionary fetched");
                return Ok(Arc::new(dictionary));
            }
            Err(e) => {
                tracing::warn!(store = shared.store, version, %address, error = %e, "could not fetch the compression dictionary");
                last = e.to_string();
            }
        }
    }
    Err(ClientError::Dictionary {
        version,
        detail: last,
    })
}
