//! The one partitioner of Rialto.
//!
//! `partition = xxh3_64(key_bytes, seed = 0) % partition_count`, where `key_bytes` is the key
//! exactly as serialized on the topic (Avro binary datum of the key schema). XXH3 is a published,
//! frozen algorithm (xxHash spec v0.8) with fast implementations in every language, so external
//! tools can reproduce placement.
//!
//! **Invariant:** this function never changes for an existing version. The golden vectors below
//! pin it; a change that breaks them breaks every stored version.

use xxhash_rust::xxh3::xxh3_64;

/// The 64-bit hash of a serialized key, before reduction to a partition.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The partition of a serialized key in a version with `partition_count` partitions.
///
/// Panics if `partition_count` is zero: that is a programming error, every version record is
/// validated to have at least one partition.
#[inline]
pub fn partition_for_key(key: &[u8], partition_count: u32) -> u32 {
    assert!(partition_count > 0, "partition_count must be positive");
    (key_hash(key) % u64::from(partition_count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors: (key, hash), cross-checked against the reference xxHash library (Python
    /// `xxhash.xxh3_64_intdigest`). Never edit these; they are the contract with stored data.
    const GOLDEN: &[(&[u8], u64)] = &[
        (b"", 0x2d06800538d394c2),
        (b"a", 0xe6c632b61e964e1f),
        (b"rialto", 0x2354861acf0a702e),
        (b"key-000042", 0x3a9ca621b40fa598),
        (&[0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9], 0xab69a08ef83d8f77),
    ];

    #[test]
    fn golden_hashes_are_stable() {
        for (key, hash) in GOLDEN {
            assert_eq!(key_hash(key), *hash, "hash of {key:?} changed");
        }
    }

    #[test]
    fn golden_partitions_are_stable() {
        assert_eq!(
            partition_for_key(b"rialto", 16),
            (0x2354861acf0a702eu64 % 16) as u32
        );
    }

    #[test]
    fn partitions_are_in_range_and_balanced() {
        let partition_count = 16u32;
        let mut counts = vec![0u32; partition_count as usize];
        for i in 0..160_000u32 {
            let key = format!("key-{i}");
            let p = partition_for_key(key.as_bytes(), partition_count);
            counts[p as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "unbalanced partition: {c}");
        }
    }
}
