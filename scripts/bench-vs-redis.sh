#!/usr/bin/env bash
# Rialto against Redis on this machine, in one run (issue 24's table):
#   Redis 7 (Debian's redis-server, one thread, no persistence) holding KEYS keys of VALUE_BYTES
#   bytes, loaded with `redis-cli --pipe`, measured with `redis-benchmark`:
#     - MGET of BATCH random keys, 1 client, MGET_REQUESTS requests;
#     - GET of one random key, 8 clients, GET_REQUESTS requests;
#   Rialto: a local cluster (etcd, tansu, a controller, 3 storage servers on 127.0.0.1), an
#   in-memory store of the same KEYS × VALUE_BYTES (12 partitions, replication 3) pushed through
#   `rialto-loadgen prepare`, then open-loop `rialto-loadgen run`s of DURATION each:
#     - batch-gets of BATCH keys at each rate of BATCH_RATES (requests/s);
#     - single gets at each rate of GET_RATES, 8 tasks;
#     - single gets from 8 closed-loop callers (each sends its next get when the previous one
#       finished: redis-benchmark's GET clients, like for like), with the client's get
#       coalescing (its default) and without (`--no-coalesce-gets`: one request per get).
#   The load generator's runtime has GET_CLIENT_THREADS (1) threads for gets, as redis-benchmark
#   has one, and one per core for batch-gets (BATCH_CLIENT_THREADS: one thread saturates at
#   100 batch-gets/s of 5,000 keys).
# Redis is stopped before Rialto starts, so the two never share the CPU. Prints one table;
# JSON per run and the raw redis-benchmark output stay in $OUT. Bounded by the counts and
# durations above; everything started is stopped by PID at exit.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bench-setup.sh"

KEYS="${KEYS:-1000000}"
VALUE_BYTES="${VALUE_BYTES:-1024}"
BATCH="${BATCH:-5000}"
MGET_REQUESTS="${MGET_REQUESTS:-1000}"
GET_REQUESTS="${GET_REQUESTS:-1000000}"
BATCH_RATES="${BATCH_RATES:-60 100 120}"
GET_RATES="${GET_RATES:-20000 30000 45000}"
DURATION="${DURATION:-20s}"
GET_CLIENT_THREADS="${GET_CLIENT_THREADS:-1}"
BATCH_CLIENT_THREADS="${BATCH_CLIENT_THREADS:-$(nproc)}"
work="${WORK:-$(mktemp -d /tmp/rialto-bench-redis.XXXXXX)}"
OUT="${OUT:-$work/results}"
mkdir -p "$OUT"

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "bench: installing Debian's redis-server and redis-tools"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server redis-tools >/dev/null
fi

# --- Redis ---------------------------------------------------------------------------------
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "bench: Redis $(redis-server --version | grep -o 'v=[0-9.]*') on port $redis_port (pid $redis_pid)"
# The keys redis-benchmark draws with `-r KEYS`: key:000000000000 … (12 digits).
python3 - "$KEYS" "$VALUE_BYTES" > "$work/redis-load.resp" <<'PY'
import os, sys
keys, size = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout.buffer
value = os.urandom(size // 2).hex().encode()[:size].ljust(size, b"x")
head = b"*3\r\n$3\r\nSET\r\n$16\r\n"
tail = b"\r\n$%d\r\n%s\r\n" % (size, value)
for i in range(keys):
    out.write(head + b"key:%012d" % i + tail)
PY
start=$(date +%s.%N)
redis-cli -p "$redis_port" --pipe < "$work/redis-load.resp" > "$work/redis-load.log"
redis_load_s=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
rm -f "$work/redis-load.resp"
echo "bench: Redis loaded $(redis-cli -p "$redis_port" dbsize) keys in $redis_load_s s"
mget_args=()
for _ in $(seq 1 "$BATCH"); do mget_args+=("key:__rand_int__"); done
echo "bench: Redis MGET of $BATCH keys, 1 client, $MGET_REQUESTS requests"
redis-benchmark -p "$redis_port" -c 1 -n "$MGET_REQUESTS" -r "$KEYS" --csv MGET "${mget_args[@]}" \
  > "$OUT/redis-mget.csv"
echo "bench: Redis GET, 8 clients, $GET_REQUESTS requests"
redis-benchmark -p "$redis_port" -c 8 -n "$GET_REQUESTS" -r "$KEYS" -t get --csv > "$OUT/redis-get.csv"
kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true
trap - EXIT

# --- Rialto --------------------------------------------------------------------------------
. scripts/bench-cluster.sh
echo "bench: Rialto push of $KEYS keys of $VALUE_BYTES bytes (in-memory store)"
RUST_LOG=warn,rialto_push=info "$bin/rialto-loadgen" --etcd "$etcd" prepare --controller "$controller" \
  --store vsredis --keys "$KEYS" --value-bytes "$VALUE_BYTES" --partitions 12 --replication 3 \
  --in-memory --kafka "$kafka" 2>"$work/push.log" | tee "$OUT/push.txt"
run() { # name threads [args]
  local name=$1 threads=$2; shift 2
  echo "bench: Rialto $name"
  "$bin/rialto-loadgen" --worker-threads "$threads" --etcd "$etcd" run --store vsredis --keys "$KEYS" \
    --duration "${RUN_DURATION:-$DURATION}" --warmup 3s --json "$OUT/$name.json" "$@" 2>>"$work/loadgen.log" >/dev/null
}
RUN_DURATION=10s run settle "$BATCH_CLIENT_THREADS" --mode batch --rate 20 --batch-keys "$BATCH"
for rate in $BATCH_RATES; do
  run "batch-$rate" "$BATCH_CLIENT_THREADS" --mode batch --rate "$rate" --batch-keys "$BATCH" --tasks 4
done
for rate in $GET_RATES; do run "get-$rate" "$GET_CLIENT_THREADS" --mode get --rate "$rate" --tasks 8; done
run get-closed "$GET_CLIENT_THREADS" --mode get --closed-loop --tasks 8
run get-closed-alone "$GET_CLIENT_THREADS" --mode get --closed-loop --tasks 8 --no-coalesce-gets

python3 - "$OUT" "$BATCH" "$redis_load_s" "$BATCH_RATES" "$GET_RATES" <<'PY'
import csv, json, os, re, sys
out, batch, redis_load_s = sys.argv[1], int(sys.argv[2]), sys.argv[3]
batch_rates, get_rates = sys.argv[4].split(), sys.argv[5].split()
def redis(name):
    rows = list(csv.DictReader(open(os.path.join(out, name))))
    r = rows[0]
    return float(r["rps"]), float(r["p50_latency_ms"]), float(r["p99_latency_ms"])
def rialto(name):
    r = json.load(open(os.path.join(out, name + ".json")))
    t, l = r["throughput"], r["latency"]
    return t["requests_per_s"], t["keys_per_s"], l["p50_us"] / 1000, l["p99_us"] / 1000, r["requests"]["failed"]
mget_rps, mget_p50, mget_p99 = redis("redis-mget.csv")
get_rps, get_p50, get_p99 = redis("redis-get.csv")
push = open(os.path.join(out, "push.txt")).read()
m = re.search(r"read ([0-9.]+)(ms|s), produce ([0-9.]+)(ms|s), ingest ([0-9.]+)(ms|s)", push)
print()
print(f"{'workload':28} {'system':8} {'req/s':>9} {'keys/s':>9} {'p50 ms':>7} {'p99 ms':>7}  vs Redis keys/s, p99")
print(f"{'batch-get of %d keys' % batch:28} {'Redis':8} {mget_rps:9.0f} {mget_rps * batch:9.0f} {mget_p50:7.2f} {mget_p99:7.2f}")
for rate in batch_rates:
    rps, kps, p50, p99, failed = rialto(f"batch-{rate}")
    note = f" ({failed} failed)" if failed else ""
    print(f"{'':28} {'Rialto':8} {rps:9.0f} {kps:9.0f} {p50:7.2f} {p99:7.2f}  {kps / (mget_rps * batch):.2f}x, {p99 / mget_p99:.2f}x{note}")
print(f"{'single get, 8 callers':28} {'Redis':8} {get_rps:9.0f} {get_rps:9.0f} {get_p50:7.2f} {get_p99:7.2f}")
for rate in get_rates:
    rps, kps, p50, p99, failed = rialto(f"get-{rate}")
    note = f" ({failed} failed)" if failed else ""
    print(f"{'':28} {'Rialto':8} {rps:9.0f} {kps:9.0f} {p50:7.2f} {p99:7.2f}  {kps / get_rps:.2f}x, {p99 / get_p99:.2f}x{note}")
for name, label in [("get-closed", "  8 closed-loop callers"), ("get-closed-alone", "  the same, not coalesced")]:
    rps, kps, p50, p99, failed = rialto(name)
    note = f" ({failed} failed)" if failed else ""
    print(f"{label:28} {'Rialto':8} {rps:9.0f} {kps:9.0f} {p50:7.2f} {p99:7.2f}  {kps / get_rps:.2f}x, {p99 / get_p99:.2f}x{note}")
print(f"{'load of the keys':28} Redis `redis-cli --pipe` {redis_load_s} s; Rialto push: "
      + (f"read and sort {m.group(1)}{m.group(2)}, produce {m.group(3)}{m.group(4)}, ingest {m.group(5)}{m.group(6)}" if m else push.strip()))
PY
