#!/usr/bin/env bash
# Large-fanout benchmark (issue 3): a local cluster of 3 storage servers on loopback, a store of
# KEYS keys of VALUE_BYTES bytes (12 partitions, replication factor 3), and open-loop batch-gets
# of BATCH keys at RATE requests/s through rialto-loadgen:
#   1. batch-get with group routing (fanout 1: each server holds a full copy)
#   2. streaming batch-get (time to first record vs full response)
#   3. batch-get without group routing (fanout 3)
#   4. batch-get with server-0 delayed by 200 ms, long-tail retry on
#   5. the same with long-tail retry off
# Results go to $OUT (JSON per run) and a summary table on stdout. Everything started is stopped
# by PID at exit. Bounded: each run lasts DURATION at RATE.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
. scripts/env.sh
bash scripts/provision.sh
cargo build --workspace --all-targets -q
bin="$CARGO_TARGET_DIR/debug"

KEYS="${KEYS:-1000000}"
VALUE_BYTES="${VALUE_BYTES:-1024}"
BATCH="${BATCH:-5000}"
RATE="${RATE:-10}"
DURATION="${DURATION:-20s}"
WARMUP="${WARMUP:-3s}"
TASKS="${TASKS:-4}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"
. scripts/bench-cluster.sh

echo "bench: preparing $KEYS keys of $VALUE_BYTES bytes"
start=$(date +%s)
RUST_LOG=info "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" --store fanout \
  --keys "$KEYS" --value-bytes "$VALUE_BYTES" --partitions 12 --replication 3 --kafka "$kafka"
echo "bench: prepared in $(( $(date +%s) - start )) s"

run() { # name [extra args]
  local name=$1; shift
  echo "bench: run $name"
  "$bin/rialto-loadgen" --etcd "$etcd" run --store fanout --keys "$KEYS" --batch-keys "$BATCH" \
    --rate "$RATE" --duration "${RUN_DURATION:-$DURATION}" --warmup "$WARMUP" --tasks "$TASKS" \
    --json "$OUT/$name.json" "$@" 2>>"$work/loadgen.log"
}
# Right after the push the servers are still compacting: one unreported run lets that settle.
RUN_DURATION=15s run settle --mode batch
run batch --mode batch
run stream --mode stream
run batch-no-group-routing --mode batch --no-group-routing

echo "bench: restarting server-0 with a 200 ms read delay"
kill "${server_pids[0]}"; wait "${server_pids[0]}" 2>/dev/null || true
start_server 0 --fault-delay-ms 200
restarted=$(date +%s)
for _ in $(seq 1 1500); do
  [ "$(online_replicas fanout)" = 36 ] && break
  sleep 0.2
done
echo "bench: $(online_replicas fanout) of 36 replicas ONLINE $(( $(date +%s) - restarted )) s after the restart"
run slow-server-long-tail-retry --mode batch
run slow-server-no-retry --mode batch --no-long-tail-retry

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"\n{'run':34} {'req/s':>7} {'keys/s':>9} {'MB/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'ttfr p50':>9} {'fanout':>6} {'hedges':>7} {'won':>5} {'failed':>6}")
for name in ["batch", "stream", "batch-no-group-routing", "slow-server-long-tail-retry", "slow-server-no-retry"]:
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    t, l = r["throughput"], r["latency"]
    ttfr = r.get("time_to_first_record") or {}
    f = r.get("fanout") or {}
    c = r["retries"]
    print(f"{name:34} {t['requests_per_s']:7.1f} {t['keys_per_s']:9.0f} {t['value_mb_per_s']:7.1f} "
          f"{l['p50_us']/1000:8.1f} {l['p99_us']/1000:8.1f} {(ttfr.get('p50_us') or 0)/1000:9.1f} "
          f"{f.get('mean', 0):6.2f} {c['long_tail_sent']:7} {c['long_tail_won']:5} "
          f"{r['requests']['failed']:6}")
PY
