# Sourced first by every benchmark script: moves to the repository root, sets up the build
# environment (scripts/env.sh), installs what is missing (scripts/provision.sh), prunes the
# shared target dir as the test and demo scripts do (a day of benchmark edits once filled the
# disk), builds every target with the one shared profile and sets `bin` to the binaries' directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/env.sh
bash scripts/provision.sh
bash scripts/prune-cache.sh
cargo build --workspace --all-targets --profile test -q
bin="$CARGO_TARGET_DIR/debug"
