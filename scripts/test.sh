#!/usr/bin/env bash
# Runs every Rialto test on this machine, installing what is missing first (Debian packages, the
# tansu broker). Integration tests start their own etcd and tansu on free 127.0.0.1 ports.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
. scripts/env.sh
bash scripts/provision.sh
bash scripts/prune-cache.sh
echo "test: building (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --profile test
cargo test --workspace --no-fail-fast -- --test-threads=2
