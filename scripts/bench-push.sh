#!/usr/bin/env bash
# Push benchmark: is the push job or the broker the bound? On a local cluster (etcd, tansu, a
# controller, 3 storage servers on 127.0.0.1), in one run:
#   1. the broker's own produce rate: `rialto-loadgen produce`, KEYS records of VALUE_BYTES
#      bytes to a 12-partition topic through the push job's Kafka client and settings, once
#      alone and once with 3 readers of every partition (what the 3 replicas of a version do
#      while it is pushed);
#   2. a real push of KEYS records of VALUE_BYTES-byte values (JSON lines, 12 partitions,
#      replication 3) through `rialto-loadgen prepare`, reporting its read-and-sort, produce and
#      go-live phases.
# Prints both and the ratio of the push's produce rate to the broker's. Bounded by KEYS
# (default 1,000,000); KAFKA_OPTIONS="k=v …" passes librdkafka properties to both the producer
# floor and the push (to compare settings). Everything started is stopped by PID at exit.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

KEYS="${KEYS:-1000000}"
VALUE_BYTES="${VALUE_BYTES:-1024}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench-push.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"
kafka_options=()
for o in ${KAFKA_OPTIONS:-}; do kafka_options+=(--kafka-option "$o"); done
. scripts/bench-cluster.sh

for readers in 0 3; do
  echo "bench: broker produce rate, $KEYS records of $VALUE_BYTES bytes, $readers readers"
  "$bin/rialto-loadgen" produce --kafka "$kafka" --records "$KEYS" --value-bytes "$VALUE_BYTES" \
    --partitions 12 --readers "$readers" "${kafka_options[@]}" --json "$OUT/produce-$readers.json" \
    2>>"$work/loadgen.log"
done
echo "bench: push of $KEYS records of $VALUE_BYTES bytes"
start=$(date +%s.%N)
RUST_LOG=warn,rialto_push=info "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" \
  --store push --keys "$KEYS" --value-bytes "$VALUE_BYTES" --partitions 12 --replication 3 \
  --kafka "$kafka" "${kafka_options[@]}" --dataset "$work/dataset.jsonl" 2>"$work/push.log" | tee "$OUT/push.txt"
echo "bench: push wall time $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s (dataset generation included)"
python3 - "$OUT/produce-0.json" "$OUT/produce-3.json" "$OUT/push.txt" "$KEYS" <<'PY'
import json, re, sys
alone = json.load(open(sys.argv[1]))
floor = json.load(open(sys.argv[2]))
text = open(sys.argv[3]).read()
keys = int(sys.argv[4])
def secs(name):
    m = re.search(name + r" ([0-9.]+)(ms|s)", text)
    if not m:
        return None
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
read, produce, live = secs("read"), secs("produce"), secs("ingest")
print(f"broker alone: {alone['records_per_second']:.0f} records/s ({alone['megabytes_per_second']:.1f} MB/s); "
      f"with 3 readers: {floor['records_per_second']:.0f} records/s ({floor['megabytes_per_second']:.1f} MB/s)")
if read and produce:
    print(f"push: read and sort {read:.1f} s = {keys / read:.0f} records/s; produce {produce:.1f} s = "
          f"{keys / produce:.0f} records/s = {keys / produce / floor['records_per_second']:.2f}x the broker's rate with 3 readers, "
          f"{keys / produce / alone['records_per_second']:.2f}x alone; ingest {live} s")
PY
