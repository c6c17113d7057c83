//! Read compute from the client's side: a [`Compute`] request built here, checked against the
//! client's reader schema, sent to the servers with a key set exactly like a batch-get (group
//! routing, sub-requests, least-loaded choice, long-tail retry, streaming with a
//! [`Completeness`]), and each key's result decoded into a [`ComputeRecord`].
//!
//! The operations and their arithmetic are defined in `rialto_protocol::compute`.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::compute::{ComputeRequest, Operation, Plan};

use crate::client::Client;
use crate::stream::{self, BatchEvent, Completeness};
use crate::ClientError;

/// A declarative read-compute request: what to compute on each key's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compute {
    operations: Vec<Operation>,
}

impl Compute {
    pub fn new() -> Compute {
        Compute::default()
    }

    /// Returns these fields as they are (each under its own name).
    pub fn project<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Compute {
        for field in fields {
            self.operations.push(Operation::Project {
                field: field.into(),
            });
        }
        self
    }

    /// `Σ fieldᵢ·vectorᵢ` of an array-of-numbers field, as a double named `result`.
    pub fn dot_product(mut self, field: &str, vector: Vec<f32>, result: &str) -> Compute {
        self.operations.push(Operation::DotProduct {
            field: field.into(),
            vector,
            result: result.into(),
        });
        self
    }

    /// The cosine similarity of an array-of-numbers field and `vector`, as a double.
    pub fn cosine_similarity(mut self, field: &str, vector: Vec<f32>, result: &str) -> Compute {
        self.operations.push(Operation::CosineSimilarity {
            field: field.into(),
            vector,
            result: result.into(),
        });
        self
    }

    /// The element-wise product of an array-of-numbers field and `vector`, as floats.
    pub fn hadamard_product(mut self, field: &str, vector: Vec<f32>, result: &str) -> Compute {
        self.operations.push(Operation::HadamardProduct {
            field: field.into(),
            vector,
            result: result.into(),
        });
        self
    }

    /// The number of elements of an array or map field, as a long.
    pub fn count(mut self, field: &str, result: &str) -> Compute {
        self.operations.push(Operation::Count {
            field: field.into(),
            result: result.into(),
        });
        self
    }
}

/// One key's compute results, in the order the operations were added.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputeRecord {
    /// `(result name, value or this key's error for that operation)`.
    pub results: Vec<(String, Result<Value, String>)>,
}

impl ComputeRecord {
    /// The result named `name` (a projected field's name, or an operation's result name).
    pub fn get(&self, name: &str) -> Option<&Result<Value, String>> {
        self.results.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

/// A compute call's stream item: a key's result (`None`: the store has no value for it), then
/// the call's completeness.
#[derive(Debug, Clone, PartialEq)]
pub enum ComputeEvent {
    Record {
        index: usize,
        result: Option<ComputeRecord>,
        /// Bytes of the result as received (what crossed the network for this key, besides
        /// the frame's 9 bytes).
        result_bytes: usize,
    },
    Done(Completeness),
}

impl Client {
    /// Runs `compute` on the values of `keys` (Avro keys) on the servers; one entry per key,
    /// in the order of `keys`. Fails up front for a request the client's reader schema cannot
    /// run (it must be a registered schema with the fields named), and with
    /// [`ClientError::Incomplete`] when keys stay unanswered after retries.
    pub async fn compute(
        &self,
        compute: &Compute,
        keys: &[Value],
    ) -> Result<Vec<Option<ComputeRecord>>, ClientError> {
        let mut stream = std::pin::pin!(self.compute_stream(compute, keys)?);
        let mut out: Vec<Option<ComputeRecord>> = vec![None; keys.len()];
        while let Some(event) = stream.next().await {
            match event {
                ComputeEvent::Record { index, result, .. } => {
                    if let Some(slot) = out.get_mut(index) {
                        *slot = result;
                    }
                }
                ComputeEvent::Done(done) => return crate::client::complete(out, done),
            }
        }
        Err(ClientError::Protocol(
            "compute stream ended without its completion status".into(),
        ))
    }

    /// Streaming compute: results in the order servers answer, then [`ComputeEvent::Done`].
    pub fn compute_stream(
        &self,
        compute: &Compute,
        keys: &[Value],
    ) -> Result<impl futures::Stream<Item = ComputeEvent> + Send + 'static, ClientError> {
        let codecs = self.shared.codecs();
        let encoded = keys
            .iter()
            .map(|k| codecs.key.encode(k, "key"))
            .collect::<Result<Vec<_>, _>>()?;
        self.compute_stream_raw(compute, &encoded)
    }

    /// Streaming compute of keys given as serialized Avro datums.
    pub fn compute_stream_raw(
        &self,
        compute: &Compute,
        encoded: &[Vec<u8>],
    ) -> Result<impl futures::Stream<Item = ComputeEvent> + Send + 'static, ClientError> {
        let codecs = self.shared.codecs();
        let (reader_id, reader) = codecs.reader_for_compute(&self.shared.store)?;
        let request = ComputeRequest {
            reader_schema_id: reader_id,
            operations: compute.operations.clone(),
        };
        let plan = Plan::new(&reader, request).map_err(|e| ClientError::Compute(e.to_string()))?;
        crate::client::check_batch_size(encoded.len())?;
        crate::stats::Counters::add(&self.shared.counters.keys_requested, encoded.len() as u64);
        let table = self.shared.table();
        let version = self.version_of(&table)?;
        let spec = Bytes::from(plan.request().encode());
        let raw = stream::start(self.shared.clone(), table, version, encoded, Some(spec));
        let plan = Arc::new(plan);
        let store = self.shared.store.clone();
        Ok(raw.map(move |event| match event {
            BatchEvent::Record { index, value, .. } => ComputeEvent::Record {
                index,
                result_bytes: value.as_ref().map_or(0, |raw| raw.bytes.len() + 4),
                result: value.map(|raw| decode(&plan, &reader, &store, &raw.bytes)),
            },
            BatchEvent::Done(done) => ComputeEvent::Done(done),
        }))
    }
}

/// A key's result; one that does not decode becomes an error of each operation (it means a
/// server and this client disagree on the format, which the call cannot retry away).
fn decode(plan: &Plan, reader: &AvroCodec, store: &str, bytes: &[u8]) -> ComputeRecord {
    match plan.decode_result(reader, bytes) {
        Ok(results) => ComputeRecord { results },
        Err(e) => {
            tracing::warn!(store, error = %e, "a compute result does not decode");
            ComputeRecord {
                results: plan
                    .request()
                    .operations
                    .iter()
                    .map(|op| {
                        (
                            op.result_name().to_string(),
                            Err(format!("result does not decode: {e}")),
                        )
                    })
                    .collect(),
            }
        }
    }
}
