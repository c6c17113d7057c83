#!/usr/bin/env bash
# Storage-engine benchmark on a local cluster (issue 5): 3 storage servers on loopback, two stores
# of KEYS keys of VALUE_BYTES bytes (12 partitions, RF 3) — one in-memory (PlainTable), one on-disk
# (block-based) — pushed through the real push job, then:
#   1. the push of each: read+sort, produce (the broker), and how long after the last record the
#      version was live (the servers' lag behind the broker);
#   2. open-loop batch-gets of BATCH keys at RATE requests/s on each store;
#   3. the same on the in-memory store while a new version (same data, new version number) is
#      pushed and swapped in, to see what the swap costs readers.
# Results go to $OUT (JSON per run) and a summary on stdout. Bounded: every run lasts DURATION, or
# SWAP_RUN for the steady and swap runs (long enough for the second push to go live).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

KEYS="${KEYS:-200000}"
VALUE_BYTES="${VALUE_BYTES:-1024}"
BATCH="${BATCH:-1000}"
RATE="${RATE:-20}"
DURATION="${DURATION:-20s}"
WARMUP="${WARMUP:-3s}"
TASKS="${TASKS:-4}"
SWAP_RUN="${SWAP_RUN:-120s}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench-storage.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"

. scripts/bench-cluster.sh

prepare() { # store [extra args]
  local store=$1; shift
  echo "bench: pushing $KEYS keys of $VALUE_BYTES bytes to $store $*"
  RUST_LOG=warn "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" --store "$store" \
    --keys "$KEYS" --value-bytes "$VALUE_BYTES" --partitions 12 --replication 3 --kafka "$kafka" "$@" \
    2>>"$work/prepare.log" | tee -a "$OUT/pushes.txt"
}
run() { # name store [extra args]
  local name=$1 store=$2; shift 2
  echo "bench: run $name"
  "$bin/rialto-loadgen" --etcd "$etcd" run --store "$store" --keys "$KEYS" --batch-keys "$BATCH" \
    --rate "$RATE" --duration "${RUN_DURATION:-$DURATION}" --warmup "$WARMUP" --tasks "$TASKS" --mode batch \
    --json "$OUT/$name.json" "$@" 2>"$OUT/$name.log"
}

prepare mem --in-memory
prepare disk
admin stores describe mem | tee "$OUT/describe-mem.txt"
admin stores describe disk | tee "$OUT/describe-disk.txt"
run in-memory mem
run on-disk disk
RUN_DURATION="$SWAP_RUN" run in-memory-steady mem

# The swap run: readers at the same rate while version 2 is pushed and goes live.
RUN_DURATION="$SWAP_RUN" run in-memory-during-push mem &
reader=$!
run_started=$(date +%s.%N)
sleep 5
prepare mem --in-memory --force-push
live_at=$(python3 -c "print(f'{$(date +%s.%N) - $run_started:.1f}')")
echo "bench: version 2 live ${live_at} s into the during-push run (its per-second max latencies: $OUT/in-memory-during-push.log)"
wait "$reader"
grep -E '^\[' "$OUT/in-memory-during-push.log" | sed -E 's/.*\[ *([0-9.]+)s (\w+)\].*max latency ([0-9.]+) ms/\1 \2 \3/' \
  | awk '{printf "%s%s", (NR>1?" ":""), $1"s:"$3"ms"} END {print ""}' | fold -w 120

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"\n{'run':26} {'req/s':>7} {'keys/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'failed':>6} {'wrong':>6}")
for name in ["in-memory", "on-disk", "in-memory-steady", "in-memory-during-push"]:
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    t, l = r["throughput"], r["latency"]
    print(f"{name:26} {t['requests_per_s']:7.1f} {t['keys_per_s']:9.0f} {l['p50_us']/1000:8.2f} "
          f"{l['p99_us']/1000:8.2f} {l['p999_us']/1000:9.2f} {l['max_us']/1000:8.2f} "
          f"{r['requests']['failed']:6} {r['keys']['wrong_values']:6}")
PY
