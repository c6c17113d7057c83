#!/usr/bin/env bash
# Starts and stops the external services of a local Rialto cluster: etcd and the Kafka-protocol
# broker tansu (sqlite storage, started from its data folder), on 127.0.0.1 only.
#
#   scripts/services.sh start  --dir DIR [--etcd-port 2379] [--etcd-peer-port 2380] [--kafka-port 9092]
#                              [--owner PID] [--etcd-tls-dir CERTS]
#   scripts/services.sh stop   --dir DIR
#   scripts/services.sh status --dir DIR
#
# Each service's PID is kept in DIR/<service>.pid and its log in DIR/<service>.log; `stop` kills
# exactly those PIDs. `start` waits until both services answer, and fails with the log tail if not.
# With `--owner PID`, a watcher stops both services once process PID is gone: a test binary that
# crashes or is killed does not leave its etcd and tansu running. With `--etcd-tls-dir` (a
# directory from `rialto-admin certs init`), etcd serves https with server.crt and requires
# client certificates signed by ca.crt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/env.sh"

cmd="${1:-}"; shift || true
dir=""; etcd_port=2379; etcd_peer_port=2380; kafka_port=9092; owner=; etcd_tls=
while (($#)); do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --etcd-port) etcd_port="$2"; shift 2 ;;
    --etcd-peer-port) etcd_peer_port="$2"; shift 2 ;;
    --kafka-port) kafka_port="$2"; shift 2 ;;
    --owner) owner="$2"; shift 2 ;;
    --etcd-tls-dir) etcd_tls="$2"; shift 2 ;;
    *) echo "services.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$dir" ] || { echo "services.sh: --dir is required" >&2; exit 2; }
if [ "$cmd" = start ]; then mkdir -p "$dir"; elif [ ! -d "$dir" ]; then
  [ "$cmd" = status ] && echo "etcd stopped" && echo "tansu stopped"
  exit 0 # nothing was started there (or it is already cleaned up)
fi
dir="$(cd "$dir" && pwd)"

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name, check command...
  local name="$1"; shift
  for _ in $(seq 1 150); do
    if "$@"; then return 0; fi
    if ! alive "$name"; then break; fi
    sleep 0.2
  done
  echo "services.sh: $name did not come up; last lines of $dir/$name.log:" >&2
  tail -20 "$dir/$name.log" >&2 || true
  return 1
}

stop_one() {
  local name="$1"
  if [ -f "$dir/$name.pid" ]; then
    local pid; pid="$(cat "$dir/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/$name.pid"
  fi
}

case "$cmd" in
  start)
    command -v etcd >/dev/null || { echo "services.sh: etcd not installed; run scripts/provision.sh" >&2; exit 1; }
    [ -x "$RIALTO_TOOLS/bin/tansu" ] || { echo "services.sh: tansu not installed; run scripts/provision.sh" >&2; exit 1; }
    scheme=http; etcd_tls_args=(); etcdctl_tls=()
    if [ -n "$etcd_tls" ]; then
      scheme=https
      etcd_tls_args=(--cert-file "$etcd_tls/server.crt" --key-file "$etcd_tls/server.key"
        --trusted-ca-file "$etcd_tls/ca.crt" --client-cert-auth)
      etcdctl_tls=(--cacert "$etcd_tls/ca.crt" --cert "$etcd_tls/server.crt" --key "$etcd_tls/server.key")
    fi
    if ! alive etcd; then
      mkdir -p "$dir/etcd"
      etcd --name rialto-test --data-dir "$dir/etcd" "${etcd_tls_args[@]}" \
        --listen-client-urls "$scheme://127.0.0.1:$etcd_port" --advertise-client-urls "$scheme://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
        --initial-cluster "rialto-test=http://127.0.0.1:$etcd_peer_port" \
        >"$dir/etcd.log" 2>&1 &
      echo $! >"$dir/etcd.pid"
    fi
    if ! alive tansu; then
      mkdir -p "$dir/tansu"
      (cd "$dir/tansu" && exec "$RIALTO_TOOLS/bin/tansu" broker \
        --listener-url "tcp://127.0.0.1:$kafka_port" \
        --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
        --storage-engine "sqlite://tansu.db") >"$dir/tansu.log" 2>&1 &
      echo $! >"$dir/tansu.pid"
    fi
    etcd_ok() { ETCDCTL_API=3 etcdctl --endpoints "$scheme://127.0.0.1:$etcd_port" "${etcdctl_tls[@]}" endpoint health >/dev/null 2>&1; }
    wait_for etcd etcd_ok
    wait_for tansu port_open "$kafka_port"
    if [ -n "$owner" ]; then
      # Detached, and off this script's stdout/stderr (callers read them to the end).
      setsid bash -c 'while kill -0 "$1" 2>/dev/null; do [ -d "$3" ] || exit 0; sleep 1; done; exec bash "$2" stop --dir "$3"' \
        watch-owner "$owner" "$here/services.sh" "$dir" </dev/null >/dev/null 2>&1 &
    fi
    echo "etcd  $scheme://127.0.0.1:$etcd_port (pid $(cat "$dir/etcd.pid"))"
    echo "kafka 127.0.0.1:$kafka_port (tansu, pid $(cat "$dir/tansu.pid"))"
    ;;
  stop)
    stop_one tansu
    stop_one etcd
    ;;
  status)
    for s in etcd tansu; do
      if alive "$s"; then echo "$s running (pid $(cat "$dir/$s.pid"))"; else echo "$s stopped"; fi
    done
    ;;
  *) echo "usage: services.sh start|stop|status --dir DIR [--etcd-port N] [--etcd-peer-port N] [--kafka-port N] [--owner PID]" >&2; exit 2 ;;
esac
