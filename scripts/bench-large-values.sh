#!/usr/bin/env bash
# Large-value benchmark: values stored in chunks (over 768 KiB) and read back whole. On a local
# cluster of 3 storage servers (bench-cluster.sh), one in-memory store per value size (SIZES,
# bytes; default 512 KB, not chunked, for comparison, then 1, 4 and 16 MB), each with COUNT keys
# (default 16), 3 partitions and replication factor 3, no compression. For each size: single gets
# at GET_RATE requests/s and batch-gets of every key at BATCH_RATE requests/s, for DURATION each,
# REPEAT rounds interleaved. Prints medians of p50/p99 per size; JSON per run in $OUT.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

SIZES="${SIZES:-512000 1000000 4000000 16000000}"
COUNT="${COUNT:-16}"
GET_RATE="${GET_RATE:-20}"
BATCH_RATE="${BATCH_RATE:-1}"
DURATION="${DURATION:-10s}"
REPEAT="${REPEAT:-3}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"
. scripts/bench-cluster.sh

for size in $SIZES; do
  echo "bench: preparing $COUNT keys of $size bytes"
  RUST_LOG=info "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" \
    --store "large-$size" --keys "$COUNT" --value-bytes "$size" --partitions 3 --replication 3 \
    --kafka "$kafka" --in-memory 2>>"$work/prepare.log"
done
run() { # name store [args]
  local name=$1 store=$2; shift 2
  echo "bench: run $name"
  "$bin/rialto-loadgen" --etcd "$etcd" run --store "$store" --keys "$COUNT" --duration "$DURATION" \
    --warmup 2s --tasks 2 --request-timeout 30s --json "$OUT/$name.json" "$@" 2>>"$work/loadgen.log"
}
for round in $(seq 1 "$REPEAT"); do
  for size in $SIZES; do
    run "get-$size-$round" "large-$size" --mode get --rate "$GET_RATE"
    run "batch-$size-$round" "large-$size" --mode batch --batch-keys "$COUNT" --rate "$BATCH_RATE"
  done
done

python3 - "$OUT" "$REPEAT" "$COUNT" $SIZES <<'PY'
import json, os, statistics, sys
out, repeat, count, sizes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
print(f"\nmedians of {repeat} run(s) (p99 range in brackets)")
print(f"{'value bytes':>12} {'get p50 ms':>10} {'get p99 ms':>10} {'get p99 range':>15} "
      f"{'batch of ' + str(count) + ' p50':>16} {'p99 ms':>8} {'p99 range':>15} {'MB/s':>6} {'failed':>6}")
for size in sizes:
    def load(kind):
        runs = []
        for k in range(1, repeat + 1):
            path = os.path.join(out, f"{kind}-{size}-{k}.json")
            if os.path.exists(path):
                runs.append(json.load(open(path)))
        return runs
    get, batch = load("get"), load("batch")
    if not get or not batch:
        continue
    med = lambda runs, f: statistics.median(f(r) for r in runs)
    gp99 = [r["latency"]["p99_us"] / 1000 for r in get]
    bp99 = [r["latency"]["p99_us"] / 1000 for r in batch]
    failed = sum(r["requests"]["failed"] for r in get + batch)
    print(f"{int(size):>12} {med(get, lambda r: r['latency']['p50_us']) / 1000:10.2f} "
          f"{statistics.median(gp99):10.2f} {'[%.2f-%.2f]' % (min(gp99), max(gp99)):>15} "
          f"{med(batch, lambda r: r['latency']['p50_us']) / 1000:16.1f} {statistics.median(bp99):8.1f} "
          f"{'[%.1f-%.1f]' % (min(bp99), max(bp99)):>15} "
          f"{med(batch, lambda r: r['throughput']['value_mb_per_s']):6.1f} {failed:6}")
PY
