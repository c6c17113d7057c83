# Sourced by the benchmark scripts: starts etcd, tansu, a controller and SERVERS (default 3)
# storage servers on free 127.0.0.1 ports, stopping everything by PID at exit. Expects `bin`,
# `work` and `OUT` set; CONTROLLER_ARGS adds controller flags.
# Defines: etcd, kafka, controller, start_server INDEX [ARGS], server_pids, admin ARGS,
# online_replicas STORE, server_phases. Server i follows the fault file $work/server-i.faults
# (absent: no faults; `echo '{"delay_ms": 200}' > $work/server-0.faults` slows server-0 down while
# it runs). SECURE=1 runs everything with mutual TLS and authorization (a local CA in
# $work/certs; every tool calls as `admin`, a cluster administrator).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); kafka_port=$(free_port); controller_port=$(free_port)
etcd="http://127.0.0.1:$etcd_port"; kafka="127.0.0.1:$kafka_port"; controller="http://127.0.0.1:$controller_port"

pids=()
SERVERS="${SERVERS:-3}"
server_pids=()
for i in $(seq 1 "$SERVERS"); do server_pids+=(0); done
cleanup() {
  for pid in "${pids[@]}" "${server_pids[@]}"; do [ "$pid" != 0 ] && kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}" "${server_pids[@]}"; do [ "$pid" != 0 ] && wait "$pid" 2>/dev/null || true; done
  bash scripts/services.sh stop --dir "$work/services" || true
  echo "bench: stopped; logs in $work, results in $OUT"
}
trap cleanup EXIT

bash scripts/services.sh start --dir "$work/services" --etcd-port "$etcd_port" --etcd-peer-port "$peer_port" --kafka-port "$kafka_port"
export RUST_LOG="${RUST_LOG:-warn}"
controller_tls=(); server_tls=(); curl_tls=(--http2-prior-knowledge); scheme=http
if [ "${SECURE:-0}" = 1 ]; then
  certs="$work/certs"
  "$bin/rialto-admin" certs init --dir "$certs" --client admin >/dev/null
  controller="https://127.0.0.1:$controller_port"; scheme=https
  controller_tls=(--tls-cert "$certs/controller.crt" --tls-key "$certs/controller.key"
    --tls-client-ca "$certs/ca.crt" --authorize --admin-principal admin)
  server_tls=(--tls-cert "$certs/server.crt" --tls-key "$certs/server.key"
    --tls-client-ca "$certs/ca.crt" --authorize)
  curl_tls=(--cacert "$certs/ca.crt" --cert "$certs/client-admin.crt" --key "$certs/client-admin.key")
  export RIALTO_CA_CERT="$certs/ca.crt" RIALTO_CERT="$certs/client-admin.crt" RIALTO_KEY="$certs/client-admin.key"
fi
# shellcheck disable=SC2086 # CONTROLLER_ARGS is a list of flags
"$bin/rialto-controller" --listen "127.0.0.1:$controller_port" --etcd "$etcd" --kafka "$kafka" \
  "${controller_tls[@]}" ${CONTROLLER_ARGS:-} >"$work/controller.log" 2>&1 &
pids+=($!)
start_server() { # index [extra args]
  local i=$1; shift
  local zone=(zone-a zone-b zone-c)
  "$bin/rialto-server" --node-id "server-$i" --zone "${zone[$((i % 3))]}" --listen "127.0.0.1:0" \
    --data-dir "$work/server-$i" --etcd "$etcd" --kafka "$kafka" \
    --fault-file "$work/server-$i.faults" "${server_tls[@]}" "$@" >>"$work/server-$i.log" 2>&1 &
  server_pids[$i]=$!
}
for i in $(seq 0 $((SERVERS - 1))); do start_server "$i"; done
admin() { "$bin/rialto-admin" --controller "$controller" "$@"; }
online_replicas() { # store: ONLINE replicas of its current version
  admin --json stores describe "$1" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(sum(1 for v in d["versions"] if v["current"] for r in v["replicas"] if r["state"] == "ONLINE"))' 2>/dev/null || echo 0
}
for _ in $(seq 1 100); do
  [ "$(admin --json nodes list 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)" = "$SERVERS" ] && break
  sleep 0.2
done

server_phases() { # the servers' batch-get latency histograms, summed: JSON {phase: [sum_s, count]}
  admin --json nodes list 2>/dev/null | python3 -c '
import json, sys
for n in json.load(sys.stdin): print(n["address"])' | while read -r address; do
    curl -s --max-time 5 "${curl_tls[@]}" "$scheme://$address/metrics" || true
  done | python3 -c '
import json, re, sys
phases = {}
for line in sys.stdin:
    m = re.match(r"rialto_server_batch_get_seconds_(sum|count)\{phase=\"(\w+)\"\} (\S+)", line)
    if m:
        kind, phase, value = m.groups()
        entry = phases.setdefault(phase, [0.0, 0])
        entry[0 if kind == "sum" else 1] += float(value)
print(json.dumps(phases))'
}
