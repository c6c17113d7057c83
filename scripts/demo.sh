#!/usr/bin/env bash
# The main job on one machine: installs what is missing, builds, starts a local cluster (one
# controller, three storage servers in three zones, all on 127.0.0.1), creates a store, pushes a
# sample dataset of 20,000 records, reads every record back through the fast client and checks
# it against the input, writes to a hybrid store in real time and reads that back.
#
# By default the cluster is the embedded one (`rialto-local demo`): one process on the
# in-memory backends, no etcd and no broker to install or start.
# RIALTO_DEMO_BACKENDS=etcd-kafka runs the same on the production backends: etcd and tansu
# (a Kafka-protocol broker, built once per machine), a controller and three servers as
# separate processes, driven by rialto-admin, rialto-push and rialto-loadgen, all stopped (by
# PID) at the end.
# RIALTO_DEMO_TLS=1 (production backends) runs with TLS and authorization everywhere: a local
# CA (`rialto-admin certs init`), mutual TLS on the controller's API, the servers' reads and
# etcd (client certificates required), ACLs (`admin` is a cluster administrator; `reader` is
# refused until granted `read`), and signed pushes and real-time writes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
. scripts/env.sh
backends="${RIALTO_DEMO_BACKENDS:-memory}"
[ "${RIALTO_DEMO_TLS:-0}" = 1 ] && backends=etcd-kafka
case "$backends" in
  memory) bash scripts/provision.sh --without-broker ;;
  etcd-kafka) bash scripts/provision.sh ;;
  *) echo "demo: RIALTO_DEMO_BACKENDS must be memory or etcd-kafka, not $backends" >&2; exit 2 ;;
esac
bash scripts/prune-cache.sh
echo "demo: building binaries (target dir $CARGO_TARGET_DIR)"
# The same package and target selection and profile as scripts/test.sh (and `cargo test`): a
# different selection unifies features differently, and another profile name builds every
# dependency again; either would rebuild RocksDB and librdkafka from scratch.
cargo build --workspace --all-targets --profile test -q
bin="$CARGO_TARGET_DIR/debug"

RECORDS="${RIALTO_DEMO_RECORDS:-20000}"
if [ "$backends" = memory ]; then
  "$bin/rialto-local" demo --records "$RECORDS"
  echo "demo: OK"
  exit 0
fi
work="$(mktemp -d /tmp/rialto-demo.XXXXXX)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); kafka_port=$(free_port); controller_port=$(free_port)
etcd="http://127.0.0.1:$etcd_port"; kafka="127.0.0.1:$kafka_port"; controller="http://127.0.0.1:$controller_port"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  bash scripts/services.sh stop --dir "$work/services" || true
  echo "demo: stopped; logs and data are in $work"
}
trap cleanup EXIT

export RUST_LOG="${RUST_LOG:-info}"
controller_tls=(); server_tls=(); etcd_tls=()
if [ "${RIALTO_DEMO_TLS:-0}" = 1 ]; then
  certs="$work/certs"
  "$bin/rialto-admin" certs init --dir "$certs" --client admin --client reader >/dev/null
  echo "demo: TLS and authorization on; certificates in $certs"
  controller="https://127.0.0.1:$controller_port"
  # etcd serves https and takes only clients with a certificate of the cluster's CA.
  etcd="https://127.0.0.1:$etcd_port"; etcd_tls=(--etcd-tls-dir "$certs")
  controller_tls=(--tls-cert "$certs/controller.crt" --tls-key "$certs/controller.key"
    --tls-client-ca "$certs/ca.crt" --authorize --admin-principal admin
    --etcd-ca-cert "$certs/ca.crt" --etcd-cert "$certs/controller.crt" --etcd-key "$certs/controller.key")
  server_tls=(--tls-cert "$certs/server.crt" --tls-key "$certs/server.key"
    --tls-client-ca "$certs/ca.crt" --authorize
    --etcd-ca-cert "$certs/ca.crt" --etcd-cert "$certs/server.crt" --etcd-key "$certs/server.key")
  # rialto-admin, rialto-push and rialto-loadgen read these: the CA, and who is calling (to the
  # controller and the servers, and, for rialto-loadgen's client, to etcd).
  export RIALTO_CA_CERT="$certs/ca.crt" RIALTO_CERT="$certs/client-admin.crt" RIALTO_KEY="$certs/client-admin.key"
  export RIALTO_ETCD_CA_CERT="$certs/ca.crt" RIALTO_ETCD_CERT="$certs/client-admin.crt" RIALTO_ETCD_KEY="$certs/client-admin.key"
fi
echo "demo: starting etcd and tansu in $work/services"
bash scripts/services.sh start --dir "$work/services" --etcd-port "$etcd_port" --etcd-peer-port "$peer_port" \
  --kafka-port "$kafka_port" "${etcd_tls[@]}"
"$bin/rialto-controller" --listen "127.0.0.1:$controller_port" --etcd "$etcd" --kafka "$kafka" \
  "${controller_tls[@]}" >"$work/controller.log" 2>&1 &
pids+=($!)
for i in 0 1 2; do
  zone=(zone-a zone-b zone-c)
  "$bin/rialto-server" --node-id "server-$i" --zone "${zone[$i]}" --listen "127.0.0.1:0" \
    --data-dir "$work/server-$i" --etcd "$etcd" --kafka "$kafka" "${server_tls[@]}" \
    >"$work/server-$i.log" 2>&1 &
  pids+=($!)
done

admin() { "$bin/rialto-admin" --controller "$controller" "$@"; }
for _ in $(seq 1 100); do
  [ "$(admin --json nodes list 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)" = 3 ] && break
  sleep 0.2
done
echo; echo "demo: storage nodes"; admin nodes list

admin stores create demo --partitions 8 --replication-factor 2 \
  --key-schema '"string"' \
  --value-schema '{"type":"record","name":"Recommendation","fields":[{"name":"member","type":"long"},{"name":"items","type":{"type":"array","items":"long"}},{"name":"score","type":"double"}]}' >/dev/null
echo "demo: created store demo (8 partitions, replication factor 2)"

python3 - "$work/demo.jsonl" "$RECORDS" <<'PY'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"key": f"member-{i}", "value": {"member": i, "items": [i * 7 % 1000, i * 13 % 1000, i * 31 % 1000], "score": i / n}}) + "\n")
PY
echo "demo: pushing $RECORDS records"
"$bin/rialto-push" --controller "$controller" --store demo --input "$work/demo.jsonl"
echo; admin stores describe demo
echo; echo "demo: reading every record back through the fast client"
"$bin/rialto-loadgen" --etcd "$etcd" verify --store demo --input "$work/demo.jsonl" --batch 1000
echo -n "demo: get member-42 -> "
"$bin/rialto-loadgen" --etcd "$etcd" get --store demo --key '"member-42"'
if [ "${RIALTO_DEMO_TLS:-0}" = 1 ]; then
  as_reader() { RIALTO_CERT="$certs/client-reader.crt" RIALTO_KEY="$certs/client-reader.key" "$@"; }
  if as_reader "$bin/rialto-loadgen" --etcd "$etcd" get --store demo --key '"member-42"' 2>"$work/refused.txt"; then
    echo "demo: reader read without a grant"; exit 1
  fi
  echo "demo: reader without a grant -> $(grep -o 'principal `reader`[^;]*' "$work/refused.txt" | head -1)"
  admin acl grant demo --permissions read --principal reader
  sleep 0.5
  echo -n "demo: reader after the grant: get member-42 -> "
  as_reader "$bin/rialto-loadgen" --etcd "$etcd" get --store demo --key '"member-42"'
fi

echo; echo "demo: a hybrid store: real-time writes, no push"
admin stores create feed --partitions 4 --replication-factor 2 --key-schema '"string"' \
  --value-schema '"string"' --hybrid-rewind-seconds 3600 --hybrid-lag-records-max 1000 >/dev/null
for _ in $(seq 1 150); do
  admin --json stores describe feed | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["store"]["current_version"] is None)' && break
  sleep 0.2
done
printf '%s\n' '{"key": "member-42", "value": "changed jobs"}' '{"key": "member-7", "value": "joined"}' \
  '{"key": "member-7", "delete": true}' | "$bin/rialto-push" stream --controller "$controller" --store feed
for _ in $(seq 1 100); do
  got=$("$bin/rialto-loadgen" --etcd "$etcd" get --store feed --key '"member-42"')
  [ "$got" = '"changed jobs"' ] && break
  sleep 0.1
done
echo "demo: get member-42 from feed -> $got"
echo -n "demo: get member-7 from feed -> "
"$bin/rialto-loadgen" --etcd "$etcd" get --store feed --key '"member-7"'
[ "$got" = '"changed jobs"' ] || { echo "demo: the real-time write did not arrive"; exit 1; }
echo "demo: OK"
