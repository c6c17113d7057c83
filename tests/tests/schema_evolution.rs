//! A store's value schema evolves: schema 2 is registered after a push with schema 1, values
//! written with either are read by applications asking for either, and incompatible schemas are
//! refused with their reason.
//!
//! The oracle is fastavro (`tests/data/evolution`): for each file, reader schema and key,
//! the value as fastavro resolves it from the writer's schema to the reader's, written with the
//! reader's schema. The client's values are compared with those bytes decoded plainly (no
//! resolution) with the reader's schema.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rialto_fast_client::{Client, Compute, ReaderSchema};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_tests::{unhex, wait_until, Cluster, STRING_SCHEMA};

fn data(file: &str) -> PathBuf {
    rialto_tests::test_data("evolution", file)
}

/// fastavro's resolutions: `(file, reader id)` → `(key, value bytes in the reader's schema)`.
type Expected = HashMap<(String, u32), Vec<(String, Vec<u8>)>>;

fn expected() -> Result<Expected> {
    let mut out = Expected::new();
    for line in std::fs::read_to_string(data("expected.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let file = v["file"].as_str().context("file")?.to_string();
        let reader = v["reader"].as_u64().context("reader")? as u32;
        let key = v["key"].as_str().context("key")?.to_string();
        let value = unhex(v["value_hex"].as_str().context("value_hex")?);
        out.entry((file, reader)).or_default().push((key, value));
    }
    Ok(out)
}

/// Checks that `client` returns, for every key, fastavro's resolution of `file`'s value to
/// schema `reader` (decoded with `reader_codec`).
async fn check(
    client: &Client,
    expected: &Expected,
    file: &str,
    reader: u32,
    reader_codec: &AvroCodec,
) -> Result<()> {
    let rows = &expected[&(file.to_string(), reader)];
    let keys: Vec<Value> = rows.iter().map(|(k, _)| Value::String(k.clone())).collect();
    let got = client.batch_get(&keys).await?;
    for ((key, want), got) in rows.iter().zip(&got) {
        let want = reader_codec.decode(want, "expected")?;
        let got = got.as_ref().with_context(|| format!("{key} missing"))?;
        anyhow::ensure!(
            *got == want,
            "{file} read with schema {reader}, key {key}:\n got  {}\n want {}",
            reader_codec.to_json_text(got),
            reader_codec.to_json_text(&want)
        );
    }
    let single = client.get(&keys[7]).await?.context("single get missing")?;
    anyhow::ensure!(
        Some(&single) == got[7].as_ref(),
        "get and batch-get disagree"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_written_with_either_schema_read_as_either() -> Result<()> {
    rialto_tests::init_logging();
    let cluster = Cluster::start(2).await?;
    let v1 = std::fs::read_to_string(data("v1.avsc"))?;
    let v2 = std::fs::read_to_string(data("v2.avsc"))?;
    let (codec1, codec2) = (AvroCodec::parse(&v1)?, AvroCodec::parse(&v2)?);
    let expected = expected()?;
    let store = "members";
    cluster
        .create_store_with(
            store,
            STRING_SCHEMA,
            &v1,
            3,
            2,
            StorageProfile::InMemory,
            Compression::Zstd,
        )
        .await?;
    let admin = cluster.admin();

    // Schema 1 only: an Avro file written with it keeps its bytes and its id.
    let report = cluster.push(store, &data("v1.avro")).await?;
    assert_eq!((report.records, report.value_schema_id), (100, 1));
    let latest = cluster.client(store).await?;
    let built_for_v1 = cluster
        .client_with(store, |c| {
            c.reader_schema = ReaderSchema::Schema(v1.clone())
        })
        .await?;
    check(&latest, &expected, "v1", 1, &codec1).await?;

    // Incompatible schemas are refused, naming the reason; nothing is registered.
    let no_default = edit_field(&v2, &["address", "country"], |f| {
        f.as_object_mut().unwrap().remove("default");
    })?;
    let e = admin
        .add_value_schema(store, &no_default)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("field `country` has no default"),
        "{e}"
    );
    let narrowed = edit_field(&v1, &["legacy_score"], |f| f["type"] = "float".into())?;
    let e = admin.add_value_schema(store, &narrowed).await.unwrap_err();
    assert!(
        e.to_string().contains("`Member.legacy_score`")
            && e.to_string().contains("double is read as float"),
        "{e}"
    );
    let e = admin
        .add_value_schema(store, "{not json")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("value schema"), "{e}");
    assert_eq!(admin.value_schemas(store).await?.len(), 1);

    // Through the admin tool: an incompatible file is refused with its reason and a non-zero
    // exit; the list shows what is registered.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.avsc");
    std::fs::write(&bad, &no_default)?;
    let (ok, _, stderr) = cluster.admin_cli(&[
        "schemas",
        "add",
        store,
        "--value-schema",
        &format!("@{}", bad.display()),
    ])?;
    assert!(
        !ok && stderr.contains("field `country` has no default"),
        "{stderr}"
    );
    let (ok, stdout, _) = cluster.admin_cli(&["schemas", "list", store])?;
    assert!(
        ok && stdout.contains("\"legacy_score\"") && !stdout.contains("headline"),
        "{stdout}"
    );

    // Schema 2 registered; registering it again answers the same id.
    let good = dir.path().join("v2.avsc");
    std::fs::write(&good, &v2)?;
    let (ok, stdout, stderr) = cluster.admin_cli(&[
        "schemas",
        "add",
        store,
        "--value-schema",
        &format!("@{}", good.display()),
    ])?;
    assert!(
        ok && stdout.contains("value schema 2 registered"),
        "{stdout}{stderr}"
    );
    let added = admin.add_value_schema(store, &v2).await?;
    assert_eq!((added.id, added.added), (2, false));
    let (ok, stdout, _) = cluster.admin_cli(&["schemas", "list", store])?;
    assert!(ok && stdout.contains("headline"), "{stdout}");

    // The connected client follows the store's latest schema through its watch.
    wait_until(
        Duration::from_secs(10),
        "client reads with schema 2",
        || async { Ok(check(&latest, &expected, "v1", 2, &codec2).await.is_ok()) },
    )
    .await?;
    check(&built_for_v1, &expected, "v1", 1, &codec1).await?;

    // Compute resolves values written with schema 1 to the request's schema 2 first: a field
    // schema 1 lacks reads as its default.
    let keys: Vec<Value> = (0..100)
        .map(|i| Value::String(format!("m-{i:03}")))
        .collect();
    let compute = Compute::new()
        .project(["headline", "name"])
        .count("embedding", "dims");
    for result in latest.compute(&compute, &keys).await? {
        let result = result.context("a key without a result")?;
        assert_eq!(
            result.get("headline"),
            Some(&Ok(Value::String(String::new())))
        );
        assert_eq!(result.get("dims"), Some(&Ok(Value::Long(8))));
    }
    // Schema 1 holds `name`, `embedding`, `tags` and `nickname` as schema 2 does, so servers
    // evaluate those on schema 1's values in place; the results equal what fastavro's
    // resolution of each value to schema 2 gives.
    let rows = &expected[&("v1".to_string(), 2)];
    let keys: Vec<Value> = rows.iter().map(|(k, _)| Value::String(k.clone())).collect();
    let q: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
    let unchanged = Compute::new()
        .project(["name", "nickname"])
        .dot_product("embedding", q.clone(), "dot")
        .count("tags", "n_tags");
    let results = latest.compute(&unchanged, &keys).await?;
    for ((key, want), result) in rows.iter().zip(&results) {
        let Value::Record(want) = codec2.decode(want, "expected")? else {
            panic!("a record")
        };
        let field = |name: &str| want.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let result = result
            .as_ref()
            .with_context(|| format!("{key}: no result"))?;
        for name in ["name", "nickname"] {
            assert_eq!(
                result.get(name),
                field(name).map(Ok).as_ref(),
                "{key} {name}"
            );
        }
        let Some(Value::Array(embedding)) = field("embedding") else {
            panic!("{key}: embedding")
        };
        // The sum as `protocol::compute` defines it: four partial sums, then (0 + 1) + (2 + 3).
        let mut sums = [0.0f64; 4];
        for (i, (x, y)) in embedding.iter().zip(&q).enumerate() {
            let Value::Float(x) = x else {
                panic!("a float")
            };
            sums[i % 4] += f64::from(*x) * f64::from(*y);
        }
        let dot = (sums[0] + sums[1]) + (sums[2] + sums[3]);
        assert_eq!(result.get("dot"), Some(&Ok(Value::Double(dot))), "{key}");
        let Some(Value::Map(tags)) = field("tags") else {
            panic!("{key}: tags")
        };
        assert_eq!(
            result.get("n_tags"),
            Some(&Ok(Value::Long(tags.len() as i64))),
            "{key}"
        );
    }

    // An application reading with schema 1 cannot name schema 2's fields.
    let e = built_for_v1.compute(&compute, &keys).await.unwrap_err();
    assert!(e.to_string().contains("no field `headline`"), "{e}");
    let pinned = cluster
        .client_with(store, |c| c.reader_schema = ReaderSchema::Id(1))
        .await?;
    check(&pinned, &expected, "v1", 1, &codec1).await?;

    // A push with schema 2: new values under id 2, read by both applications.
    let report = cluster.push(store, &data("v2.avro")).await?;
    assert_eq!((report.version, report.value_schema_id), (2, 2));
    wait_until(
        Duration::from_secs(10),
        "clients route to version 2",
        || async {
            Ok(latest.current_version() == Some(2) && built_for_v1.current_version() == Some(2))
        },
    )
    .await?;
    check(&latest, &expected, "v2", 2, &codec2).await?;
    check(&built_for_v1, &expected, "v2", 1, &codec1).await?;
    let raw = latest
        .get_raw(&codec1_key("m-000")?)
        .await?
        .context("m-000")?;
    assert_eq!(raw.schema_id, 2);

    // JSON lines naming schema 1 are still accepted, and stored under id 1.
    let report = cluster
        .push_with(store, &data("v1.jsonl"), |c| c.value_schema_id = Some(1))
        .await?;
    assert_eq!((report.version, report.value_schema_id), (3, 1));
    wait_until(
        Duration::from_secs(10),
        "client routes to version 3",
        || async { Ok(latest.current_version() == Some(3)) },
    )
    .await?;
    check(&latest, &expected, "v1", 2, &codec2).await?;
    let e = cluster
        .push_with(store, &data("v1.jsonl"), |c| c.value_schema_id = Some(9))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("value schema 9 is not registered"),
        "{e}"
    );

    // An application whose schema cannot read a registered one is told so at connect.
    let unreadable = edit_field(&v1, &["name"], |f| f["type"] = "int".into())?;
    let e = cluster
        .client_with(store, |c| {
            c.reader_schema = ReaderSchema::Schema(unreadable)
        })
        .await
        .err()
        .context("a reader schema that cannot read the data connected")?;
    assert!(
        e.to_string()
            .contains("cannot read values written with value schema"),
        "{e}"
    );
    cluster.shutdown().await
}

/// `schema` with the field at `path` (field names through nested records) changed by `edit`.
fn edit_field(
    schema: &str,
    path: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<String> {
    let mut root: serde_json::Value = serde_json::from_str(schema)?;
    let mut record = &mut root;
    for (i, name) in path.iter().enumerate() {
        let fields = record["fields"].as_array_mut().context("not a record")?;
        let field = fields
            .iter_mut()
            .find(|f| f["name"] == *name)
            .with_context(|| format!("no field `{name}`"))?;
        if i + 1 == path.len() {
            edit(field);
            return Ok(root.to_string());
        }
        record = &mut field["type"];
    }
    anyhow::bail!("empty path")
}

fn codec1_key(key: &str) -> Result<Vec<u8>> {
    Ok(AvroCodec::parse(STRING_SCHEMA)?.encode(&Value::String(key.into()), "key")?)
}
