#!/usr/bin/env bash
# Installs what Rialto needs to build and test on a fresh Debian machine, skipping what is there:
#   - Debian packages: clang headers for bindgen, protoc for etcd-client, etcd server and client;
#   - the Kafka-protocol test broker `tansu` $TANSU_VERSION (built from crates.io into
#     $RIALTO_TOOLS, about 9 minutes the first time).
# Safe to run again: it only installs what is missing.
# --without-broker installs only what building needs (no etcd, no tansu): enough for the
# embedded default (`rialto-local`), which runs on the in-memory backends.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/env.sh"

with_broker=1
[ "${1:-}" = --without-broker ] && with_broker=0
packages=(libclang-dev protobuf-compiler libprotobuf-dev build-essential)
((with_broker)) && packages+=(etcd-server etcd-client)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "provision: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "provision: Debian packages present"
fi

if ((!with_broker)); then
  echo "provision: done (without etcd and the broker)"
  exit 0
fi
if [ -x "$RIALTO_TOOLS/bin/tansu" ] && "$RIALTO_TOOLS/bin/tansu" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "provision: tansu $TANSU_VERSION present"
else
  echo "provision: building tansu $TANSU_VERSION into $RIALTO_TOOLS (takes about 9 minutes)"
  mkdir -p "$RIALTO_TOOLS"
  cargo install --locked "tansu@$TANSU_VERSION" --features libsql \
    --root "$RIALTO_TOOLS" --target-dir "$RIALTO_CACHE/tansu-build"
fi
echo "provision: done"
