//! Read compute end to end: the servers' results equal the same computation done here, in the
//! test, on the values a batch-get returns (arithmetic written independently of
//! `rialto_protocol::compute`), on a realistic record (fastavro's `tests/data/foreign`: nested
//! records, nullable unions, maps, a float embedding), on a plain and on a dictionary-compressed
//! store. Per-key problems are per-key errors; a request the schema cannot run is refused
//! before it is sent.

use std::path::PathBuf;

use anyhow::{Context, Result};
use rialto_fast_client::{ClientError, Compute};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_tests::{Cluster, STRING_SCHEMA};

fn foreign(file: &str) -> PathBuf {
    rialto_tests::test_data("foreign", file)
}

fn field<'v>(value: &'v Value, name: &str) -> &'v Value {
    let Value::Record(fields) = value else {
        panic!("not a record: {value:?}")
    };
    &fields.iter().find(|(n, _)| n == name).expect(name).1
}

fn floats(value: &Value) -> Vec<f64> {
    let Value::Array(items) = value else {
        panic!("not an array: {value:?}")
    };
    items
        .iter()
        .map(|v| match v {
            Value::Float(x) => f64::from(*x),
            other => panic!("not a float: {other:?}"),
        })
        .collect()
}

/// The reference computations, element by element in f64.
/// The dot product as `rialto_protocol::compute` defines its sums: element `i` into partial
/// sum `i mod 4`, then `(s0 + s1) + (s2 + s3)`.
fn reference_dot(a: &[f64], q: &[f32]) -> f64 {
    let mut s = [0.0f64; 4];
    for i in 0..a.len() {
        s[i % 4] += a[i] * f64::from(q[i]);
    }
    (s[0] + s[1]) + (s[2] + s[3])
}

fn norm(a: impl Iterator<Item = f64>) -> f64 {
    let mut s = [0.0f64; 4];
    for (i, x) in a.enumerate() {
        s[i % 4] += x * x;
    }
    ((s[0] + s[1]) + (s[2] + s[3])).sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compute_results_equal_the_same_computation_on_batch_get_values() -> Result<()> {
    rialto_tests::init_logging();
    let cluster = Cluster::start(2).await?;
    let value_schema = std::fs::read_to_string(foreign("value.avsc"))?;
    AvroCodec::parse(&value_schema)?;
    let keys: Vec<Value> = (0..200)
        .map(|i| Value::String(format!("member-{i:05}")))
        .chain([Value::String("no-such-member".into())])
        .collect();

    for (store, compression) in [
        ("plain", Compression::None),
        ("dict", Compression::ZstdDictionary),
    ] {
        cluster
            .create_store_with(
                store,
                STRING_SCHEMA,
                &value_schema,
                4,
                2,
                StorageProfile::InMemory,
                compression,
            )
            .await?;
        cluster.push(store, &foreign("members.snappy.avro")).await?;
        let client = cluster.client(store).await?;
        let values = client.batch_get(&keys).await?;
        let dims = values[0]
            .as_ref()
            .map(|v| floats(field(v, "embedding")).len())
            .context("member 0")?;
        let q: Vec<f32> = (0..dims).map(|i| (i as f32 * 0.37).sin()).collect();
        let compute = Compute::new()
            .project(["id", "address", "nickname"])
            .dot_product("embedding", q.clone(), "dot")
            .cosine_similarity("embedding", q.clone(), "cos")
            .hadamard_product("embedding", q.clone(), "had")
            .count("weights", "n_weights")
            .count("embedding", "n_embedding")
            .count("nickname", "bad_count");
        let results = client.compute(&compute, &keys).await?;
        assert_eq!(results.len(), keys.len());
        assert!(
            results[200].is_none(),
            "{store}: a missing key has no result"
        );
        let (mut full_length, mut other_length) = (0, 0);
        for (i, (value, result)) in values.iter().zip(&results).enumerate().take(200) {
            let value = value.as_ref().context("value")?;
            let result = result
                .as_ref()
                .with_context(|| format!("{store}: key {i}"))?;
            let ok = |name: &str| -> Result<&Value> {
                result
                    .get(name)
                    .with_context(|| format!("no result `{name}`"))?
                    .as_ref()
                    .map_err(|e| anyhow::anyhow!("{store} key {i} `{name}`: {e}"))
            };
            for projected in ["id", "address", "nickname"] {
                assert_eq!(ok(projected)?, field(value, projected), "{store} key {i}");
            }
            let emb = floats(field(value, "embedding"));
            let Value::Map(weights) = field(value, "weights") else {
                panic!("weights")
            };
            assert_eq!(*ok("n_weights")?, Value::Long(weights.len() as i64));
            assert_eq!(*ok("n_embedding")?, Value::Long(emb.len() as i64));
            let bad = result.get("bad_count").context("bad_count")?;
            assert!(
                bad.as_ref().unwrap_err().contains("`nickname`"),
                "{store} key {i}: {bad:?}"
            );
            if emb.len() != q.len() {
                other_length += 1;
                let e = result.get("dot").context("dot")?.as_ref().unwrap_err();
                assert!(e.contains("elements"), "{e}");
                continue;
            }
            full_length += 1;
            let dot = reference_dot(&emb, &q);
            assert_eq!(*ok("dot")?, Value::Double(dot), "{store} key {i}");
            let cos = dot / (norm(emb.iter().copied()) * norm(q.iter().map(|x| f64::from(*x))));
            match ok("cos") {
                Ok(v) => assert_eq!(*v, Value::Double(cos), "{store} key {i}"),
                // A zero embedding has no cosine.
                Err(e) => assert!(cos.is_nan() && e.to_string().contains("zero"), "{e}"),
            }
            let had: Vec<Value> = emb
                .iter()
                .zip(&q)
                .map(|(a, b)| Value::Float((a * f64::from(*b)) as f32))
                .collect();
            assert_eq!(*ok("had")?, Value::Array(had), "{store} key {i}");
        }
        assert!(
            full_length > 150,
            "{store}: {full_length} full-length embeddings"
        );
        tracing::info!(store, full_length, other_length, "compute checked");

        // A vector of another length: every key answers an error for that operation.
        let short = Compute::new().dot_product("embedding", vec![1.0; 3], "dot");
        let results = client.compute(&short, &keys[..10]).await?;
        for result in results.iter().flatten() {
            let e = result.get("dot").context("dot")?.as_ref().unwrap_err();
            assert!(e.contains("and the vector 3"), "{e}");
        }
        // Refused before anything is sent.
        let e = client
            .compute(&Compute::new().project(["no_such_field"]), &keys)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Compute(m) if m.contains("no field `no_such_field`")),
            "{e}"
        );
        let e = client
            .compute(
                &Compute::new().count("weights", "id").project(["id"]),
                &keys,
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("two operations give results named `id`"),
            "{e}"
        );
        // The values the servers computed on were the stored ones: a batch-get still agrees
        // with fastavro's bytes (see fidelity.rs) and nothing was counted as a mismatch.
        let stats = client.stats();
        assert_eq!(stats.checksum_mismatches, 0);
        // One batch-get and two compute calls were sent (the refused two never were), each
        // counted as what it is, with its own latency histogram.
        assert_eq!((stats.batch_gets, stats.computes), (1, 2), "{stats:?}");
        let metrics = client.metrics_prometheus();
        assert!(
            metrics.contains(&format!(
                "rialto_client_compute_seconds_count{{store=\"{store}\"}} 2"
            )),
            "{metrics}"
        );
    }
    cluster.shutdown().await
}
