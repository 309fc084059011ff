# shellcheck shell=bash
# Shared helpers for scripts/test.sh and scripts/demo.sh. Source it; don't run it.
# Targets fresh Debian/Ubuntu machines: whatever is missing is installed with apt
# (as root, or through sudo) or, for Rust, with rustup.

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, otherwise through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run '$*', and sudo is not installed"
  fi
}

_apt_updated=0
# apt_install PKG...: non-interactive install; runs `apt-get update` once per script run.
apt_install() {
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found (not Debian/Ubuntu?): please install $* yourself"
  if [ "$_apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    _apt_updated=1
  fi
  log "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# version_ge A B: true when version A >= version B (e.g. 1.83.0 >= 1.80).
version_ge() {
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# A C compiler/linker: needed to link Rust binaries and to build `ring` (rustls).
ensure_cc() {
  if command -v cc >/dev/null 2>&1; then
    log "C compiler: $(command -v cc)"
  else
    log "no C compiler (cc): installing build-essential and pkg-config"
    apt_install build-essential pkg-config
  fi
}

_install_rustup() {
  command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
  log "installing Rust (stable) with rustup into ~/.cargo"
  # SKIP_PATH_CHECK: proceed even if an (old) distro rustc/cargo is already in /usr/bin.
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    RUSTUP_INIT_SKIP_PATH_CHECK=yes sh -s -- -y --profile minimal
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
  # Put ~/.cargo/bin first even if ~/.cargo/env decided it was already on PATH.
  PATH="$HOME/.cargo/bin:$PATH"
  export PATH
}

# Make sure `cargo` is on PATH and new enough for the crate's rust-version
# (the project needs a recent stable Rust; distro packages are usually too old).
ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      log "adding ~/.cargo/bin to PATH"
      PATH="$HOME/.cargo/bin:$PATH"
      export PATH
    else
      log "cargo not found"
      _install_rustup
    fi
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo still not found after installing Rust"

  local need have
  need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml 2>/dev/null | head -n1)
  have=$(_cargo_version)
  if [ -z "$have" ] || { [ -n "$need" ] && ! version_ge "$have" "$need"; }; then
    if [ -z "$have" ]; then
      log "cargo does not run (no default rustup toolchain?)"
    else
      log "Rust $have is older than the required $need"
    fi
    if command -v rustup >/dev/null 2>&1; then
      log "rustup toolchain install stable (used for this run via RUSTUP_TOOLCHAIN)"
      rustup toolchain install stable --profile minimal
      export RUSTUP_TOOLCHAIN=stable
    else
      # Most likely the distro's cargo: install rustup's stable in front of it.
      _install_rustup
    fi
    have=$(_cargo_version)
    [ -n "$have" ] || die "cargo does not run"
    [ -z "$need" ] || version_ge "$have" "$need" || die "Rust $have is still older than $need"
  fi
  log "Rust: $(cargo --version)"
}

# Prints cargo's version (e.g. 1.83.0), or nothing when cargo does not run.
_cargo_version() {
  local v
  v=$(cargo --version 2>/dev/null | awk '{print $2}') || true
  printf '%s\n' "${v%%-*}"
}

# ensure_cargo_component NAME COMPONENT: e.g. ensure_cargo_component fmt rustfmt
ensure_cargo_component() {
  if ! cargo "$1" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 ||
      die "'cargo $1' is not available and rustup is not installed to add $2"
    log "rustup component add $2"
    rustup component add "$2"
  fi
}

# Sets the array CARGO_LOCKED to (--locked) when Cargo.lock exists, so builds use
# the pinned dependencies, and to () otherwise.
# shellcheck disable=SC2034  # used by the scripts that source this file
set_cargo_locked() {
  CARGO_LOCKED=()
  if [ -f Cargo.lock ]; then
    CARGO_LOCKED=(--locked)
  fi
}
