#!/usr/bin/env bash
# Node-loss benchmark: on a local cluster of 4 storage servers (bench-cluster.sh) with an
# in-memory store of KEYS records of VALUE_BYTES (default 1,000,000 × 1 KB), 12 partitions,
# replication factor 3, server-1 is killed (SIGKILL) and the time until every partition has its
# three replicas ONLINE again (read from `rialto-admin`) is measured, with the controller's
# rebalance delay at DELAY seconds (default 10) and the servers' lease at 10 s. A reader
# (`rialto-loadgen run`, RATE batch-gets of 100 keys a second) runs throughout; its report says
# whether any read failed. Results in $OUT.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

KEYS="${KEYS:-1000000}"
VALUE_BYTES="${VALUE_BYTES:-1024}"
DELAY="${DELAY:-10}"
RATE="${RATE:-200}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"
SERVERS=4 CONTROLLER_ARGS="--rebalance-delay-seconds $DELAY" . scripts/bench-cluster.sh

RUST_LOG=warn "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" --store lost \
  --keys "$KEYS" --value-bytes "$VALUE_BYTES" --in-memory --replication 3 \
  2>>"$work/prepare.log" | tee "$OUT/push.txt"

restored() { # every partition of the current version: 3 ONLINE replicas, none on server-1, no move
  admin --json stores describe lost 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
v = next(v for v in d["versions"] if v["current"])
rec = v["record"]
online = {(r["partition"], r["node_id"]) for r in v["replicas"] if r["state"] == "ONLINE"}
ok = not rec.get("moves") and all(
    len(set(nodes)) == 3 and "server-1" not in nodes and all((p, n) in online for n in nodes)
    for p, nodes in enumerate(rec["assignment"]))
print("yes" if ok else "no")' 2>/dev/null || echo no
}

duration=$(( DELAY + 120 ))
"$bin/rialto-loadgen" --etcd "$etcd" run --store lost --keys "$KEYS" --batch-keys 100 --rate "$RATE" \
  --duration "${duration}s" --json "$OUT/reads.json" >"$OUT/reads.txt" 2>>"$work/loadgen.log" &
reader=$!
sleep 5
kill -9 "${server_pids[1]}"
server_pids[1]=0
killed=$(date +%s.%N)
echo "bench: server-1 killed; waiting for the replication factor to be restored"
until [ "$(restored)" = yes ]; do sleep 0.5; done
done_at=$(date +%s.%N)
python3 -c "print(f'bench: replication factor restored {float($done_at) - float($killed):.1f} s after the kill (delay $DELAY s, lease 10 s)')" \
  | tee "$OUT/restored.txt"
admin stores describe lost >"$OUT/describe.txt"
wait "$reader" || true
grep -E "errors|failed|p50|p99" "$OUT/reads.txt" | head -20 || true
