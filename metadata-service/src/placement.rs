//! Replica placement: which live nodes host each partition of a new version.
//!
//! A pure function of its input, so the same nodes always give the same assignment. The rules,
//! in priority order:
//!
//! 1. the replicas of one partition are on distinct nodes;
//! 2. they are in distinct zones whenever the nodes span at least RF zones (otherwise zones are
//!    shared as evenly as possible);
//! 3. every node hosts about the same number of replicas (within one of each other when the zones
//!    allow it);
//! 4. the first replica of a partition (its primary) rotates, so different partitions get
//!    different primaries.
//!
//! Group-based placement (one full copy per logical zone) is a later step.

use std::collections::BTreeMap;

use rialto_protocol::meta::{NodeRecord, PARTITION_COUNT_MAX, REPLICATION_FACTOR_MAX};
use thiserror::Error;

/// Why replicas could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// Fewer distinct live nodes than the replication factor.
    #[error(
        "need {needed} live storage nodes for replication factor {needed}, {available} registered; \
         start more rialto-server nodes or lower the replication factor"
    )]
    TooFewNodes { needed: u32, available: u32 },
    /// Partition count or replication factor out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Places `replication_factor` replicas of each of `partition_count` partitions on `nodes`.
///
/// Returns `assignment[p]` = node ids of partition `p`, primary first.
pub fn place(
    nodes: &[NodeRecord],
    partition_count: u32,
    replication_factor: u32,
) -> Result<Vec<Vec<String>>, PlacementError> {
    if partition_count == 0 || partition_count > PARTITION_COUNT_MAX {
        return Err(PlacementError::Invalid(format!(
            "partition count {partition_count} is out of range 1..={PARTITION_COUNT_MAX}"
        )));
    }
    if replication_factor == 0 || replication_factor > REPLICATION_FACTOR_MAX {
        return Err(PlacementError::Invalid(format!(
            "replication factor {replication_factor} is out of range 1..={REPLICATION_FACTOR_MAX}"
        )));
    }
    // Distinct node ids, sorted, so the result does not depend on the input order.
    let by_id: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.zone.as_str()))
        .collect();
    let ids: Vec<&str> = by_id.keys().copied().collect();
    let zones: Vec<&str> = by_id.values().copied().collect();
    let n = ids.len();
    if (n as u64) < u64::from(replication_factor) {
        return Err(PlacementError::TooFewNodes {
            needed: replication_factor,
            available: n as u32,
        });
    }
    // Per-zone load divided by the zone's size breaks ties toward zones that lag behind.
    let mut zone_size: BTreeMap<&str, usize> = BTreeMap::new();
    for z in &zones {
        *zone_size.entry(z).or_default() += 1;
    }
    let mut zone_load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut load = vec![0usize; n];
    let mut primary_load = vec![0usize; n];
    let mut assignment = Vec::with_capacity(partition_count as usize);

    for p in 0..partition_count as usize {
        let mut chosen: Vec<usize> = Vec::with_capacity(replication_factor as usize);
        for r in 0..replication_factor as usize {
            let best = (0..n).filter(|i| !chosen.contains(i)).min_by_key(|&i| {
                let same_zone = chosen.iter().filter(|&&c| zones[c] == zones[i]).count();
                // Zone load per node, scaled to compare without floats.
                let zone_fill = zone_load.get(zones[i]).copied().unwrap_or(0) * 1_000_000
                    / zone_size.get(zones[i]).copied().unwrap_or(1).max(1);
                let rotation = (i + n - p % n) % n;
                let primary = if r == 0 { primary_load[i] } else { 0 };
                (same_zone, load[i], primary, zone_fill, rotation)
            });
            // `n >= replication_factor`, so a candidate always remains.
            let Some(best) = best else {
                return Err(PlacementError::TooFewNodes {
                    needed: replication_factor,
                    available: n as u32,
                });
            };
            chosen.push(best);
            load[best] += 1;
            *zone_load.entry(zones[best]).or_default() += 1;
            if r == 0 {
                primary_load[best] += 1;
            }
        }
        assignment.push(chosen.into_iter().map(|i| ids[i].to_string()).collect());
    }
    Ok(assignment)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    fn node(id: &str, zone: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            address: format!("{id}:1"),
            zone: zone.into(),
            tls: false,
            started_ms: 0,
        }
    }

    fn nodes(spec: &[(&str, &str)]) -> Vec<NodeRecord> {
        spec.iter().map(|(i, z)| node(i, z)).collect()
    }

    fn zone_of(ns: &[NodeRecord], id: &str) -> String {
        ns.iter()
            .find(|n| n.node_id == id)
            .map(|n| n.zone.clone())
            .unwrap_or_default()
    }

    fn loads(a: &[Vec<String>]) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for p in a {
            for n in p {
                *m.entry(n.clone()).or_default() += 1;
            }
        }
        m
    }

    #[test]
    fn replicas_are_on_distinct_nodes() {
        let ns = nodes(&[("a", ""), ("b", ""), ("c", "")]);
        let a = place(&ns, 16, 3).unwrap();
        assert_eq!(a.len(), 16);
        for p in &a {
            assert_eq!(p.len(), 3);
            assert_eq!(p.iter().collect::<BTreeSet<_>>().len(), 3, "{p:?}");
        }
    }

    #[test]
    fn replicas_are_in_distinct_zones_when_enough_zones_exist() {
        // Zones of uneven size, listed out of order.
        let ns = nodes(&[
            ("z1", "c"),
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("a3", "a"),
            ("b2", "b"),
        ]);
        for rf in 1..=3 {
            for pc in [1, 2, 5, 12] {
                let a = place(&ns, pc, rf).unwrap();
                for p in &a {
                    let zs: BTreeSet<_> = p.iter().map(|n| zone_of(&ns, n)).collect();
                    assert_eq!(zs.len(), rf as usize, "rf {rf}: {p:?}");
                }
            }
        }
    }

    #[test]
    fn zones_are_shared_evenly_when_too_few() {
        let ns = nodes(&[("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")]);
        let a = place(&ns, 8, 3).unwrap();
        for p in &a {
            let zs: BTreeSet<_> = p.iter().map(|n| zone_of(&ns, n)).collect();
            assert_eq!(zs.len(), 2, "{p:?}");
        }
    }

    #[test]
    fn load_is_balanced_within_one() {
        for n in 1..=7usize {
            for zones_count in [1usize, 2, 3] {
                let ns: Vec<NodeRecord> = (0..n)
                    .map(|i| node(&format!("n{i}"), &format!("z{}", i % zones_count)))
                    .collect();
                for rf in 1..=(n.min(4) as u32) {
                    for pc in [1u32, 3, 4, 7, 16, 33] {
                        let a = place(&ns, pc, rf).unwrap();
                        let l = loads(&a);
                        let max = l.values().max().copied().unwrap_or(0);
                        let min = if l.len() < n {
                            0
                        } else {
                            l.values().min().copied().unwrap_or(0)
                        };
                        // Zones of unequal size (n not a multiple of zones) can force imbalance
                        // only when rf equals the zone count; everything else must be within 1.
                        let zones_uneven =
                            n % zones_count != 0 && rf as usize >= zones_count.min(n);
                        if !zones_uneven {
                            assert!(
                                max - min <= 1,
                                "n {n} zones {zones_count} rf {rf} pc {pc}: {l:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn primaries_rotate() {
        let ns = nodes(&[("a", "x"), ("b", "y"), ("c", "z")]);
        let a = place(&ns, 6, 3).unwrap();
        let mut primaries: HashMap<&str, usize> = HashMap::new();
        for p in &a {
            *primaries.entry(p[0].as_str()).or_default() += 1;
        }
        assert_eq!(primaries.len(), 3, "{a:?}");
        assert!(primaries.values().all(|&c| c == 2), "{primaries:?}");
        assert_ne!(a[0][0], a[1][0]);
    }

    #[test]
    fn placement_is_deterministic_regardless_of_input_order() {
        let ns = nodes(&[("a", "x"), ("b", "y"), ("c", "z"), ("d", "x")]);
        let mut rev = ns.clone();
        rev.reverse();
        assert_eq!(place(&ns, 10, 2).unwrap(), place(&rev, 10, 2).unwrap());
        assert_eq!(place(&ns, 10, 2).unwrap(), place(&ns, 10, 2).unwrap());
    }

    #[test]
    fn too_few_nodes_is_an_error() {
        let ns = nodes(&[("a", "x")]);
        let e = place(&ns, 4, 2).unwrap_err();
        assert_eq!(
            e,
            PlacementError::TooFewNodes {
                needed: 2,
                available: 1
            }
        );
        assert!(e
            .to_string()
            .contains("need 2 live storage nodes for replication factor 2, 1 registered"));
        // Duplicate registrations of one node do not count twice.
        let dup = nodes(&[("a", "x"), ("a", "y")]);
        assert!(matches!(
            place(&dup, 1, 2),
            Err(PlacementError::TooFewNodes { .. })
        ));
        assert!(matches!(
            place(&[], 1, 1),
            Err(PlacementError::TooFewNodes { .. })
        ));
    }

    #[test]
    fn out_of_range_shapes_are_rejected() {
        let ns = nodes(&[("a", "x")]);
        assert!(matches!(place(&ns, 0, 1), Err(PlacementError::Invalid(_))));
        assert!(matches!(place(&ns, 1, 0), Err(PlacementError::Invalid(_))));
        assert!(matches!(
            place(&ns, PARTITION_COUNT_MAX + 1, 1),
            Err(PlacementError::Invalid(_))
        ));
    }
}
