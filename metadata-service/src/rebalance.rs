//! Replica moves: replacing the replicas of a node that is gone for good or being drained, and
//! giving a new node its share (seed 02's delayed rebalance).
//!
//! A move is recorded in its version record ([`ReplicaMove`]): the target node hosts the
//! partition from the moment the move is written, bootstraps it from the version topic (kept
//! while the version is hosted) and, once its replica reports ONLINE, takes the old node's place
//! in the assignment ([`Action::CommitMove`]); the old node then drops its replica. So a replica
//! count never goes below what it was: the new replica is ONLINE before the old one leaves.
//!
//! * A node whose registration vanished (its lease expired) leaves the clients' routing at once,
//!   but its replicas are moved only after [`RebalanceConfig::delay`]: a server restarted within
//!   the delay keeps its replicas and resumes from its checkpoints. The delay runs from when
//!   *this* controller first saw the node missing, so a new leader waits a whole delay again
//!   rather than trusting a clock it did not keep.
//! * A drained node's replicas are moved at once; the node keeps serving them until each move
//!   commits.
//! * A node that hosts less than its group's share of the current version (a new node) receives
//!   replicas from the most loaded node of its group, until the counts differ by at most one.
//!   Current and backup versions are balanced (older kept versions are not), and only when no
//!   replica anywhere is waiting to be replaced.
//!
//! At most [`RebalanceConfig::moves_max`] moves are in flight across the cluster, replacements
//! first. Targets keep the group rule (see [`crate::placement`]): a replacement goes to another
//! node of the same group when one is usable, else to the least loaded node that does not
//! already hold the partition, preferring one whose zone the partition's other replicas do not
//! use. A move whose target replica fails is cancelled, and that node is not chosen again for
//! that replica for [`FAILED_TARGET_COOLDOWN`] (recorded in the version record, so a new
//! leader keeps to it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rialto_protocol::meta::{
    MoveReason, ReplicaMove, ReplicaState, StoreRecord, VersionRecord, VersionStatus,
};

use crate::reconcile::{kept_older_versions, Action, ClusterView};

/// Default wait before a lost node's replicas are placed elsewhere (seed 02: long enough for a
/// restart or a short maintenance, short enough that a second failure is unlikely meanwhile).
pub const REBALANCE_DELAY_DEFAULT: Duration = Duration::from_secs(300);
/// Default bound on moves in flight across the cluster.
pub const MOVES_MAX_DEFAULT: usize = 8;
/// How long a node whose replica failed as a move's target is not chosen again for that
/// replica (it was planned again every few seconds, and failed the same way).
pub const FAILED_TARGET_COOLDOWN: Duration = Duration::from_secs(600);

/// How the controller moves replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceConfig {
    /// How long a node must be missing before its replicas are moved.
    pub delay: Duration,
    /// Most moves in flight at once, across the cluster.
    pub moves_max: usize,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            delay: REBALANCE_DELAY_DEFAULT,
            moves_max: MOVES_MAX_DEFAULT,
        }
    }
}

/// The versions whose replicas are worth keeping whole: the current and backup versions, the
/// older ones the store keeps, and any version being pushed. (Any other ONLINE version is about
/// to be retired.)
pub fn hosted_versions<'a>(
    view: &'a ClusterView,
    store: &'a StoreRecord,
) -> impl Iterator<Item = &'a VersionRecord> + 'a {
    let kept = kept_older_versions(view, store);
    view.versions
        .range((store.name.clone(), 0)..=(store.name.clone(), u32::MAX))
        .map(|(_, v)| v)
        .filter(move |v| match v.status {
            VersionStatus::Pushing | VersionStatus::PushWritten => true,
            VersionStatus::Online => {
                store.current_version == Some(v.version)
                    || store.backup_version == Some(v.version)
                    || kept.contains(&v.version)
            }
            VersionStatus::Failed { .. } => false,
        })
}

/// What the planner knows about nodes.
struct Nodes<'a> {
    view: &'a ClusterView,
    delay_ms: i64,
    /// Node → replicas it hosts (assignment and move targets) over every hosted version, counting
    /// the moves planned in this pass.
    load: BTreeMap<String, usize>,
}

impl Nodes<'_> {
    fn live(&self, node: &str) -> bool {
        self.view.nodes.contains_key(node)
    }
    /// Live and not drained: may receive replicas.
    fn usable(&self, node: &str) -> bool {
        self.live(node) && !self.view.draining.contains(node)
    }
    /// Why `node`'s replicas must leave it now, if they must.
    fn evict(&self, node: &str) -> Option<MoveReason> {
        if self.view.draining.contains(node) {
            return Some(MoveReason::Drain);
        }
        if self.live(node) {
            return None;
        }
        let since = self.view.missing_ms.get(node).copied()?;
        (self.view.now_ms.saturating_sub(since) >= self.delay_ms).then_some(MoveReason::NodeLost)
    }
    fn zone(&self, node: &str) -> Option<&str> {
        self.view.nodes.get(node).map(|n| n.zone.as_str())
    }
}

/// A version's assignment with the moves in flight (recorded or planned in this pass).
struct Placement<'a> {
    record: &'a VersionRecord,
    /// (partition, group) → move target.
    moving: BTreeMap<(u32, u32), String>,
}

impl<'a> Placement<'a> {
    fn new(record: &'a VersionRecord) -> Placement<'a> {
        Placement {
            record,
            moving: record
                .moves
                .iter()
                .map(|m| ((m.partition, m.group), m.to.clone()))
                .collect(),
        }
    }
    /// Whether `node` holds or is receiving `partition`.
    fn holds(&self, partition: u32, node: &str) -> bool {
        let assigned = self
            .record
            .assignment
            .get(partition as usize)
            .is_some_and(|nodes| nodes.iter().any(|n| n == node));
        assigned
            || self
                .moving
                .iter()
                .any(|((p, _), to)| *p == partition && to == node)
    }
    /// The nodes at position `group` of any partition: the group's members.
    fn group_members(&self, group: u32) -> BTreeSet<&'a str> {
        self.record
            .assignment
            .iter()
            .filter_map(|nodes| nodes.get(group as usize).map(String::as_str))
            .collect()
    }
    /// The node at `(partition, group)` once the moves in flight are done.
    fn owner(&self, partition: u32, group: u32) -> Option<&str> {
        self.moving
            .get(&(partition, group))
            .map(String::as_str)
            .or_else(|| {
                self.record
                    .assignment
                    .get(partition as usize)
                    .and_then(|nodes| nodes.get(group as usize))
                    .map(String::as_str)
            })
    }
}

/// Plans the moves to start, commit and cancel, given the whole view.
pub fn plan_moves(view: &ClusterView, config: &RebalanceConfig) -> Vec<Action> {
    let mut nodes = Nodes {
        view,
        delay_ms: config.delay.as_millis().min(i64::MAX as u128) as i64,
        load: BTreeMap::new(),
    };
    let hosted: Vec<&VersionRecord> = view
        .stores
        .values()
        .flat_map(|s| hosted_versions(view, s))
        .collect();
    for v in &hosted {
        for (_, node) in v.hosted() {
            *nodes.load.entry(node.to_string()).or_default() += 1;
        }
    }
    let mut actions = Vec::new();
    let mut in_flight = 0usize;
    for v in &hosted {
        for m in &v.moves {
            match move_outcome(view, &nodes, v, m) {
                Some(action) => actions.push(action),
                None => in_flight += 1,
            }
        }
    }

    // Replicas that must leave their node: lost past the delay, or drained.
    let mut waiting = 0usize;
    for v in &hosted {
        let mut placement = Placement::new(v);
        for (p, replicas) in v.assignment.iter().enumerate() {
            let p = p as u32;
            for (g, node) in replicas.iter().enumerate() {
                let g = g as u32;
                let Some(reason) = nodes.evict(node) else {
                    continue;
                };
                if placement.moving.contains_key(&(p, g)) {
                    continue;
                }
                waiting += 1;
                if in_flight >= config.moves_max {
                    continue;
                }
                let Some(to) = choose_target(&nodes, &placement, p, g) else {
                    tracing::debug!(store = %v.store, version = v.version, partition = p, %node, "no node can take this replica");
                    continue;
                };
                in_flight += 1;
                waiting -= 1;
                actions.push(start(v, p, g, node, &to, reason, view.now_ms));
                *nodes.load.entry(to.clone()).or_default() += 1;
                placement.moving.insert((p, g), to);
            }
        }
    }
    if waiting > 0 || in_flight >= config.moves_max {
        return actions;
    }

    // A fair share for every node of the current and backup versions' groups (the backup is
    // what a rollback serves, and a hybrid one follows real-time writes like the current).
    let serving = view.stores.values().flat_map(|store| {
        [store.current_version, store.backup_version]
            .into_iter()
            .flatten()
            .filter_map(|n| view.versions.get(&(store.name.clone(), n)))
    });
    for v in serving {
        if v.status != VersionStatus::Online {
            continue;
        }
        let budget = config.moves_max - in_flight;
        let planned = balance(&nodes, v, budget, view.now_ms);
        in_flight += planned.len();
        actions.extend(planned);
        if in_flight >= config.moves_max {
            break;
        }
    }
    actions
}

/// What to do with a recorded move now: commit it once its target is ONLINE, cancel it when it
/// cannot complete, `None` to let it run.
fn move_outcome(
    view: &ClusterView,
    nodes: &Nodes<'_>,
    v: &VersionRecord,
    m: &ReplicaMove,
) -> Option<Action> {
    let cancel = |reason: String, target_failed: bool| {
        Some(Action::CancelMove {
            store: v.store.clone(),
            version: v.version,
            partition: m.partition,
            group: m.group,
            to: m.to.clone(),
            reason,
            target_failed,
        })
    };
    let from_now = v
        .assignment
        .get(m.partition as usize)
        .and_then(|nodes| nodes.get(m.group as usize));
    if from_now != Some(&m.from) {
        return cancel(
            format!(
                "the replica it replaces ({}) is no longer assigned there",
                m.from
            ),
            false,
        );
    }
    if !nodes.live(&m.to) {
        return cancel(format!("target node {} is not registered", m.to), false);
    }
    match view.replica(&v.store, v.version, m.partition, &m.to) {
        Some(r) if r.state == ReplicaState::Online => Some(Action::CommitMove {
            store: v.store.clone(),
            version: v.version,
            partition: m.partition,
            group: m.group,
            from: m.from.clone(),
            to: m.to.clone(),
        }),
        Some(r) if r.state == ReplicaState::Error => cancel(
            format!(
                "target replica failed: {}",
                r.error.as_deref().unwrap_or("ERROR")
            ),
            true,
        ),
        _ => None,
    }
}

fn start(
    v: &VersionRecord,
    partition: u32,
    group: u32,
    from: &str,
    to: &str,
    reason: MoveReason,
    now_ms: i64,
) -> Action {
    Action::StartMove {
        store: v.store.clone(),
        version: v.version,
        replica_move: ReplicaMove {
            partition,
            group,
            from: from.to_string(),
            to: to.to_string(),
            reason,
            started_ms: now_ms,
        },
    }
}

/// The node to receive `(partition, group)`: usable, not holding the partition; then in the
/// group, away from the zones of the partition's other replicas, least loaded, lowest id.
fn choose_target(
    nodes: &Nodes<'_>,
    placement: &Placement<'_>,
    partition: u32,
    group: u32,
) -> Option<String> {
    let members = placement.group_members(group);
    let other_zones: BTreeSet<&str> = placement
        .record
        .assignment
        .get(partition as usize)
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(g, n)| *g as u32 != group && nodes.live(n))
        .filter_map(|(_, n)| nodes.zone(n))
        .collect();
    let (store, version) = (&placement.record.store, placement.record.version);
    let failed: BTreeSet<&str> = nodes
        .view
        .failed_targets
        .keys()
        .filter(|(s, v, p, _)| s == store && *v == version && *p == partition)
        .map(|(_, _, _, n)| n.as_str())
        .collect();
    nodes
        .view
        .nodes
        .keys()
        .filter(|n| {
            nodes.usable(n) && !placement.holds(partition, n) && !failed.contains(n.as_str())
        })
        .min_by_key(|n| {
            let outside_group = !members.contains(n.as_str());
            let zone_clash = nodes.zone(n).is_some_and(|z| other_zones.contains(z));
            let load = nodes.load.get(n.as_str()).copied().unwrap_or(0);
            (outside_group, zone_clash, load, n.as_str())
        })
        .cloned()
}

/// Moves that even out each group of `v` (current, fully ONLINE, no replica to replace), at
/// most `budget`. A usable node in no group joins the group that has its zone, else the one
/// with the fewest usable members.
fn balance(nodes: &Nodes<'_>, v: &VersionRecord, budget: usize, now_ms: i64) -> Vec<Action> {
    // A node of this version that is missing (within the delay) may come back: wait.
    if v.hosted().any(|(_, n)| !nodes.usable(n)) {
        return Vec::new();
    }
    let mut placement = Placement::new(v);
    let groups = v.assignment.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let mut members: Vec<BTreeSet<String>> = (0..groups)
        .map(|g| {
            placement
                .group_members(g)
                .into_iter()
                .filter(|n| nodes.usable(n))
                .map(str::to_string)
                .collect()
        })
        .collect();
    if groups == 0 {
        return Vec::new();
    }
    let placed: BTreeSet<String> = members.iter().flatten().cloned().collect();
    for node in nodes.view.nodes.keys() {
        if !nodes.usable(node) || placed.contains(node) || v.hosted().any(|(_, n)| n == node) {
            continue;
        }
        let zone = nodes.zone(node);
        let g = (0..groups as usize)
            .find(|&g| members[g].iter().any(|m| nodes.zone(m) == zone))
            .unwrap_or_else(|| {
                (0..groups as usize)
                    .min_by_key(|&g| (members[g].len(), g))
                    .unwrap_or(0)
            });
        members[g].insert(node.clone());
    }
    let mut actions = Vec::new();
    for (g, group_members) in members.iter().enumerate() {
        let g = g as u32;
        let mut count: BTreeMap<&str, usize> =
            group_members.iter().map(|n| (n.as_str(), 0)).collect();
        for p in 0..v.assignment.len() as u32 {
            if let Some(c) = placement.owner(p, g).and_then(|n| count.get_mut(n)) {
                *c += 1;
            }
        }
        while actions.len() < budget {
            let Some((&most, &high)) = count
                .iter()
                .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
            else {
                break;
            };
            let Some((&least, &low)) = count.iter().min_by_key(|(n, c)| (**c, **n)) else {
                break;
            };
            if high <= low + 1 {
                break;
            }
            let Some(p) = (0..v.assignment.len() as u32).find(|&p| {
                !placement.moving.contains_key(&(p, g))
                    && placement.owner(p, g) == Some(most)
                    && !placement.holds(p, least)
            }) else {
                break;
            };
            actions.push(start(v, p, g, most, least, MoveReason::Balance, now_ms));
            placement.moving.insert((p, g), least.to_string());
            *count.entry(most).or_default() -= 1;
            *count.entry(least).or_default() += 1;
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use rialto_protocol::meta::{
        version_topic, Compression, NodeRecord, ReplicaRecord, StorageProfile, ValueFormat,
        ValueSchema, DEFAULT_MAX_VALUE_BYTES,
    };

    use super::*;

    const DELAY: Duration = Duration::from_secs(60);
    const NOW: i64 = 1_000_000;

    fn config(moves_max: usize) -> RebalanceConfig {
        RebalanceConfig {
            delay: DELAY,
            moves_max,
        }
    }

    fn node(id: &str, zone: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            address: format!("{id}:1"),
            zone: zone.into(),
            tls: false,
            started_ms: 0,
        }
    }

    /// A store with current version 1 placed as `assignment`, every replica ONLINE, and live
    /// nodes `live` (id, zone).
    fn view(assignment: Vec<Vec<&str>>, live: &[(&str, &str)]) -> ClusterView {
        let mut v = ClusterView {
            now_ms: NOW,
            ..ClusterView::default()
        };
        v.stores.insert(
            "s".into(),
            StoreRecord {
                name: "s".into(),
                owner: String::new(),
                key_schema: "\"string\"".into(),
                value_schemas: vec![ValueSchema {
                    id: 1,
                    schema: "\"string\"".into(),
                }],
                partition_count: assignment.len() as u32,
                replication_factor: assignment[0].len() as u32,
                storage: StorageProfile::OnDisk,
                compression: Compression::None,
                max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
                hybrid: None,
                created_ms: 0,
                current_version: Some(1),
                backup_version: None,
                largest_version: 1,
                deleting: false,
                read_quota_keys_per_s: None,
                storage_quota_bytes: None,
                versions_to_keep: 2,
            },
        );
        let record = VersionRecord {
            store: "s".into(),
            version: 1,
            topic: version_topic("s", 1),
            partition_count: assignment.len() as u32,
            assignment: assignment
                .iter()
                .map(|p| p.iter().map(|n| n.to_string()).collect())
                .collect(),
            status: VersionStatus::Online,
            created_ms: 0,
            storage: StorageProfile::OnDisk,
            compression: Compression::None,
            value_format: ValueFormat::Checksummed,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            hybrid: None,
            moves: vec![],
            pushed_by: None,
            sealed: false,
            producer: None,
            failed_targets: Vec::new(),
        };
        for (p, n) in record.replicas() {
            set_state(&mut v, p, n, ReplicaState::Online);
        }
        v.versions.insert(("s".into(), 1), record);
        for (id, zone) in live {
            v.nodes.insert(id.to_string(), node(id, zone));
        }
        v
    }

    fn set_state(v: &mut ClusterView, p: u32, n: &str, state: ReplicaState) {
        v.replicas.insert(
            ("s".into(), 1, p, n.into()),
            ReplicaRecord {
                state,
                offset: 0,
                records: 0,
                consumed_from: 0,
                updated_ms: 0,
                error: None,
                disk_bytes: 0,
                memory_bytes: 0,
                lag: None,
                leader: false,
                following: false,
            },
        );
    }

    fn starts(actions: &[Action]) -> Vec<(u32, u32, String, String, MoveReason)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StartMove {
                    replica_move: m, ..
                } => Some((m.partition, m.group, m.from.clone(), m.to.clone(), m.reason)),
                _ => None,
            })
            .collect()
    }

    /// Four nodes in two groups ({a, c} and {b, d}), four partitions.
    fn four_nodes(live: &[(&str, &str)]) -> ClusterView {
        view(
            vec![
                vec!["a", "b"],
                vec!["c", "d"],
                vec!["a", "b"],
                vec!["c", "d"],
            ],
            live,
        )
    }

    const ALL: [(&str, &str); 4] = [("a", "z1"), ("b", "z2"), ("c", "z1"), ("d", "z2")];

    #[test]
    fn a_lost_node_is_replaced_only_after_the_delay_and_within_its_group() {
        let mut v = four_nodes(&ALL[1..]);
        v.missing_ms.insert("a".into(), NOW - 1_000);
        assert!(plan_moves(&v, &config(8)).is_empty(), "within the delay");
        v.missing_ms
            .insert("a".into(), NOW - DELAY.as_millis() as i64);
        let planned = starts(&plan_moves(&v, &config(8)));
        assert_eq!(
            planned,
            vec![
                (0, 0, "a".into(), "c".into(), MoveReason::NodeLost),
                (2, 0, "a".into(), "c".into(), MoveReason::NodeLost),
            ]
        );
    }

    #[test]
    fn a_partition_that_lost_every_replica_is_placed_anew_in_each_group() {
        // `a` and `b` hold both replicas of partitions 0 and 2: after the delay each replica
        // goes to its group's other member, which bootstraps it from the version topic.
        let mut v = four_nodes(&[("c", "z1"), ("d", "z2")]);
        for lost in ["a", "b"] {
            v.missing_ms
                .insert(lost.into(), NOW - DELAY.as_millis() as i64);
        }
        let mut planned = starts(&plan_moves(&v, &config(8)));
        planned.sort_by_key(|&(partition, group, ..)| (partition, group));
        assert_eq!(
            planned,
            vec![
                (0, 0, "a".into(), "c".into(), MoveReason::NodeLost),
                (0, 1, "b".into(), "d".into(), MoveReason::NodeLost),
                (2, 0, "a".into(), "c".into(), MoveReason::NodeLost),
                (2, 1, "b".into(), "d".into(), MoveReason::NodeLost),
            ]
        );
    }

    #[test]
    fn moves_in_flight_are_bounded() {
        let mut v = four_nodes(&ALL[1..]);
        v.missing_ms.insert("a".into(), 0);
        assert_eq!(starts(&plan_moves(&v, &config(1))).len(), 1);
    }

    #[test]
    fn an_online_target_commits_and_an_errored_or_lost_one_is_cancelled() {
        let mut v = four_nodes(&ALL[1..]);
        v.missing_ms.insert("a".into(), 0);
        let record = v.versions.get_mut(&("s".into(), 1)).unwrap();
        for p in [0, 2] {
            record.moves.push(ReplicaMove {
                partition: p,
                group: 0,
                from: "a".into(),
                to: "c".into(),
                reason: MoveReason::NodeLost,
                started_ms: 0,
            });
        }
        // Bootstrapping: nothing to do, and no second move for the same slot.
        set_state(&mut v, 0, "c", ReplicaState::Bootstrap);
        assert!(plan_moves(&v, &config(8)).is_empty());
        set_state(&mut v, 0, "c", ReplicaState::Online);
        set_state(&mut v, 2, "c", ReplicaState::Error);
        let actions = plan_moves(&v, &config(8));
        assert!(actions.iter().any(|a| matches!(a, Action::CommitMove { partition: 0, from, to, .. } if from == "a" && to == "c")));
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::CancelMove {
                partition: 2,
                target_failed: true,
                ..
            }
        )));
        v.nodes.remove("c");
        let actions = plan_moves(&v, &config(8));
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(
                    a,
                    Action::CancelMove {
                        target_failed: false,
                        ..
                    }
                ))
                .count(),
            2,
            "a target gone is not a target that failed"
        );
    }

    #[test]
    fn a_target_whose_replica_failed_is_not_chosen_again_for_that_replica() {
        let mut v = four_nodes(&ALL[1..]);
        v.missing_ms.insert("a".into(), 0);
        v.failed_targets
            .insert(("s".into(), 1, 0, "c".into()), NOW - 1_000);
        let planned = starts(&plan_moves(&v, &config(8)));
        assert_eq!(
            planned,
            vec![
                (0, 0, "a".into(), "d".into(), MoveReason::NodeLost),
                (2, 0, "a".into(), "c".into(), MoveReason::NodeLost),
            ],
            "partition 0 goes elsewhere; partition 2 may still use c"
        );
        v.failed_targets
            .insert(("s".into(), 1, 0, "d".into()), NOW - 1_000);
        let planned = starts(&plan_moves(&v, &config(8)));
        assert_eq!(
            planned,
            vec![(2, 0, "a".into(), "c".into(), MoveReason::NodeLost)],
            "with every candidate failed, partition 0 waits"
        );
    }

    #[test]
    fn a_group_with_no_usable_member_takes_a_node_outside_it_that_lacks_the_partition() {
        // Groups {a} and {b, c}: losing `a` leaves group 0 empty.
        let mut v = view(
            vec![vec!["a", "b"], vec!["a", "c"]],
            &[("b", "z2"), ("c", "z3")],
        );
        v.missing_ms.insert("a".into(), 0);
        let planned = starts(&plan_moves(&v, &config(8)));
        assert_eq!(
            planned,
            vec![
                (0, 0, "a".into(), "c".into(), MoveReason::NodeLost),
                (1, 0, "a".into(), "b".into(), MoveReason::NodeLost),
            ]
        );
    }

    #[test]
    fn a_drained_node_is_emptied_at_once() {
        let mut v = four_nodes(&ALL);
        v.draining.insert("d".into());
        let planned = starts(&plan_moves(&v, &config(8)));
        assert_eq!(
            planned,
            vec![
                (1, 1, "d".into(), "b".into(), MoveReason::Drain),
                (3, 1, "d".into(), "b".into(), MoveReason::Drain),
            ]
        );
    }

    #[test]
    fn a_new_node_gets_a_fair_share_of_its_zones_group() {
        let mut live = ALL.to_vec();
        live.push(("e", "z2"));
        let v = view(
            vec![
                vec!["a", "b"],
                vec!["c", "d"],
                vec!["a", "b"],
                vec!["c", "d"],
                vec!["a", "b"],
                vec!["c", "d"],
            ],
            &live,
        );
        let planned = starts(&plan_moves(&v, &config(8)));
        // Group 1 ({b, d} in zone z2) has 3 + 3; with `e` it is 2 + 2 + 2.
        assert_eq!(
            planned,
            vec![
                (0, 1, "b".into(), "e".into(), MoveReason::Balance),
                (1, 1, "d".into(), "e".into(), MoveReason::Balance),
            ]
        );
    }

    #[test]
    fn the_backup_is_balanced_onto_a_new_node_too() {
        let mut live = ALL.to_vec();
        live.push(("e", "z2"));
        let mut v = view(
            vec![
                vec!["a", "b"],
                vec!["c", "d"],
                vec!["a", "b"],
                vec!["c", "d"],
            ],
            &live,
        );
        let mut backup = v.versions[&("s".to_string(), 1)].clone();
        backup.version = 2;
        backup.topic = version_topic("s", 2);
        v.versions.insert(("s".into(), 2), backup);
        let store = v.stores.get_mut("s").unwrap();
        (store.current_version, store.backup_version) = (Some(2), Some(1));
        let moved: Vec<(u32, String)> = plan_moves(&v, &config(8))
            .iter()
            .filter_map(|a| match a {
                Action::StartMove {
                    version,
                    replica_move,
                    ..
                } => Some((*version, replica_move.to.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            moved,
            vec![(2, "e".to_string()), (1, "e".to_string())],
            "the current version, then the backup"
        );
    }

    #[test]
    fn nothing_is_balanced_while_a_node_is_missing_within_the_delay() {
        let mut live = ALL[1..].to_vec();
        live.push(("e", "z1"));
        let mut v = four_nodes(&live);
        v.missing_ms.insert("a".into(), NOW);
        assert!(plan_moves(&v, &config(8)).is_empty());
    }
}
