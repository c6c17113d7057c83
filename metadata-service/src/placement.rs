//! Replica placement: which live nodes host each partition of a new version.
//!
//! **Group-based placement.** The live nodes are split into as many disjoint *groups* (logical
//! zones) as the replication factor, and every group holds one full copy of the version:
//! `assignment[p][g]` is partition `p`'s replica in group `g`, for every `p`. The fast client
//! relies on this position convention to read a whole batch-get from one group, so a batch-get's
//! fanout is one group's node count however large the cluster grows.
//!
//! A pure function of its input: the same set of nodes always gives the same assignment,
//! whatever order the nodes are listed in. The rules:
//!
//! 1. **Groups keep physical zones whole when they can.** When the nodes span at least RF
//!    physical zones, every zone goes entirely into one group, so the replicas of a partition
//!    are in distinct zones. Zones are dealt largest first (ties by name) to the group with the
//!    fewest nodes so far (ties by lowest group index), which balances node counts as well as
//!    whole zones allow (zones of 2, 2 and 2 nodes with RF 2 give groups of 4 and 2 nodes).
//! 2. **Otherwise groups mix zones evenly.** With fewer physical zones than RF some zone must
//!    appear in several groups anyway; the nodes, listed zone by zone (largest zone first, ties
//!    by name; nodes by id), are dealt round-robin to the groups. Group sizes differ by at most
//!    one, and each zone's nodes are spread over the groups within one of each other.
//! 3. **Within a group, partitions are spread evenly**: the group's nodes (interleaved across
//!    the physical zones they come from) take consecutive partitions in turn, so the replica
//!    counts of one group's nodes differ by at most one. Each group starts the rotation at a
//!    different node so that small stores do not always land on each group's first node.
//!
//! Consequences: groups are disjoint, so a partition's replicas are on distinct nodes; a group
//! of few nodes (because of whole zones) hosts more replicas per node than a large one.

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
/// Returns `assignment[p]` = node ids of partition `p`, one per group: position `g` is the
/// replica in group `g` (see the module documentation).
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
    let groups = split_into_groups(nodes, replication_factor as usize)?;
    let assignment = (0..partition_count as usize)
        .map(|p| {
            groups
                .iter()
                .enumerate()
                .map(|(g, members)| members[(p + g) % members.len()].to_string())
                .collect()
        })
        .collect();
    Ok(assignment)
}

/// Splits the distinct nodes into `group_count` disjoint, non-empty groups (rules 1 and 2 of the
/// module documentation); each group's nodes are interleaved across their physical zones.
fn split_into_groups(
    nodes: &[NodeRecord],
    group_count: usize,
) -> Result<Vec<Vec<&str>>, PlacementError> {
    // Distinct node ids; a node listed twice keeps its smallest zone name, so the result never
    // depends on the input order.
    let mut zone_of: BTreeMap<&str, &str> = BTreeMap::new();
    for n in nodes {
        let zone = zone_of.entry(n.node_id.as_str()).or_insert(n.zone.as_str());
        if n.zone.as_str() < *zone {
            *zone = n.zone.as_str();
        }
    }
    if zone_of.len() < group_count {
        return Err(PlacementError::TooFewNodes {
            needed: group_count as u32,
            available: zone_of.len() as u32,
        });
    }
    // Physical zones, each with its node ids sorted; largest zone first, ties by name.
    let mut by_zone: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (&id, &zone) in &zone_of {
        by_zone.entry(zone).or_default().push(id);
    }
    let mut zones: Vec<(&str, Vec<&str>)> = by_zone.into_iter().collect();
    zones.sort_by(|(a_name, a), (b_name, b)| b.len().cmp(&a.len()).then(a_name.cmp(b_name)));

    // Per group, its members zone by zone (zones in the order above).
    let mut groups: Vec<Vec<Vec<&str>>> = vec![Vec::new(); group_count];
    if zones.len() >= group_count {
        // Whole zones: each to the group with the fewest nodes so far (lowest index on ties).
        // The first `group_count` zones fill the empty groups, so none stays empty.
        let mut sizes = vec![0usize; group_count];
        for (_, members) in zones {
            let g = (0..group_count)
                .min_by_key(|&g| (sizes[g], g))
                .unwrap_or_default();
            sizes[g] += members.len();
            groups[g].push(members);
        }
    } else {
        // Too few zones: deal the nodes round-robin, zone after zone. `zone_of.len() >=
        // group_count`, so every group gets a node.
        let mut next = 0usize;
        for (_, members) in zones {
            let mut per_group: Vec<Vec<&str>> = vec![Vec::new(); group_count];
            for id in members {
                per_group[next % group_count].push(id);
                next += 1;
            }
            for (g, part) in per_group.into_iter().enumerate() {
                if !part.is_empty() {
                    groups[g].push(part);
                }
            }
        }
    }
    Ok(groups.into_iter().map(interleave).collect())
}

/// One node of each zone in turn: `[[a1, a2, a3], [b1]]` → `[a1, b1, a2, a3]`.
fn interleave(zones: Vec<Vec<&str>>) -> Vec<&str> {
    let longest = zones.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest)
        .flat_map(|i| zones.iter().filter_map(move |z| z.get(i).copied()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

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

    /// `n` nodes `n0..`, node `i` in zone `z<i % zones>`.
    fn cluster(n: usize, zones: usize) -> Vec<NodeRecord> {
        (0..n)
            .map(|i| node(&format!("n{i}"), &format!("z{}", i % zones)))
            .collect()
    }

    fn zone_of<'a>(ns: &'a [NodeRecord], id: &str) -> &'a str {
        ns.iter()
            .find(|n| n.node_id == id)
            .map(|n| n.zone.as_str())
            .unwrap_or_default()
    }

    /// The nodes seen at position `g` of any partition: group `g`.
    fn groups(a: &[Vec<String>]) -> Vec<BTreeSet<String>> {
        let rf = a.first().map(Vec::len).unwrap_or(0);
        (0..rf)
            .map(|g| a.iter().map(|p| p[g].clone()).collect())
            .collect()
    }

    fn loads(a: &[Vec<String>]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for p in a {
            for n in p {
                *m.entry(n.clone()).or_default() += 1;
            }
        }
        m
    }

    /// Checks every property the module documentation promises; returns the groups.
    fn check(ns: &[NodeRecord], pc: u32, rf: u32) -> Vec<BTreeSet<String>> {
        let ctx = format!("{} nodes, pc {pc}, rf {rf}", ns.len());
        let a = place(ns, pc, rf).unwrap();
        assert_eq!(a.len(), pc as usize, "{ctx}");
        for p in &a {
            assert_eq!(p.len(), rf as usize, "{ctx}: {p:?}");
            let distinct: BTreeSet<_> = p.iter().collect();
            assert_eq!(
                distinct.len(),
                rf as usize,
                "{ctx}: two replicas on a node: {p:?}"
            );
        }
        let gs = groups(&a);
        // Groups (positions) are disjoint, so each one holds a full copy on its own nodes.
        for (i, g) in gs.iter().enumerate() {
            for h in &gs[i + 1..] {
                assert!(g.is_disjoint(h), "{ctx}: groups overlap: {gs:?}");
            }
        }
        let all_zones: BTreeSet<&str> = ns.iter().map(|n| n.zone.as_str()).collect();
        if all_zones.len() >= rf as usize {
            for p in &a {
                let zs: BTreeSet<_> = p.iter().map(|n| zone_of(ns, n)).collect();
                assert_eq!(
                    zs.len(),
                    rf as usize,
                    "{ctx}: two replicas in a zone: {p:?}"
                );
            }
            // Whole zones per group.
            for z in &all_zones {
                let holding = gs
                    .iter()
                    .filter(|g| g.iter().any(|n| zone_of(ns, n) == *z))
                    .count();
                assert!(holding <= 1, "{ctx}: zone {z} split over groups: {gs:?}");
            }
        }
        // Within a group, replica counts differ by at most one.
        let l = loads(&a);
        for g in &gs {
            let counts: Vec<usize> = g.iter().map(|n| l[n]).collect();
            let (min, max) = (counts.iter().min(), counts.iter().max());
            assert!(
                max.zip(min).is_some_and(|(max, min)| max - min <= 1),
                "{ctx}: group {g:?} loads {counts:?}"
            );
        }
        // With enough partitions every node hosts something.
        if pc as usize >= ns.len() {
            assert_eq!(l.len(), ns.len(), "{ctx}: idle nodes: {l:?}");
        }
        gs
    }

    #[test]
    fn every_shape_keeps_the_group_properties() {
        for n in 1..=9usize {
            for zones in 1..=4usize {
                let ns = cluster(n, zones);
                for rf in 1..=(n.min(5) as u32) {
                    for pc in [1u32, 2, 3, 7, 16, 33] {
                        check(&ns, pc, rf);
                    }
                }
            }
        }
    }

    #[test]
    fn six_nodes_in_three_zones_rf3_one_zone_per_group() {
        let ns = cluster(6, 3);
        let gs = check(&ns, 12, 3);
        for g in &gs {
            assert_eq!(g.len(), 2, "{gs:?}");
            let zs: BTreeSet<_> = g.iter().map(|n| zone_of(&ns, n)).collect();
            assert_eq!(zs.len(), 1, "{gs:?}");
        }
        let l = loads(&place(&ns, 12, 3).unwrap());
        assert!(l.values().all(|&c| c == 6), "{l:?}");
    }

    #[test]
    fn twelve_nodes_in_three_zones_rf6_mix_zones_evenly() {
        let ns = cluster(12, 3);
        let gs = check(&ns, 24, 6);
        for g in &gs {
            assert_eq!(g.len(), 2, "{gs:?}");
            let zs: BTreeSet<_> = g.iter().map(|n| zone_of(&ns, n)).collect();
            assert_eq!(
                zs.len(),
                2,
                "a group of two nodes should mix two zones: {gs:?}"
            );
        }
        // Each zone's four nodes are spread over four groups.
        for z in ["z0", "z1", "z2"] {
            let holding = gs
                .iter()
                .filter(|g| g.iter().any(|n| zone_of(&ns, n) == z))
                .count();
            assert_eq!(holding, 4, "{z}: {gs:?}");
        }
        let l = loads(&place(&ns, 24, 6).unwrap());
        assert!(l.values().all(|&c| c == 12), "{l:?}");
    }

    #[test]
    fn five_nodes_rf2_give_uneven_groups_balanced_inside() {
        // Three zones of 2, 2 and 1 nodes: whole zones give groups of 3 and 2 nodes.
        let ns = cluster(5, 3);
        let gs = check(&ns, 12, 2);
        let mut sizes: Vec<usize> = gs.iter().map(BTreeSet::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![2, 3], "{gs:?}");
        let l = loads(&place(&ns, 12, 2).unwrap());
        for g in &gs {
            let per_node = 12 / g.len();
            assert!(g.iter().all(|n| l[n] == per_node), "{g:?}: {l:?}");
        }
        // One zone: group sizes 3 and 2 as well, zones are irrelevant.
        let one = cluster(5, 1);
        let mut sizes: Vec<usize> = check(&one, 7, 2).iter().map(BTreeSet::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![2, 3]);
    }

    #[test]
    fn whole_zones_are_dealt_to_the_smallest_group() {
        // Zones of 3, 1, 1 and 1 nodes with RF 2: {a} and {b, c, d}, three nodes each.
        let ns = nodes(&[
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("c1", "c"),
            ("d1", "d"),
        ]);
        let gs = check(&ns, 6, 2);
        let a: BTreeSet<String> = ["a1", "a2", "a3"].map(String::from).into();
        let rest: BTreeSet<String> = ["b1", "c1", "d1"].map(String::from).into();
        assert_eq!(gs, vec![a, rest]);
    }

    #[test]
    fn too_few_zones_spread_each_zone_over_the_groups() {
        // Two zones, RF 3: every zone appears in the groups as evenly as possible.
        let ns = nodes(&[
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("b2", "b"),
            ("b3", "b"),
        ]);
        let gs = check(&ns, 9, 3);
        for g in &gs {
            let zs: BTreeSet<_> = g.iter().map(|n| zone_of(&ns, n)).collect();
            assert_eq!((g.len(), zs.len()), (2, 2), "{gs:?}");
        }
    }

    #[test]
    fn small_stores_do_not_pile_on_each_groups_first_node() {
        let ns = cluster(6, 3);
        let a = place(&ns, 1, 3).unwrap();
        let gs = groups(&place(&ns, 12, 3).unwrap());
        // Partition 0's replica is not the same rank in every group.
        let ranks: BTreeSet<usize> = a[0]
            .iter()
            .zip(&gs)
            .map(|(n, g)| g.iter().position(|m| m == n).unwrap_or(usize::MAX))
            .collect();
        assert!(ranks.len() > 1, "{a:?} in {gs:?}");
    }

    #[test]
    fn placement_is_deterministic_regardless_of_input_order() {
        let ns = cluster(7, 3);
        let mut rev = ns.clone();
        rev.reverse();
        let mut rotated = ns.clone();
        rotated.rotate_left(3);
        for rf in 1..=4 {
            let a = place(&ns, 10, rf).unwrap();
            assert_eq!(a, place(&rev, 10, rf).unwrap());
            assert_eq!(a, place(&rotated, 10, rf).unwrap());
            assert_eq!(a, place(&ns, 10, rf).unwrap());
        }
        // A node listed twice with two zones resolves the same way in any order.
        let dup = nodes(&[("a", "x"), ("b", "y"), ("a", "z")]);
        let mut dup_rev = dup.clone();
        dup_rev.reverse();
        assert_eq!(place(&dup, 4, 2).unwrap(), place(&dup_rev, 4, 2).unwrap());
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
