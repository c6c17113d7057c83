#!/usr/bin/env bash
# Hybrid-store benchmark: how long a real-time write takes to become readable, on a local cluster
# of 3 storage servers (bench-cluster.sh) with a hybrid store of PARTITIONS partitions (default
# 12) and replication factor 2. For each rate in RATES (writes/s; default 1000 and 10000):
# `rialto-loadgen freshness` for DURATION (default 20s), REPEAT rounds. Then a batch push of
# PUSH_KEYS records (default 200,000 × 100 B) while writes go on at SWAP_RATE (default 1000/s):
# the freshness of the writes across the swap, and the push's phases, the last one the time from
# the push written to the new version live (its replay and catch-up). JSON per run in $OUT.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

RATES="${RATES:-1000 10000}"
DURATION="${DURATION:-20s}"
REPEAT="${REPEAT:-2}"
PARTITIONS="${PARTITIONS:-12}"
PUSH_KEYS="${PUSH_KEYS:-200000}"
SWAP_RATE="${SWAP_RATE:-1000}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"
. scripts/bench-cluster.sh

admin stores create fresh --key-schema '"string"' --value-schema '"string"' \
  --partitions "$PARTITIONS" --replication-factor 2 --storage in-memory \
  --hybrid-rewind-seconds 3600 --hybrid-lag-records-max 1000 >/dev/null
for _ in $(seq 1 300); do
  [ "$(online_replicas fresh)" = "$((PARTITIONS * 2))" ] && break
  sleep 0.2
done
echo "bench: hybrid store fresh ready ($(online_replicas fresh) replicas online)"

fresh() { # name rate duration
  "$bin/rialto-loadgen" --etcd "$etcd" freshness --controller "$controller" --store fresh \
    --rate "$2" --duration "$3" --json "$OUT/$1.json" 2>>"$work/loadgen.log"
}
for round in $(seq 1 "$REPEAT"); do
  for rate in $RATES; do
    echo "bench: freshness at $rate writes/s, round $round"
    fresh "rate-$rate-$round" "$rate" "$DURATION"
  done
done

echo "bench: a push of $PUSH_KEYS records while writes go on at $SWAP_RATE/s"
python3 - "$work/push.jsonl" "$PUSH_KEYS" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"key": f"key-{i:09}", "value": "b" * 100}) + "\n")
PY
swap_duration=$(( (PUSH_KEYS / 4000) + 40 ))
fresh "swap" "$SWAP_RATE" "${swap_duration}s" &
fresh_pid=$!
sleep 5
"$bin/rialto-push" --controller "$controller" --store fresh --input "$work/push.jsonl" \
  >"$OUT/push.txt" 2>"$work/push.log"
wait "$fresh_pid"

python3 - "$OUT" "$REPEAT" $RATES <<'PY'
import json, os, statistics, sys
out, repeat, rates = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"\nfreshness, medians of {repeat} run(s), ms (max over runs for max)")
print(f"{'writes/s':>9} {'achieved':>9} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'lost':>5} {'pass':>6}")
def row(label, runs):
    med = lambda k: statistics.median(r[k] for r in runs)
    print(f"{label:>9} {med('achieved_rate'):9.0f} {med('p50_ms'):7.1f} {med('p90_ms'):7.1f} "
          f"{med('p99_ms'):7.1f} {med('p999_ms'):7.1f} {max(r['max_ms'] for r in runs):7.1f} "
          f"{sum(r['lost'] for r in runs):5} {med('reader_pass_ms'):6.1f}")
for rate in rates:
    runs = [json.load(open(os.path.join(out, f"rate-{rate}-{k}.json")))
            for k in range(1, repeat + 1) if os.path.exists(os.path.join(out, f"rate-{rate}-{k}.json"))]
    if runs:
        row(rate, runs)
swap = os.path.join(out, "swap.json")
if os.path.exists(swap):
    row("swap", [json.load(open(swap))])
    print("push during the writes: " + open(os.path.join(out, "push.txt")).read().strip())
PY
