#!/usr/bin/env bash
# Large-fanout benchmark (issue 3): a local cluster of 3 storage servers on loopback, a store of
# KEYS keys of VALUE_BYTES bytes (12 partitions, replication factor 3), and open-loop batch-gets
# of BATCH keys at RATE requests/s through rialto-loadgen:
#   1. batch-get with group routing (fanout 1: each server holds a full copy)
#   2. streaming batch-get (time to first record vs full response)
#   3. batch-get without group routing (fanout 3)
#   4. batch-get with server-0 delayed by 200 ms (through its fault file), long-tail retry on
#   5. the same with long-tail retry off
# SUB_KEYS="5000 2500 1250" instead runs batch and streaming gets with each of these
# sub-request sizes (the client's sub_request_keys_max; default 2500), to compare them;
# RECEIVE_POOL="0 67108864" likewise compares the client's receive_pool_bytes; CHECKSUMS=1
# compares batch-gets with the client verifying every value's checksum (the default) and without.
# REPEAT rounds (default 3) of the runs; results go to $OUT (JSON per run) and a table of
# medians on stdout. Everything started is stopped by PID at exit. Bounded: each run lasts
# DURATION at RATE. STORAGE=on-disk|in-memory picks the store's profile (default on-disk).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

KEYS="${KEYS:-1000000}"
VALUE_BYTES="${VALUE_BYTES:-1024}"
BATCH="${BATCH:-5000}"
RATE="${RATE:-10}"
DURATION="${DURATION:-20s}"
WARMUP="${WARMUP:-3s}"
TASKS="${TASKS:-4}"
REPEAT="${REPEAT:-3}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"
. scripts/bench-cluster.sh

echo "bench: preparing $KEYS keys of $VALUE_BYTES bytes"
start=$(date +%s)
RUST_LOG=info "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" --store fanout \
  --keys "$KEYS" --value-bytes "$VALUE_BYTES" --partitions 12 --replication 3 --kafka "$kafka" \
  $([ "${STORAGE:-on-disk}" = in-memory ] && echo --in-memory)
echo "bench: prepared in $(( $(date +%s) - start )) s"

server_cpu_ticks() { # CPU time (user + system, clock ticks) the three servers have used so far
  local total=0 f
  for pid in "${server_pids[@]}"; do
    read -r -a f < "/proc/$pid/stat" && total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
run() { # name [extra args]
  local name=$1; shift
  echo "bench: run $name"
  server_phases > "$OUT/$name.server-before.json"
  local ticks=$(server_cpu_ticks)
  # `times` in the subshell: its children's CPU time (the load generator and client) on line 2.
  ( "$bin/rialto-loadgen" --etcd "$etcd" run --store fanout --keys "$KEYS" --batch-keys "$BATCH" \
    --rate "$RATE" --duration "${RUN_DURATION:-$DURATION}" --warmup "$WARMUP" --tasks "$TASKS" \
    --json "$OUT/$name.json" "$@" 2>>"$work/loadgen.log"; times > "$OUT/$name.times" )
  echo "$(( $(server_cpu_ticks) - ticks )) $(getconf CLK_TCK)" > "$OUT/$name.server-cpu"
  server_phases > "$OUT/$name.server-after.json"
}
# Right after the push the servers may still be settling: one unreported run first.
RUN_DURATION=15s run settle --mode batch
# REPEAT rounds of every run, interleaved so that drift on the shared machine hits all alike; the
# slow server is made slow (and healed) through its fault file, without a restart.
names=()
ab_flag=""
if [ -n "${SUB_KEYS:-}" ]; then
  ab_name=sub; ab_flag=--sub-request-keys; ab_values=$SUB_KEYS
elif [ -n "${RECEIVE_POOL:-}" ]; then
  ab_name=pool; ab_flag=--receive-pool-bytes; ab_values=$RECEIVE_POOL
fi
for round in $(seq 1 "$REPEAT"); do
  if [ -n "${CHECKSUMS:-}" ]; then
    names=(batch-checksums-verified batch-checksums-not-verified)
    run "batch-checksums-verified-$round" --mode batch
    run "batch-checksums-not-verified-$round" --mode batch --no-verify-checksums
    continue
  fi
  if [ -n "$ab_flag" ]; then
    for n in $ab_values; do
      run "batch-$ab_name-$n-$round" --mode batch "$ab_flag" "$n"
      run "stream-$ab_name-$n-$round" --mode stream "$ab_flag" "$n"
      [ "$round" = 1 ] && names+=("batch-$ab_name-$n" "stream-$ab_name-$n")
    done
    continue
  fi
  names=(batch stream batch-no-group-routing slow-server-long-tail-retry slow-server-no-retry)
  run "batch-$round" --mode batch
  run "stream-$round" --mode stream
  run "batch-no-group-routing-$round" --mode batch --no-group-routing
  echo '{"delay_ms": 200}' > "$work/server-0.faults"
  sleep 1 # the server polls its fault file every 200 ms
  run "slow-server-long-tail-retry-$round" --mode batch
  run "slow-server-no-retry-$round" --mode batch --no-long-tail-retry
  rm -f "$work/server-0.faults"
  sleep 1
done

python3 - "$OUT" "$REPEAT" "${names[@]}" <<'PY'
import json, os, statistics, sys
out, repeat, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"\nmedians of {repeat} run(s) each (min-max of p99 in brackets)")
print(f"{'run':30} {'req/s':>6} {'keys/s':>8} {'MB/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99 range':>15} {'ttfr p50':>8} {'fanout':>6} {'hedges':>6} {'won':>4} {'failed':>6}")
for name in names:
    runs = []
    for k in range(1, repeat + 1):
        path = os.path.join(out, f"{name}-{k}.json")
        if os.path.exists(path):
            runs.append(json.load(open(path)))
    if not runs:
        continue
    med = lambda f: statistics.median(f(r) for r in runs)
    p99s = [r["latency"]["p99_us"] / 1000 for r in runs]
    print(f"{name:30} {med(lambda r: r['throughput']['requests_per_s']):6.1f} "
          f"{med(lambda r: r['throughput']['keys_per_s']):8.0f} "
          f"{med(lambda r: r['throughput']['value_mb_per_s']):6.1f} "
          f"{med(lambda r: r['latency']['p50_us']) / 1000:7.1f} {statistics.median(p99s):7.1f} "
          f"{'[%.1f-%.1f]' % (min(p99s), max(p99s)):>15} "
          f"{med(lambda r: (r.get('time_to_first_record') or {}).get('p50_us') or 0) / 1000:8.1f} "
          f"{med(lambda r: (r.get('fanout') or {}).get('mean', 0)):6.2f} "
          f"{med(lambda r: r['retries']['long_tail_sent']):6.0f} {med(lambda r: r['retries']['long_tail_won']):4.0f} "
          f"{sum(r['requests']['failed'] for r in runs):6}")

# Server side of the same runs (warm-up included): mean time from a batch-get's arrival to its
# keys decoded, to its first chunk and to its last chunk handed to HTTP/2, over every server.
print("\nserver-side batch-get means in ms, median over runs")
print(f"{'run':30} {'request':>8} {'first chunk':>12} {'total':>8}")
for name in names:
    means = {"request": [], "first_chunk": [], "total": []}
    for k in range(1, repeat + 1):
        try:
            before = json.load(open(os.path.join(out, f"{name}-{k}.server-before.json")))
            after = json.load(open(os.path.join(out, f"{name}-{k}.server-after.json")))
        except (OSError, ValueError):
            continue
        for phase in means:
            s1, c1 = after.get(phase, [0, 0])
            s0, c0 = before.get(phase, [0, 0])
            if c1 > c0:
                means[phase].append((s1 - s0) / (c1 - c0) * 1000)
    if means["total"]:
        cells = " ".join(f"{statistics.median(means[p]):{w}.2f}" if means[p] else " " * w
                         for p, w in [("request", 8), ("first_chunk", 12), ("total", 8)])
        print(f"{name:30} {cells}")

# CPU per key over each whole run (warm-up and connection set-up included): the three servers
# (from /proc) and the load generator with its client (bash `times`).
def seconds(t):  # bash `times` format: 1m2.345s
    m, s = t.rstrip("s").split("m")
    return int(m) * 60 + float(s)
print("\nCPU µs per key read, median over runs")
print(f"{'run':30} {'servers':>8} {'client':>8}")
for name in names:
    servers, client = [], []
    for k in range(1, repeat + 1):
        try:
            r = json.load(open(os.path.join(out, f"{name}-{k}.json")))
            ticks, hz = map(int, open(os.path.join(out, f"{name}-{k}.server-cpu")).read().split())
            user, system = open(os.path.join(out, f"{name}-{k}.times")).read().splitlines()[1].split()
        except (OSError, ValueError, IndexError):
            continue
        c = r["config"]
        keys = c["rate_per_s"] * (c["duration_s"] + c["warmup_s"]) * c["batch_keys"]
        servers.append(ticks / hz / keys * 1e6)
        client.append((seconds(user) + seconds(system)) / keys * 1e6)
    if servers:
        print(f"{name:30} {statistics.median(servers):8.2f} {statistics.median(client):8.2f}")
PY
