//! Value compression on a real cluster (etcd, tansu, two servers): stores with each codec are
//! pushed the same dataset through the real push job and read back byte-identical through the
//! fast client (single get, batch-get, streaming batch-get), while the servers hold compressed
//! bytes.

use std::collections::BTreeMap;

use anyhow::Result;
use futures::StreamExt;
use rialto_fast_client::{BatchEvent, Client};
use rialto_protocol::avro::{AvroCodec, Value};
use rialto_protocol::envelope::CompressionCodec;
use rialto_protocol::meta::{Compression, StorageProfile};
use rialto_tests::{key_of, Cluster, STRING_SCHEMA};

const RECORDS: usize = 2_000;
const VALUE_BYTES: usize = 300;

/// Raw value bytes of every key (and a few absent ones), read three ways, which must agree.
async fn read_three_ways(client: &Client) -> Result<BTreeMap<usize, Option<Vec<u8>>>> {
    let codec = AvroCodec::parse(STRING_SCHEMA)?;
    let keys: Vec<Vec<u8>> = (0..RECORDS + 5)
        .map(|i| codec.encode(&Value::String(key_of(i)), "key"))
        .collect::<Result<_, _>>()?;
    let batch: BTreeMap<usize, Option<Vec<u8>>> = client
        .batch_get_raw(&keys)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i, v.map(|v| v.bytes.to_vec())))
        .collect();
    let mut streamed = BTreeMap::new();
    let mut stream = client.batch_get_stream_raw(&keys)?;
    while let Some(event) = stream.next().await {
        match event {
            BatchEvent::Record { index, value, .. } => {
                streamed.insert(index, value.map(|v| v.bytes.to_vec()));
            }
            BatchEvent::Done(done) => {
                assert!(done.failed.is_empty(), "{:?}", done.failed);
            }
        }
    }
    assert_eq!(batch, streamed, "batch-get and streaming batch-get agree");
    for i in (0..RECORDS + 5).step_by(97) {
        let single = client.get_raw(&keys[i]).await?.map(|v| v.bytes.to_vec());
        assert_eq!(single, batch[&i], "single get of key {i}");
    }
    Ok(batch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_stores_read_back_byte_identical() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    let mut reads = Vec::new();
    let mut disk = Vec::new();
    for (store, compression) in [
        ("plain", Compression::None),
        ("zstd", Compression::Zstd),
        ("dict", Compression::ZstdDictionary),
    ] {
        // In-memory stores: PlainTable does not compress, so disk bytes show the values' size.
        cluster
            .create_store_with(
                store,
                STRING_SCHEMA,
                STRING_SCHEMA,
                4,
                1,
                StorageProfile::InMemory,
                compression,
            )
            .await?;
        let report = cluster
            .push_string_records(store, RECORDS, VALUE_BYTES)
            .await?;
        assert_eq!(report.compression, compression);
        match compression {
            Compression::None => {
                assert_eq!(report.compressed_value_bytes, report.raw_value_bytes);
                assert_eq!(report.dictionary_bytes, 0);
            }
            Compression::Zstd => {
                assert!(
                    report.compressed_value_bytes * 2 < report.raw_value_bytes,
                    "{report:?}"
                );
                assert_eq!(report.dictionary_bytes, 0);
            }
            Compression::ZstdDictionary => {
                assert!(report.dictionary_bytes > 0, "{report:?}");
                assert!(
                    report.compressed_value_bytes * 4 < report.raw_value_bytes,
                    "{report:?}"
                );
            }
        }
        let client = cluster.client(store).await?;
        reads.push(read_three_ways(&client).await?);
        let described = cluster.admin().describe_store(store).await?;
        let current = described
            .versions
            .iter()
            .find(|v| v.current)
            .expect("a current version");
        assert_eq!(current.record.compression, compression);
        disk.push(current.replicas.iter().map(|r| r.disk_bytes).sum::<u64>());
    }
    assert_eq!(reads[0].values().filter(|v| v.is_some()).count(), RECORDS);
    assert_eq!(reads[0], reads[1], "zstd store reads like the plain one");
    assert_eq!(
        reads[0], reads[2],
        "zstd+dictionary store reads like the plain one"
    );
    // Each replica also keeps the dictionary (up to 64 KiB) in its meta column family, so with
    // this small dataset the dictionary store is not the smallest on disk.
    assert!(
        disk[1] * 2 < disk[0] && disk[2] < disk[0],
        "servers hold compressed values: disk bytes plain/zstd/dictionary {disk:?}"
    );
    cluster.shutdown().await
}

/// A push whose START_OF_PUSH announces another codec than the version's would have the client
/// decode its values wrongly: the servers fail it before taking any record in, and the previous
/// version keeps serving, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_announcing_another_codec_fails_and_the_store_keeps_serving() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster
        .create_store_with(
            "zstd",
            STRING_SCHEMA,
            STRING_SCHEMA,
            2,
            1,
            StorageProfile::OnDisk,
            Compression::Zstd,
        )
        .await?;
    cluster
        .push_string_records("zstd", 200, VALUE_BYTES)
        .await?;
    let client = cluster.client("zstd").await?;
    let before = read_three_ways(&client).await?;
    assert_eq!(before.values().filter(|v| v.is_some()).count(), 200);

    let records = vec![vec![(b"k".to_vec(), b"v".to_vec())]; 2];
    let reason = cluster
        .push_rejected_envelopes("zstd", &records, true, CompressionCodec::None)
        .await?;
    assert!(reason.contains("version's compression is Zstd"), "{reason}");
    let described = cluster.admin().describe_store("zstd").await?;
    assert_eq!(described.store.current_version, Some(1));
    assert_eq!(read_three_ways(&client).await?, before);
    cluster.shutdown().await
}
