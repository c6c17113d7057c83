#!/usr/bin/env bash
# Keeps the shared cargo target dir from growing without bound: every clone and every edit leaves
# incremental-compilation sessions and test executables behind (the dir reached 66 GB once).
# Removes incremental sessions and test/bench executables untouched for PRUNE_DAYS (default 2),
# every incremental session once they take more than PRUNE_INCREMENTAL_GB, and all but the
# newest PRUNE_KEEP_EXECUTABLES executables of each test or bench;
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
    executables() {
        find "$debug/deps" -maxdepth 1 -type f -perm -u+x -regextype posix-extended \
            -regex '.*-[0-9a-f]{16}' "$@"
    }
    executables -mtime +"$days" -delete
    # An edit of a crate many tests link leaves a new executable of each (300-500 MB with debug
    # info), and a day of edits and clones outgrows the age rule (37 GB of them filled the disk
    # once): of each name only the newest PRUNE_KEEP_EXECUTABLES (default 2: this checkout's and
    # a CI clone's) stay.
    executables -printf '%T@ %p\n' | sort -rn \
        | awk -v keep="${PRUNE_KEEP_EXECUTABLES:-2}" \
            '{ name = $2; sub(/-[0-9a-f]+$/, "", name); if (++seen[name] > keep) print $2 }' \
        | xargs -r rm -f
fi
after=$(du -sm "$debug" | cut -f1)
echo "prune-cache: $debug ${before} MB -> ${after} MB"
