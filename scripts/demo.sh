#!/usr/bin/env bash
# Runs the stickless demo; on a fresh Debian/Ubuntu machine it first installs a
# C toolchain and Rust (rustup) if they are missing.
#
#   bash scripts/demo.sh [demo options...]   # arguments go to `stickless demo`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ensure_cc
ensure_cargo
set_cargo_locked

log "cargo run --release ${CARGO_LOCKED[*]} -- demo $*"
exec cargo run --release "${CARGO_LOCKED[@]}" -- demo "$@"
