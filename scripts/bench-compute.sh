#!/usr/bin/env bash
# Read compute against batch-get on embeddings: KEYS keys (default 1,000,000) whose values are
# {index, embedding: DIMS floats} (default 256), in-memory, 12 partitions, replication factor 3,
# 3 storage servers on loopback. Open-loop 5,000-key requests (rialto-loadgen) at each of RATES,
# REPEAT rounds: `--mode batch` (whole values to the client) and `--mode compute` (a dot product
# with a query vector on the servers). Prints per mode and rate the median keys/s, p50 and p99,
# payload bytes per key (values, or results) and CPU per key of the servers and of the client.
# Everything started is stopped by PID at exit.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"
KEYS="${KEYS:-1000000}"; DIMS="${DIMS:-256}"; BATCH="${BATCH:-5000}"
RATES="${RATES:-10 20}"; DURATION="${DURATION:-15s}"; WARMUP="${WARMUP:-3s}"; REPEAT="${REPEAT:-3}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench-compute.XXXXXX)}"; mkdir -p "$work"
OUT="$work/results"; mkdir -p "$OUT"
. scripts/bench-cluster.sh
start=$(date +%s)
echo "bench: preparing $KEYS keys of $DIMS-float embeddings"
"$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" --store embeddings \
  --keys "$KEYS" --embedding-dims "$DIMS" --partitions 12 --replication 3 --kafka "$kafka" --in-memory
echo "bench: prepared in $(( $(date +%s) - start )) s"

server_cpu_ticks() { # CPU time (user + system, clock ticks) the servers have used so far
  local total=0 f
  for pid in "${server_pids[@]}"; do
    read -r -a f < "/proc/$pid/stat" && total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
run() { # mode rate round
  local name="$1-rate-$2-round-$3" ticks
  ticks=$(server_cpu_ticks)
  # `times` in the subshell: its children's CPU time (the load generator and client) on line 2.
  ( "$bin/rialto-loadgen" --etcd "$etcd" run --store embeddings --keys "$KEYS" --batch-keys "$BATCH" \
    --mode "$1" --embedding-dims "$DIMS" --rate "$2" --duration "$DURATION" --warmup "$WARMUP" \
    --tasks 4 --json "$OUT/$name.json" 2>>"$work/loadgen.log" >/dev/null; times > "$OUT/$name.times" )
  echo "$(( $(server_cpu_ticks) - ticks )) $(getconf CLK_TCK)" > "$OUT/$name.server-cpu"
}
run batch 10 settle; run compute 10 settle
for round in $(seq 1 "$REPEAT"); do
  for rate in $RATES; do
    for mode in batch compute; do echo "bench: $mode rate $rate round $round"; run "$mode" "$rate" "$round"; done
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, re, statistics, sys
out = sys.argv[1]
rows = {}
for path in glob.glob(f"{out}/*-rate-*-round-[0-9]*.json"):
    name = os.path.basename(path)[:-5]
    mode, rate = name.split("-")[0], int(name.split("-")[2])
    r = json.load(open(path))
    ticks, hz = map(int, open(f"{out}/{name}.server-cpu").read().split())
    # `times` line 2: children's user and system time, e.g. "0m12.345s 0m1.234s".
    child = open(f"{out}/{name}.times").read().splitlines()[1].split()
    secs = lambda t: int(t.split("m")[0]) * 60 + float(t.split("m")[1].rstrip("s"))
    keys = r["keys"]["found"] + r["keys"]["missing"] + r["keys"]["failed"]
    # CPU over the whole run (warmup included) per key of the measured phase, scaled by the
    # measured share of the requests.
    scheduled = r["requests"]["scheduled"]
    total_keys = keys * (1 + float(r["config"]["warmup_s"]) / float(r["config"]["duration_s"]))
    rows.setdefault((rate, mode), []).append({
        "keys_s": r["throughput"]["keys_per_s"],
        "p50": r["latency"]["p50_us"] / 1000, "p99": r["latency"]["p99_us"] / 1000,
        "bytes": r["keys"]["value_bytes"] / max(r["keys"]["found"], 1),
        "server_us": ticks / hz / total_keys * 1e6,
        "client_us": (secs(child[0]) + secs(child[1])) / total_keys * 1e6,
        "failed": r["requests"]["failed"], "wrong": r["keys"]["wrong_values"],
    })
print(f"{'rate':>5} {'mode':>8} {'keys/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'B/key':>7} {'server µs/key':>14} {'client µs/key':>14} {'failed':>6} {'errors':>6}")
for (rate, mode), runs in sorted(rows.items()):
    med = lambda k: statistics.median(x[k] for x in runs)
    print(f"{rate:>5} {mode:>8} {med('keys_s'):>8.0f} {med('p50'):>7.2f} {med('p99'):>7.2f} {med('bytes'):>7.1f} "
          f"{med('server_us'):>14.2f} {med('client_us'):>14.2f} {sum(x['failed'] for x in runs):>6} {sum(x['wrong'] for x in runs):>6}")
PY
