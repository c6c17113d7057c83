//! Read compute on this server (`POST /v1/compute/{store}/{version}`): each stored value is
//! turned back into its datum (checksum verified, decompressed with the version's dictionary),
//! decoded with the schema it was written with, resolved to the request's schema and evaluated
//! (`rialto_protocol::compute::Plan`). Only results cross the network.
//!
//! The stores' value schemas and the versions' value layouts come from [`Catalog`], which the
//! stores and versions follower keeps equal to etcd; a version's dictionary is read from a
//! replica once and kept while the version exists.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use rialto_backends::mirror::PrefixMap;
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::codec::{DecompressionDictionary, DecompressorPool};
use rialto_protocol::compute::{ComputeRequest, Plan, WriterLayout};
use rialto_protocol::meta::{Compression, StoreRecord, ValueFormat, VersionRecord};
use rialto_protocol::stored::{value_checksum, CHECKSUM_BYTES, RESERVED_SCHEMA_IDS};
use rialto_protocol::ErrorCode;

use crate::store::ReplicaStore;

/// A store's parsed value schemas.
struct StoreSchemas {
    /// The record as parsed, to skip re-parsing an unchanged one.
    text: Vec<(u32, String)>,
    codecs: Arc<HashMap<u32, AvroCodec>>,
}

/// What the server knows to run compute: schemas per store, value layout per version.
#[derive(Default)]
pub(crate) struct Catalog {
    stores: RwLock<HashMap<String, StoreSchemas>>,
    versions: RwLock<HashMap<(String, u32), VersionLayout>>,
    /// Decoders of versions computed on, built on first use.
    decoders: Mutex<HashMap<(String, u32), Arc<VersionDecoder>>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct VersionLayout {
    format: ValueFormat,
    compression: Compression,
    max_value_bytes: u64,
}

impl Catalog {
    /// Replaces what the catalog knows with the stores and versions in etcd.
    pub(crate) fn update(&self, stores: &PrefixMap, versions: &PrefixMap) {
        let mut known = self.stores.write().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::with_capacity(stores.len());
        for value in stores.values() {
            let Ok(store) = rialto_protocol::meta::decode_record::<StoreRecord>(value) else {
                continue;
            };
            let text: Vec<(u32, String)> = store
                .value_schemas
                .iter()
                .map(|s| (s.id, s.schema.clone()))
                .collect();
            let entry = match known.remove(&store.name) {
                Some(old) if old.text == text => old,
                _ => {
                    let codecs = text
                        .iter()
                        .filter_map(|(id, schema)| match AvroCodec::parse(schema) {
                            Ok(codec) => Some((*id, codec)),
                            Err(e) => {
                                tracing::warn!(store = store.name, id, error = %e, "value schema does not parse; compute on its values fails");
                                None
                            }
                        })
                        .collect();
                    StoreSchemas {
                        text,
                        codecs: Arc::new(codecs),
                    }
                }
            };
            next.insert(store.name, entry);
        }
        *known = next;
        drop(known);

        let mut layouts = HashMap::with_capacity(versions.len());
        for value in versions.values() {
            let Ok(v) = rialto_protocol::meta::decode_record::<VersionRecord>(value) else {
                continue;
            };
            layouts.insert(
                (v.store.clone(), v.version),
                VersionLayout {
                    format: v.value_format,
                    compression: v.compression,
                    max_value_bytes: v.max_value_bytes,
                },
            );
        }
        self.decoders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| layouts.contains_key(id));
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) = layouts;
    }

    /// Prepares a compute request on `store` version `version`: its plan against the reader
    /// schema and the version's value decoder (its dictionary read from `replica`).
    pub(crate) fn job(
        &self,
        store: &str,
        version: u32,
        request: ComputeRequest,
        replica: &ReplicaStore,
    ) -> Result<ComputeJob, (ErrorCode, String)> {
        let codecs = self
            .stores
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(store)
            .map(|s| s.codecs.clone())
            .ok_or_else(|| {
                (
                    ErrorCode::UnknownStore,
                    format!("store `{store}`'s schemas are not known to this server"),
                )
            })?;
        let reader_id = request.reader_schema_id;
        let reader = codecs.get(&reader_id).cloned().ok_or_else(|| {
            (
                ErrorCode::BadRequest,
                format!("value schema {reader_id} is not registered for store `{store}`"),
            )
        })?;
        let plan =
            Plan::new(&reader, request).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
        let decoder = self.decoder(store, version, replica)?;
        let layouts = codecs
            .iter()
            .filter(|(id, _)| **id != reader_id)
            .filter_map(|(id, writer)| Some((*id, plan.layout_of(writer)?)))
            .collect();
        Ok(ComputeJob {
            plan,
            reader_id,
            reader,
            writers: codecs,
            layouts,
            decoder,
        })
    }

    fn decoder(
        &self,
        store: &str,
        version: u32,
        replica: &ReplicaStore,
    ) -> Result<Arc<VersionDecoder>, (ErrorCode, String)> {
        let id = (store.to_string(), version);
        if let Some(d) = self
            .decoders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(d.clone());
        }
        let layout = self
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
            .ok_or_else(|| {
                (
                    ErrorCode::UnknownVersion,
                    format!("version {version} of store `{store}` is not known to this server"),
                )
            })?;
        let dictionary = match layout.compression {
            Compression::ZstdDictionary => {
                let bytes = replica
                    .dictionary()
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?
                    .ok_or_else(|| {
                        (
                            ErrorCode::Internal,
                            format!("{store} v{version} has no compression dictionary"),
                        )
                    })?;
                Some(Arc::new(DecompressionDictionary::new(&bytes).map_err(
                    |e| (ErrorCode::Internal, format!("unusable dictionary: {e}")),
                )?))
            }
            _ => None,
        };
        let decoder = Arc::new(VersionDecoder {
            layout,
            decompressors: DecompressorPool::new(dictionary),
        });
        self.decoders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, decoder.clone());
        Ok(decoder)
    }
}

/// Turns one version's stored values back into datums.
struct VersionDecoder {
    layout: VersionLayout,
    decompressors: DecompressorPool,
}

impl VersionDecoder {
    /// `(schema id, datum)` of a stored value, its checksum verified.
    fn datum<'v>(&self, stored: &'v [u8]) -> Result<(u32, Cow<'v, [u8]>), String> {
        let (id, rest) = stored
            .split_first_chunk::<4>()
            .ok_or("a stored value shorter than its schema id")?;
        let schema_id = u32::from_be_bytes(*id);
        if schema_id >= RESERVED_SCHEMA_IDS {
            return Err(format!(
                "a stored value with reserved schema id {schema_id}"
            ));
        }
        let (checksum, payload) = match self.layout.format {
            ValueFormat::SchemaIdPrefixed => (None, rest),
            ValueFormat::Checksummed => {
                let (sum, payload) = rest
                    .split_first_chunk::<CHECKSUM_BYTES>()
                    .ok_or("a stored value shorter than its checksum")?;
                (Some(u64::from_be_bytes(*sum)), payload)
            }
        };
        let datum = match self.layout.compression {
            Compression::None => Cow::Borrowed(payload),
            Compression::Zstd | Compression::ZstdDictionary => {
                let max = usize::try_from(self.layout.max_value_bytes).unwrap_or(usize::MAX);
                let datum = self.decompressors.decompress(payload, max);
                Cow::Owned(datum.map_err(|e| e.to_string())?)
            }
        };
        if let Some(stored) = checksum {
            let computed = value_checksum(schema_id, &datum);
            if computed != stored {
                return Err(format!(
                    "checksum mismatch: stored {stored:#018x}, computed {computed:#018x}"
                ));
            }
        }
        Ok((schema_id, datum))
    }
}

/// One compute request, ready to run on values. A value written with the request's own schema
/// is evaluated in place (`Plan::evaluate_datum`: skipping what is not read, about 5× faster
/// than decoding 256-float embeddings), and so is one written with another schema that holds
/// the fields read unchanged (`Plan::evaluate_written`); any other, or one the fast path
/// declines, is decoded, resolved and evaluated (`Plan::evaluate`), which also words the
/// per-key errors.
pub(crate) struct ComputeJob {
    plan: Plan,
    reader_id: u32,
    reader: AvroCodec,
    writers: Arc<HashMap<u32, AvroCodec>>,
    /// Writer schemas whose values the plan can evaluate in place, and where.
    layouts: HashMap<u32, WriterLayout>,
    decoder: Arc<VersionDecoder>,
}

impl ComputeJob {
    /// The key's result as a batch-get record (`reader schema id ‖ result`), or the error of
    /// the whole key: a value that is damaged (retryable elsewhere) or written with a schema
    /// this server does not know.
    pub(crate) fn answer(
        &self,
        stored: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), (ErrorCode, String)> {
        let (schema_id, datum) = self
            .decoder
            .datum(stored)
            .map_err(|e| (ErrorCode::CorruptValue, e))?;
        out.clear();
        out.extend_from_slice(&self.reader_id.to_be_bytes());
        if schema_id == self.reader_id {
            if self.plan.evaluate_datum(&self.reader, &datum, out) {
                return Ok(());
            }
        } else if let (Some(layout), Some(writer)) =
            (self.layouts.get(&schema_id), self.writers.get(&schema_id))
        {
            if self.plan.evaluate_written(writer, layout, &datum, out) {
                return Ok(());
            }
        }
        let writer = self.writers.get(&schema_id).ok_or_else(|| {
            (
                ErrorCode::Internal,
                format!("value written with schema {schema_id}, which this server does not know"),
            )
        })?;
        let value: Value = if schema_id == self.reader_id {
            writer.decode(&datum, "value")
        } else {
            writer.decode_as(&datum, &self.reader, "value")
        }
        .map_err(|e| (ErrorCode::CorruptValue, e.to_string()))?;
        self.plan.evaluate(&self.reader, &value, out);
        Ok(())
    }
}
