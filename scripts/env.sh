# Shared settings for Rialto's scripts. Source it: `. scripts/env.sh`.
# Caches live outside the checkout so that a fresh clone reuses builds and tools of this machine.
export RIALTO_CACHE="${RIALTO_CACHE:-$HOME/.cache/rialto}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$RIALTO_CACHE/target}"
export RIALTO_TOOLS="${RIALTO_TOOLS:-$RIALTO_CACHE/tools}"
export TANSU_VERSION="0.6.0"
export PATH="$RIALTO_TOOLS/bin:$PATH"
