//! The deterministic simulation (`rialto_tests::sim`): many seeds, each a whole cluster with
//! faults, every read checked. `RIALTO_SIM_SEEDS=N` runs N seeds (default 100) starting at
//! `RIALTO_SIM_FIRST_SEED` (default 1); `RIALTO_SIM_SEED=S` runs seed S alone and prints its
//! trace.

use std::time::Instant;

use rialto_tests::sim;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn report_failure(report: &sim::SimReport) -> String {
    format!(
        "seed {} broke {} invariant(s):\n{}\n\nreplay: RIALTO_SIM_SEED={} cargo test --workspace --profile test -- simulated_clusters_keep_their_invariants --nocapture",
        report.seed,
        report.violations.len(),
        report.violations.join("\n"),
        report.seed
    )
}

#[test]
fn simulated_clusters_keep_their_invariants() {
    rialto_tests::init_logging();
    if let Some(seed) = env_u64("RIALTO_SIM_SEED") {
        let report = sim::run(seed);
        for line in &report.trace {
            println!("{line}");
        }
        assert!(report.violations.is_empty(), "{}", report_failure(&report));
        return;
    }
    let first = env_u64("RIALTO_SIM_FIRST_SEED").unwrap_or(1);
    let seeds = env_u64("RIALTO_SIM_SEEDS").unwrap_or(100);
    let started = Instant::now();
    let (mut reads, mut failed, mut simulated) = (0u64, 0u64, std::time::Duration::ZERO);
    for seed in first..first + seeds {
        let report = sim::run(seed);
        assert!(report.violations.is_empty(), "{}", report_failure(&report));
        assert_eq!(
            report.generations_live,
            3,
            "seed {seed}: not every push went live:\n{}",
            report.trace.join("\n")
        );
        reads += report.reads_ok;
        failed += report.reads_failed;
        simulated += report.simulated;
    }
    println!(
        "{seeds} seeds in {:.1?} ({:.2?} per seed): {reads} reads checked, {failed} failed, {:.0?} simulated",
        started.elapsed(),
        started.elapsed() / seeds as u32,
        simulated
    );
}

#[test]
fn a_seed_replays_the_same_schedule() {
    let (a, b) = (sim::run(7), sim::run(7));
    assert!(a.violations.is_empty(), "{}", report_failure(&a));
    let faults = |r: &sim::SimReport| -> Vec<String> {
        r.trace
            .iter()
            .filter(|l| l.contains("fault:") || l.contains("push g"))
            .map(|l| {
                l.split_once("  ")
                    .map_or(l.clone(), |(_, rest)| rest.to_string())
            })
            .collect()
    };
    assert_eq!(
        faults(&a),
        faults(&b),
        "the same seed chose different faults or pushes"
    );
    println!(
        "seed 7 twice: trace digests {:x} / {:x} ({} / {} steps)",
        a.trace_digest(),
        b.trace_digest(),
        a.trace.len(),
        b.trace.len()
    );
}
