//! The requests `run` sends through the fast client: single gets, batch-gets and streaming
//! batch-gets of uniformly random keys of the dataset's key space.

use std::future::Future;
use std::pin::Pin;

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::Arc;

use rialto_fast_client::{
    BatchEvent, Client, ClientError, Completeness, Compute, ComputeEvent, RawValue,
};
use tokio::time::Instant;

use crate::dataset::{encode_key, value_index};
use crate::schedule::{Sample, Workload};

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One `get_raw` per request.
    Get,
    /// One `batch_get_raw` of `--batch-keys` keys per request.
    Batch,
    /// One `batch_get_stream_raw` of `--batch-keys` keys per request.
    Stream,
    /// One `compute_stream_raw` of `--batch-keys` keys per request: a dot product of each
    /// value's `embedding` with a query vector (stores made by `prepare --embedding-dims`).
    Compute,
}

impl Mode {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Get => "get",
            Mode::Batch => "batch",
            Mode::Stream => "stream",
            Mode::Compute => "compute",
        }
    }
}

/// A short stable name for a client error, for counting failures by kind.
pub fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::UnknownStore { .. } => "unknown_store".into(),
        ClientError::NoCurrentVersion { .. } => "no_current_version".into(),
        ClientError::NoReplica { .. } => "no_replica".into(),
        ClientError::Unreachable { .. } => "unreachable".into(),
        ClientError::Server { code, .. } => format!("server_{}", code.name()),
        ClientError::Timeout { .. } => "timeout".into(),
        ClientError::Schema(_) => "schema".into(),
        ClientError::Metadata(_) => "metadata".into(),
        ClientError::Protocol(_) => "protocol".into(),
        ClientError::TooManyKeys { .. } => "too_many_keys".into(),
        ClientError::Config(_) => "config".into(),
        ClientError::Incomplete { .. } => "incomplete".into(),
        // Variants added to the client later.
        #[allow(unreachable_patterns)]
        _ => "other".into(),
    }
}

/// Requests against a store through one or more clients (request of task `t` uses client
/// `t % clients`).
pub struct ClientWorkload {
    pub clients: Vec<Client>,
    pub mode: Mode,
    /// Keys are drawn uniformly from `0..key_space`.
    pub key_space: u64,
    pub batch_keys: usize,
    /// What compute mode computes.
    pub compute: Arc<Compute>,
}

/// Tallies one answered key into `s`: found (with a value whose index must be `index`) or
/// missing.
fn count_value(s: &mut Sample, index: u64, value: Option<&RawValue>) {
    match value {
        Some(v) => {
            s.keys_found += 1;
            s.value_bytes += v.bytes.len() as u64;
            if value_index(&v.bytes) != Some(index) {
                s.wrong_values += 1;
            }
        }
        None => s.keys_missing += 1,
    }
}

fn encode_all(indices: &[u64]) -> Vec<Vec<u8>> {
    indices
        .iter()
        .map(|&i| {
            let mut k = Vec::with_capacity(16);
            encode_key(i, &mut k);
            k
        })
        .collect()
}

async fn get(client: Client, index: u64) -> Sample {
    let mut s = Sample {
        keys_requested: 1,
        ..Sample::default()
    };
    let mut key = Vec::with_capacity(16);
    encode_key(index, &mut key);
    match client.get_raw(&key).await {
        Ok(v) => count_value(&mut s, index, v.as_ref()),
        Err(e) => {
            s.keys_failed = 1;
            s.error = Some(error_kind(&e));
        }
    }
    s
}

async fn batch(client: Client, indices: Vec<u64>) -> Sample {
    let mut s = Sample {
        keys_requested: indices.len() as u64,
        ..Sample::default()
    };
    let keys = encode_all(&indices);
    match client.batch_get_raw(&keys).await {
        Ok(values) => {
            for (&i, v) in indices.iter().zip(&values) {
                count_value(&mut s, i, v.as_ref());
            }
        }
        Err(e) => {
            s.keys_failed = match &e {
                ClientError::Incomplete { failed_keys, .. } => *failed_keys as u64,
                _ => indices.len() as u64,
            };
            s.error = Some(error_kind(&e));
        }
    }
    s
}

async fn stream(client: Client, indices: Vec<u64>) -> Sample {
    let mut s = Sample {
        keys_requested: indices.len() as u64,
        ..Sample::default()
    };
    let keys = encode_all(&indices);
    let mut events = match client.batch_get_stream_raw(&keys) {
        Ok(events) => events,
        Err(e) => {
            s.keys_failed = indices.len() as u64;
            s.error = Some(error_kind(&e));
            return s;
        }
    };
    drop(keys);
    while let Some(event) = events.next().await {
        match event {
            BatchEvent::Record { index, value, .. } => {
                if s.first_record.is_none() {
                    s.first_record = Some(Instant::now());
                }
                match indices.get(index) {
                    Some(&i) => count_value(&mut s, i, value.as_ref()),
                    None => s.wrong_values += 1,
                }
            }
            BatchEvent::Done(done) => {
                s.fanout = Some(done.fanout);
                return completed(s, &done);
            }
        }
    }
    s.keys_failed = s.keys_requested - s.keys_found - s.keys_missing;
    s.error = Some("stream_ended_without_status".into());
    s
}

/// `s` with a streaming call's completion status: its failed keys, and why it is incomplete.
fn completed(mut s: Sample, done: &Completeness) -> Sample {
    s.keys_failed = done.failed.len() as u64;
    if !done.is_complete() {
        let why = if done.timed_out {
            "timed_out"
        } else {
            "incomplete"
        };
        s.error = Some(why.into());
    }
    s
}

async fn compute(client: Client, compute: Arc<Compute>, indices: Vec<u64>) -> Sample {
    let mut s = Sample {
        keys_requested: indices.len() as u64,
        ..Sample::default()
    };
    let keys = encode_all(&indices);
    let events = match client.compute_stream_raw(&compute, &keys) {
        Ok(events) => events,
        Err(e) => {
            s.keys_failed = indices.len() as u64;
            s.error = Some(error_kind(&e));
            return s;
        }
    };
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            ComputeEvent::Record {
                result,
                result_bytes,
                ..
            } => match result {
                Some(record) => {
                    s.keys_found += 1;
                    s.value_bytes += result_bytes as u64;
                    if record.results.iter().any(|(_, r)| r.is_err()) {
                        s.compute_errors += 1;
                    }
                }
                None => s.keys_missing += 1,
            },
            ComputeEvent::Done(done) => return completed(s, &done),
        }
    }
    s.error = Some("stream_ended_without_status".into());
    s
}

impl Workload for ClientWorkload {
    fn request(
        &self,
        task: usize,
        rng: &mut StdRng,
    ) -> Pin<Box<dyn Future<Output = Sample> + Send + 'static>> {
        let client = self.clients[task % self.clients.len()].clone();
        let space = self.key_space.max(1);
        match self.mode {
            Mode::Get => Box::pin(get(client, rng.gen_range(0..space))),
            Mode::Batch | Mode::Stream | Mode::Compute => {
                let indices: Vec<u64> = (0..self.batch_keys.max(1))
                    .map(|_| rng.gen_range(0..space))
                    .collect();
                match self.mode {
                    Mode::Batch => Box::pin(batch(client, indices)),
                    Mode::Stream => Box::pin(stream(client, indices)),
                    _ => Box::pin(compute(client, self.compute.clone(), indices)),
                }
            }
        }
    }
}
