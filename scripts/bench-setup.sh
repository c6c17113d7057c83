# Sourced first by every benchmark script: moves to the repository root, sets up the build
# environment (scripts/env.sh), installs what is missing (scripts/provision.sh), builds every
# target with the one shared profile and sets `bin` to the binaries' directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/env.sh
bash scripts/provision.sh
cargo build --workspace --all-targets --profile test -q
bin="$CARGO_TARGET_DIR/debug"
