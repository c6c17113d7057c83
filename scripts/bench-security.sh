#!/usr/bin/env bash
# What TLS and authorization cost: the same open-loop 5,000-key batch-gets (rialto-loadgen, 3
# storage servers on loopback, KEYS keys of VALUE_BYTES bytes, 12 partitions, replication
# factor 3) on a plaintext cluster and on one with mutual TLS and ACL checks on every read
# (SECURE=1 in bench-cluster.sh). REPEAT rounds per mode at each of RATES; prints the median
# keys/s and p50/p99 per mode and rate. Everything started is stopped by PID at exit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "${1:-}" != mode ]; then
  work="${WORK:-$(mktemp -d /tmp/rialto-bench-security.XXXXXX)}"
  for secure in 0 1; do
    SECURE=$secure WORK="$work/secure-$secure" bash "$here/bench-security.sh" mode
  done
  python3 - "$work" "${REPEAT:-3}" <<'PY'
import glob, json, os, statistics, sys
work = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{work}/secure-*/results/rate-*-round-*.json")):
    mode = "mTLS+ACL" if "secure-1" in path else "plaintext"
    rate = os.path.basename(path).split("-")[1]
    r = json.load(open(path))
    rows.setdefault((int(rate), mode), []).append(r)
print(f"{'rate':>6} {'mode':>10} {'keys/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
for (rate, mode), runs in sorted(rows.items()):
    med = lambda f: statistics.median(f(r) for r in runs)
    print(f"{rate:>6} {mode:>10} {med(lambda r: r['throughput']['keys_per_s']):>10.0f} "
          f"{med(lambda r: r['latency']['p50_us']) / 1000:>8.2f} "
          f"{med(lambda r: r['latency']['p99_us']) / 1000:>8.2f} "
          f"{sum(r['requests']['failed'] for r in runs):>7}")
PY
  exit 0
fi
. "$here/bench-setup.sh"
KEYS="${KEYS:-200000}"; VALUE_BYTES="${VALUE_BYTES:-1024}"; BATCH="${BATCH:-5000}"
RATES="${RATES:-20 60}"; DURATION="${DURATION:-15s}"; WARMUP="${WARMUP:-3s}"; REPEAT="${REPEAT:-3}"
mkdir -p "$WORK"; work="$WORK"; OUT="$work/results"; mkdir -p "$OUT"
. scripts/bench-cluster.sh
echo "bench: SECURE=${SECURE:-0}: preparing $KEYS keys of $VALUE_BYTES bytes"
"$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" --store guarded \
  --keys "$KEYS" --value-bytes "$VALUE_BYTES" --partitions 12 --replication 3 --kafka "$kafka" --in-memory
run() { # rate round
  "$bin/rialto-loadgen" --etcd "$etcd" run --store guarded --keys "$KEYS" --batch-keys "$BATCH" \
    --rate "$1" --duration "$DURATION" --warmup "$WARMUP" --tasks 4 --mode batch \
    --json "$OUT/rate-$1-round-$2.json" 2>>"$work/loadgen.log" >/dev/null
}
run 20 settle
for round in $(seq 1 "$REPEAT"); do
  for rate in $RATES; do echo "bench: SECURE=${SECURE:-0} rate $rate round $round"; run "$rate" "$round"; done
done
rm -f "$OUT"/rate-20-round-settle.json
