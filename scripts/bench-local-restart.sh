#!/usr/bin/env bash
# Restart benchmark of the embedded default: `rialto-local serve` on a fresh data directory,
# KEYS records of 1 KB pushed through its gateway (`rialto-loadgen prepare`), the process killed
# with SIGKILL, started again on the same directory (time to "ready"), the store's records
# counted and two keys read back; then stopped with SIGTERM and started once more.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

KEYS="${KEYS:-100000}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench.XXXXXX)}"
data="$work/data"
pid=""
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true' EXIT

start() { # run-name: starts rialto-local serve, waits for "ready", sets controller and gateway
  local out="$work/serve.$1.out" t0 t1
  t0=$(date +%s%N)
  "$bin/rialto-local" serve --data-dir "$data" >"$out" 2>&1 &
  pid=$!
  until grep -q "ready" "$out"; do
    kill -0 "$pid" 2>/dev/null || { cat "$out"; exit 1; }
    sleep 0.02
  done
  t1=$(date +%s%N)
  controller=$(grep -o "controller http://[0-9.:]*" "$out" | cut -d' ' -f2)
  gateway=$(grep -o "rialto-local://[0-9.:]*" "$out")
  echo "bench: start $1: ready in $(( (t1 - t0) / 1000000 )) ms"
}
stop() { # signal
  kill "-$1" "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
}
read_back() {
  "$bin/rialto-loadgen" --etcd "$gateway" prepare --controller "$controller" --store bench \
    --keys "$KEYS" --value-bytes 1024 2>&1 | tail -1
  for i in 12345 $((KEYS - 1)); do
    key=$(printf '"key-%09d"' "$i")
    "$bin/rialto-loadgen" --etcd "$gateway" get --store bench --key "$key" | head -c 60
    echo
  done
}

start first
t0=$(date +%s%N)
"$bin/rialto-loadgen" --etcd "$gateway" prepare --controller "$controller" --store bench \
  --keys "$KEYS" --value-bytes 1024 --partitions 12 --replication 2 2>&1 | tail -1
echo "bench: push of $KEYS x 1 KB through the gateway: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
du -sh "$data/metadata.journal" "$data/topics"
stop 9
start "after SIGKILL"
read_back
stop TERM
start "after SIGTERM"
read_back
stop TERM
