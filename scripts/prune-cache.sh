#!/usr/bin/env bash
# Keeps the shared cargo target dir from growing without bound: every clone and every edit leaves
# incremental-compilation sessions and test executables behind (the dir reached 66 GB once).
# Removes incremental sessions and test/bench executables untouched for PRUNE_DAYS (default 2),
# and every incremental session once they take more than PRUNE_INCREMENTAL_GB;
# never touches compiled dependencies (.rlib/.rmeta/.so) or build-script outputs, so RocksDB's
# C++ is never rebuilt because of this.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
days="${PRUNE_DAYS:-2}"
debug="$CARGO_TARGET_DIR/debug"
[ -d "$debug" ] || exit 0
before=$(du -sm "$debug" | cut -f1)
if [ -d "$debug/incremental" ]; then
    find "$debug/incremental" -mindepth 1 -maxdepth 1 -mtime +"$days" -exec rm -rf {} +
    # Many clones and edits in one day outgrow the age rule (the disk once filled with 35 GB of
    # sessions): past PRUNE_INCREMENTAL_GB (default 8) every session goes; they only speed up
    # rebuilds of the workspace's own crates.
    limit_mb=$(( ${PRUNE_INCREMENTAL_GB:-8} * 1024 ))
    if [ "$(du -sm "$debug/incremental" | cut -f1)" -gt "$limit_mb" ]; then
        find "$debug/incremental" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    fi
fi
if [ -d "$debug/deps" ]; then
    # Test and bench executables: hashed names without an extension.
    find "$debug/deps" -maxdepth 1 -type f -perm -u+x -regextype posix-extended -regex '.*-[0-9a-f]{16}' \
        -mtime +"$days" -delete
fi
after=$(du -sm "$debug" | cut -f1)
echo "prune-cache: $debug ${before} MB -> ${after} MB"
