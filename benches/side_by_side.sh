#!/usr/bin/env bash
# Side-by-side benchmark: the backend direct, nginx as a plain reverse proxy, stickless on Redis and
# stickless on its embedded store, all on loopback, alternating and repeated. See benches/README.md.
#
#   bash benches/side_by_side.sh
#
# Settings (environment): ROUNDS=3 SECS=10 (throughput), LAT_ROUNDS=$ROUNDS LAT_SECS=$SECS (latency),
# LAT_PCTS="10 25 50 75" (latency rates, in % of the direct maximum), CONNS=32 THREADS=2,
# SESSIONS=100000 (Zipf workload), ZIPF_S=1.0, WRITE_PCT=5, ZIPF_WARM=$SECS (unmeasured seconds of
# the Zipf workload before each measured Zipf run), IDLE_CONNS=10000,
# LOCAL_CACHE=200000 (sessions the cached stickless keeps), DEADLINE=90m (the whole run), REPORT_NAME=side-by-side-<date>, NOTE="text put at the top of the report".
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

DEADLINE=${DEADLINE:-90m}
# The whole run is bounded: the script runs itself again under `timeout` (which signals the whole
# process group; the EXIT trap then stops every server).
if [ -z "${SIDE_BY_SIDE_BOUNDED:-}" ]; then
  export SIDE_BY_SIDE_BOUNDED=1
  exec timeout --kill-after=30s "$DEADLINE" bash "$SELF" "$@"
fi

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
LAT_ROUNDS=${LAT_ROUNDS:-$ROUNDS}
LAT_SECS=${LAT_SECS:-$SECS}
LAT_PCTS=${LAT_PCTS:-10 25 50 75}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
SESSIONS=${SESSIONS:-100000}
ZIPF_S=${ZIPF_S:-1.0}
WRITE_PCT=${WRITE_PCT:-5}
ZIPF_WARM=${ZIPF_WARM:-$SECS}
IDLE_CONNS=${IDLE_CONNS:-10000}
NOTE=${NOTE:-}
REPORT_NAME=${REPORT_NAME:-side-by-side-$(date -u +%F)}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

LOCAL_CACHE=${LOCAL_CACHE:-200000}
for setting in ROUNDS SECS LAT_ROUNDS LAT_SECS CONNS THREADS SESSIONS WRITE_PCT ZIPF_WARM IDLE_CONNS LOCAL_CACHE; do
  [[ ${!setting} =~ ^[0-9]+$ ]] || die "$setting must be a whole number (it is '${!setting}')"
done
for pct in $LAT_PCTS; do
  if ! [[ $pct =~ ^[0-9]+$ ]] || [ "$pct" -lt 1 ] || [ "$pct" -gt 100 ]; then
    die "LAT_PCTS must list percentages from 1 to 100 (it is '$LAT_PCTS')"
  fi
done
TARGETS=(direct nginx nginx-log sl-redis sl-redis-log sl-cache sl-mem sl-mem-log)
LAT_TARGETS=(direct nginx sl-redis sl-cache sl-mem)
STICKLESS=(sl-redis sl-redis-log sl-cache sl-mem sl-mem-log)
WORKLOADS=(no-cookie read read-write zipf)
LAT_WORKLOADS=(no-cookie read read-write)

# ---------------------------------------------------------------- tools

# Runs "$@" (an apt install) so that no package starts its service: without a policy-rc.d, a
# temporary one that refuses every start is put in place for the install.
without_service_start() {
  local policy=/usr/sbin/policy-rc.d rc=0
  if [ -e "$policy" ]; then
    "$@"
    return
  fi
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
  as_root chmod +x "$policy"
  "$@" || rc=$?
  as_root rm -f "$policy"
  return "$rc"
}

install_tools() {
  local pkgs=()
  command -v nginx >/dev/null 2>&1 || pkgs+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || pkgs+=(wrk)
  command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl)
  command -v python3 >/dev/null 2>&1 || pkgs+=(python3 python3-venv)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    without_service_start apt_install "${pkgs[@]}"
  fi
  ensure_cc
  ensure_cargo

  VENV=$TARGET_DIR/bench-venv
  if ! "$VENV/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
    log "creating $VENV with matplotlib"
    python3 -m venv "$VENV" || { apt_install python3-venv && python3 -m venv "$VENV"; }
    "$VENV/bin/pip" install -q matplotlib
  fi
  PY=$VENV/bin/python

  OHA=$TARGET_DIR/bench-tools/bin/oha
  if [ ! -x "$OHA" ]; then
    log "cargo install oha --locked --root $TARGET_DIR/bench-tools"
    cargo install oha --locked --root "$TARGET_DIR/bench-tools" ||
      log "oha did not build: latency will be wrk's (closed loop)"
  fi
  [ -x "$OHA" ] || OHA=""

  log "cargo build --release --locked"
  CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --locked
  BIN=$TARGET_DIR/release/stickless
}

# ---------------------------------------------------------------- processes

declare -A PID PORT
TMP=""
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PID[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PID[@]}"; do
    # nginx masters take their workers down with them; wait for every process we started.
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  [ -n "$TMP" ] && rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "stopped by a signal (DEADLINE=$DEADLINE reached, or interrupted)"; exit 143' INT TERM

free_port() { "$PY" benches/side_by_side/helper.py free-port; }

wait_http() { # URL: until it answers (20 s)
  for _ in $(seq 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  die "$1 did not answer in 20 s"
}

start_redis() {
  PORT[redis]=$(free_port)
  mkdir -p "$TMP/redis"
  redis-server --port "${PORT[redis]}" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$TMP/redis" --logfile "$TMP/redis/redis.log" &
  PID[redis]=$!
  for _ in $(seq 100); do redis-cli -p "${PORT[redis]}" PING >/dev/null 2>&1 && return; sleep 0.1; done
  die "redis-server did not start (see its log)"
}

# nginx_conf NAME SERVERS: an nginx config of its own (pid, logs, temp paths in $TMP/NAME), with
# the given server blocks; started in the foreground of a background job (no daemon, no service).
start_nginx() {
  local name=$1 servers=$2 dir=$TMP/$1
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<EOF
worker_processes auto;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections $NOFILE; }
http {
  access_log off;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
$servers
}
EOF
  nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
  PID[$name]=$!
}

start_all() {
  PORT[backend]=$(free_port)
  start_nginx backend "
  server {
    listen 127.0.0.1:${PORT[backend]};
    location / { return 200 \"ok\"; }
    location /incr { add_header X-Session-Incr-n 1; return 200 \"ok\"; }
    location /seed {
      add_header X-Session-Set-user alice; add_header X-Session-Set-role editor;
      add_header X-Session-Set-lang en-GB; add_header X-Session-Set-theme dark;
      add_header X-Session-Set-cart sku-12345x3;
      return 200 \"ok\";
    }
  }"
  PORT[nginx]=$(free_port)
  PORT[nginx-log]=$(free_port)
  start_nginx proxy "
  upstream backend { server 127.0.0.1:${PORT[backend]}; keepalive 64; }
  server {
    listen 127.0.0.1:${PORT[nginx]};
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }
  server {
    listen 127.0.0.1:${PORT[nginx-log]};
    access_log $TMP/proxy/logs/access.log combined buffer=64k flush=1s;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
  wait_http "http://127.0.0.1:${PORT[backend]}/"
  wait_http "http://127.0.0.1:${PORT[nginx]}/"

  start_redis
  KEY=$("$BIN" gen-key)
  local t
  for t in "${STICKLESS[@]}"; do
    PORT[$t]=$(free_port)
    PORT[$t-admin]=$(free_port)
    local access_log=off
    case $t in *-log) access_log=on ;; esac
    local args=(--listen "127.0.0.1:${PORT[$t]}" --admin-listen "127.0.0.1:${PORT[$t-admin]}"
      --upstream "http://127.0.0.1:${PORT[backend]}" --secret-keys "$KEY"
      --max-connections "$MAX_CONNS" --access-log "$access_log")
    case $t in sl-redis* | sl-cache*) args+=(--redis-url "redis://127.0.0.1:${PORT[redis]}") ;; esac
    # Every target runs stickless's default of one worker per core. The local cache is on by
    # default with Redis: off for sl-redis (every read goes to Redis), sized for the Zipf
    # workload's sessions for sl-cache.
    case $t in sl-redis*) args+=(--local-cache 0) ;; esac
    case $t in sl-cache*) args+=(--local-cache "$LOCAL_CACHE") ;; esac
    # The access log (on stderr) goes to a file, as nginx's does.
    "$BIN" "${args[@]}" >"$TMP/$t.log" 2>&1 &
    PID[$t]=$!
  done
  for t in "${STICKLESS[@]}"; do
    wait_http "http://127.0.0.1:${PORT[$t-admin]}/readyz"
  done
}

# ---------------------------------------------------------------- measurements

rss_kb() { # PID...: sum of VmRSS (or field $FIELD) in kB
  local field=${FIELD:-VmRSS} p sum=0 v
  for p in "$@"; do
    v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

nginx_pids() { # NAME: the master and its workers
  echo "${PID[$1]}"
  pgrep -P "${PID[$1]}" || true
}

cpu_ticks() { # PID...: utime + stime summed
  local p sum=0 v
  for p in "$@"; do
    v=$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)
    sum=$((sum + v))
  done
  echo "$sum"
}

# redis_snapshot FILE: "command calls" lines from INFO commandstats (INFO itself left out), and
# "_reads N": read events Redis processed (total_reads_processed).
redis_snapshot() {
  {
    redis-cli -p "${PORT[redis]}" INFO commandstats | tr -d '\r' |
      sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p' | grep -v '^info '
    redis-cli -p "${PORT[redis]}" INFO stats | tr -d '\r' |
      sed -n 's/^total_reads_processed:\([0-9]*\)/_reads \1/p'
  } >"$1"
}

# redis_per_request BEFORE AFTER REQUESTS: "name per-request" for each command that ran, then
# _commands (all, a script's own commands included), _scripts (EVAL, EVALSHA, FCALL) and _reads.
redis_per_request() {
  awk -v r="$3" '
    NR == FNR { before[$1] = $2; next }
    { d = $2 - before[$1]; if (d <= 0) next
      if ($1 == "_reads") { printf "_reads %.4f\n", d / r; next }
      all += d; if ($1 ~ /^(eval|evalsha|eval_ro|evalsha_ro|fcall|fcall_ro)$/) scripts += d
      printf "%s %.4f\n", $1, d / r }
    END { printf "_commands %.4f\n_scripts %.4f\n", all / r, scripts / r }' "$1" "$2"
}

redis_used_memory() {
  redis-cli -p "${PORT[redis]}" INFO memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)/\1/p'
}

# result_field NAME LINE: the number after NAME= in wrk's RESULT line
result_field() {
  local re="(^| )$1=([0-9]+)"
  [[ $2 =~ $re ]] || die "no $1 in wrk's output: $2"
  echo "${BASH_REMATCH[2]}"
}

record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

proxy_pids() { # TARGET
  case $1 in
    nginx*) nginx_pids proxy ;;
    sl-*) echo "${PID[$1]}" ;;
  esac
}

cookie_for() { # TARGET: the single session's cookie that target knows
  case $1 in
    sl-mem) cat "$TMP/mem.one" ;;
    sl-mem-log) cat "$TMP/memlog.one" ;;
    *) cat "$TMP/redis.one" ;;
  esac
}

zipf_for() {
  case $1 in
    sl-mem) echo "$TMP/zipf-mem.txt" ;;
    sl-mem-log) echo "$TMP/zipf-memlog.txt" ;;
    *) echo "$TMP/zipf-redis.txt" ;;
  esac
}

port_for() { if [ "$1" = direct ]; then echo "${PORT[backend]}"; else echo "${PORT[$1]}"; fi; }

# wrk_env WORKLOAD TARGET: the environment load.lua reads
wrk_env() {
  case $1 in
    no-cookie) echo "REQ_PATH=/" ;;
    read) echo "REQ_PATH=/ COOKIE=$(cookie_for "$2")" ;;
    read-write) echo "REQ_PATH=/incr COOKIE=$(cookie_for "$2")" ;;
    zipf) echo "COOKIE_FILE=$(zipf_for "$2")" ;;
  esac
}

throughput_run() { # TARGET WORKLOAD
  local t=$1 w=$2 url pids cpu0 cpu1 r0 r1 out req
  url="http://127.0.0.1:$(port_for "$t")/"
  if [ "$w" = zipf ] && [ "$ZIPF_WARM" -gt 0 ]; then
    # Unmeasured, the same for every target: a local cache starts the measured run holding the
    # hot sessions, as it does in service, instead of cold (its entries from the last round
    # have expired by then: they live an eighth of the idle timeout).
    # shellcheck disable=SC2046
    env $(wrk_env "$w" "$t") wrk -t"$THREADS" -c"$CONNS" -d"${ZIPF_WARM}s" \
      -s benches/side_by_side/load.lua "$url" >/dev/null
  fi
  read -r -a pids <<<"$(proxy_pids "$t" | tr '\n' ' ')"
  cpu0=$(cpu_ticks "${pids[@]}")
  r0=$(cpu_ticks "${PID[redis]}")
  redis_snapshot "$TMP/redis.before"
  # shellcheck disable=SC2046  # wrk_env prints NAME=VALUE words on purpose
  out=$(env $(wrk_env "$w" "$t") wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" \
    -s benches/side_by_side/load.lua "$url" | grep '^RESULT')
  redis_snapshot "$TMP/redis.after"
  cpu1=$(cpu_ticks "${pids[@]}")
  r1=$(cpu_ticks "${PID[redis]}")
  req=$(result_field requests "$out")
  local dur errors non2xx
  dur=$(result_field duration_us "$out")
  errors=$(result_field errors "$out")
  non2xx=$(result_field non2xx "$out")
  local rps
  rps=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  record tput "$t" "$w" - rps "$rps"
  record tput "$t" "$w" - errors "$errors"
  record tput "$t" "$w" - non2xx "$non2xx"
  if [ "$t" != direct ] && [ "$req" -gt 0 ]; then
    record tput "$t" "$w" - cpu_proxy "$(awk -v c=$((cpu1 - cpu0)) -v hz="$HZ" -v r="$req" \
      'BEGIN { printf "%.4f", c / hz / (r / 10000) }')"
    record tput "$t" "$w" - cpu_redis "$(awk -v c=$((r1 - r0)) -v hz="$HZ" -v r="$req" \
      'BEGIN { printf "%.4f", c / hz / (r / 10000) }')"
  fi
  if { [ "$t" = sl-redis ] || [ "$t" = sl-cache ]; } && [ "$req" -gt 0 ]; then
    local name value
    while read -r name value; do
      record tput "$t" "$w" - "redis:$name" "$value"
    done < <(redis_per_request "$TMP/redis.before" "$TMP/redis.after" "$req")
  fi
  printf '  %-13s %-11s %8s req/s  errors=%s non2xx=%s\n' "$t" "$w" "$rps" "$errors" "$non2xx"
}

latency_run() { # TARGET WORKLOAD PCT RATE
  local t=$1 w=$2 pct=$3 rate=$4 url headers=() path=/
  [ "$w" = read-write ] && path=/incr
  url="http://127.0.0.1:$(port_for "$t")$path"
  [ "$w" = no-cookie ] || headers=(-H "Cookie: sid=$(cookie_for "$t")")
  if [ -n "$OHA" ]; then
    "$OHA" -z "${LAT_SECS}s" -c "$CONNS" -q "$rate" --latency-correction -w --no-tui \
      --output-format json "${headers[@]}" "$url" >"$TMP/oha.json"
    "$PY" benches/side_by_side/helper.py oha-json "$TMP/oha.json" "$t" "$w" "$pct" >>"$RESULTS"
  else
    # Closed loop: wrk cannot hold a rate; the latency is at full speed, labelled as such.
    local out
    # shellcheck disable=SC2046
    out=$(env $(wrk_env "$w" "$t") wrk -t"$THREADS" -c"$CONNS" -d"${LAT_SECS}s" \
      -s benches/side_by_side/load.lua "$url" | grep '^RESULT')
    local m
    for m in p50_us p99_us p999_us; do
      record lat "$t" "$w" "$pct" "$m" "$(result_field "$m" "$out")"
    done
  fi
  printf '  %-13s %-11s %3s%% %7s/s  done\n' "$t" "$w" "$pct" "$rate"
}

# ---------------------------------------------------------------- the run

install_tools
# Open files for IDLE_CONNS connections in one process: 65536, or the hard limit when lower.
NOFILE=$(ulimit -Hn)
if [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ]; then NOFILE=65536; fi
[ "$NOFILE" -ge $((IDLE_CONNS + 1000)) ] ||
  die "the open-file limit (hard: $NOFILE) is too low for IDLE_CONNS=$IDLE_CONNS connections"
ulimit -n "$NOFILE"
MAX_CONNS=$((IDLE_CONNS + 1000))
HZ=$(getconf CLK_TCK)
TMP=$(mktemp -d /tmp/stickless-side-by-side.XXXXXX)
RESULTS=$TMP/results.tsv
: >"$RESULTS"
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

log "starting redis-server, the nginx backend, the nginx proxy and five stickless on loopback"
start_all
record mem sl-redis-idle - - value "$(rss_kb "${PID[sl-redis]}")"
record mem sl-mem-idle - - value "$(rss_kb "${PID[sl-mem]}")"
record mem nginx-idle - - value "$(read -r -a p <<<"$(nginx_pids proxy | tr '\n' ' ')"; rss_kb "${p[@]}")"

log "seeding $SESSIONS sessions (5 fields each) into Redis, in stickless's format"
mem0=$(redis_used_memory)
"$PY" benches/side_by_side/helper.py seed-redis "$KEY" "$SESSIONS" "$TMP/redis" |
  redis-cli -p "${PORT[redis]}" --pipe >/dev/null
mem1=$(redis_used_memory)
record mem redis-per-session - - value $(((mem1 - mem0) / (SESSIONS + 1)))
curl -fsS -o /dev/null -H "Cookie: sid=$(cat "$TMP/redis.one")" \
  -w '%{http_code}' "http://127.0.0.1:${PORT[sl-redis]}/" | grep -q 200 || die "seeded session not read"

log "seeding $SESSIONS sessions into each embedded store (through stickless, GET /seed)"
rss0=$(rss_kb "${PID[sl-mem]}")
"$PY" benches/side_by_side/helper.py seed-http "127.0.0.1:${PORT[sl-mem]}" "$SESSIONS" "$TMP/mem"
rss1=$(rss_kb "${PID[sl-mem]}")
record mem sl-mem-per-session - - value $(((rss1 - rss0) * 1024 / (SESSIONS + 1)))
"$PY" benches/side_by_side/helper.py seed-http "127.0.0.1:${PORT[sl-mem-log]}" "$SESSIONS" "$TMP/memlog"

log "Zipf samples (s=$ZIPF_S, $WRITE_PCT% writes)"
for s in redis mem memlog; do
  "$PY" benches/side_by_side/helper.py zipf "$TMP/$s.all" 200000 "$ZIPF_S" "$WRITE_PCT" 1 "$TMP/zipf-$s.txt"
done

log "throughput: $ROUNDS round(s) x ${#WORKLOADS[@]} workloads x ${#TARGETS[@]} targets x ${SECS}s"
for round in $(seq "$ROUNDS"); do
  log "round $round"
  for w in "${WORKLOADS[@]}"; do
    for t in "${TARGETS[@]}"; do
      throughput_run "$t" "$w"
    done
  done
done
record mem sl-redis-peak - - value "$(FIELD=VmHWM rss_kb "${PID[sl-redis]}")"
record mem nginx-peak - - value "$(read -r -a p <<<"$(nginx_pids proxy | tr '\n' ' ')"; FIELD=VmHWM rss_kb "${p[@]}")"

DIRECT_MAX=$(awk -F'\t' '$1 == "tput" && $2 == "direct" && $3 == "no-cookie" && $5 == "rps" { print $6 }' \
  "$RESULTS" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
declare -A RATE=()
for pct in $LAT_PCTS; do RATE[$pct]=$((DIRECT_MAX * pct / 100)); done
log "latency: direct maximum $DIRECT_MAX req/s; rates $(for pct in $LAT_PCTS; do printf '%s ' "${RATE[$pct]}"; done)req/s"
for round in $(seq "$LAT_ROUNDS"); do
  log "latency round $round"
  for w in "${LAT_WORKLOADS[@]}"; do
    for pct in $LAT_PCTS; do
      for t in "${LAT_TARGETS[@]}"; do
        latency_run "$t" "$w" "$pct" "${RATE[$pct]}"
      done
    done
  done
done

log "$IDLE_CONNS idle keep-alive connections"
for t in sl-redis nginx; do
  rm -f "$TMP/hold.ready"
  "$PY" benches/side_by_side/helper.py hold "127.0.0.1:$(port_for "$t")" "$IDLE_CONNS" "$TMP/hold.ready" &
  PID[hold]=$!
  for _ in $(seq 600); do [ -e "$TMP/hold.ready" ] && break; sleep 0.1; done
  ok=$(cat "$TMP/hold.ready" 2>/dev/null || echo 0)
  if [ "$ok" -ne "$IDLE_CONNS" ]; then
    die "only $ok of $IDLE_CONNS idle connections to $t were answered"
  fi
  # Idle, not just answered: stickless frees an HTTP/1 connection's buffers after 1 s of
  # idleness, and jemalloc gives the pages back after its 10 s dirty decay.
  sleep 12
  if [ "$t" = nginx ]; then
    record mem nginx-10k - - value "$(read -r -a p <<<"$(nginx_pids proxy | tr '\n' ' ')"; rss_kb "${p[@]}")"
  else
    record mem sl-redis-10k - - value "$(rss_kb "${PID[sl-redis]}")"
  fi
  kill "${PID[hold]}"
  wait "${PID[hold]}" || true
  unset 'PID[hold]'
done

# ---------------------------------------------------------------- the report

mkdir -p benches/results
MD=benches/results/$REPORT_NAME.md
PNG=benches/results/$REPORT_NAME.png
export LOCAL_CACHE NOTE ROUNDS SECS LAT_ROUNDS LAT_SECS LAT_PCTS CONNS THREADS SESSIONS ZIPF_S WRITE_PCT ZIPF_WARM IDLE_CONNS \
  LOAD_AT_START OHA PNG DIRECT_MAX
RATES=$(for pct in $LAT_PCTS; do printf '%s ' "${RATE[$pct]}"; done)
MACHINE="$(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1), $(uname -sr)"
VERSIONS="stickless $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo '+changes'), \
$(nginx -v 2>&1 | sed 's/.*version: //'), redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), \
$(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)${OHA:+, $("$OHA" --version)}"
export RATES MACHINE VERSIONS
"$PY" - "$TMP/meta.json" <<'EOF'
import datetime, json, os, sys
e = os.environ
rates = e["RATES"].split()
pcts = e["LAT_PCTS"].split()
oha = bool(e.get("OHA"))
meta = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "targets": ["direct", "nginx", "nginx-log", "sl-redis", "sl-redis-log", "sl-cache",
                "sl-mem", "sl-mem-log"],
    "labels": {
        "direct": "direct to the backend",
        "nginx": "nginx (access_log off)",
        "nginx-log": "nginx (access_log buffered 64k)",
        "sl-redis": "stickless, Redis, --local-cache 0 (--access-log off)",
        "sl-redis-log": "stickless, Redis, --local-cache 0 (--access-log on)",
        "sl-cache": f"stickless, Redis + --local-cache {e['LOCAL_CACHE']} (--access-log off)",
        "sl-mem": "stickless, embedded (--access-log off)",
        "sl-mem-log": "stickless, embedded (--access-log on)",
    },
    "workloads": ["no-cookie", "read", "read-write", "zipf"],
    "latency_workloads": ["no-cookie", "read", "read-write"],
    "latency_targets": ["direct", "nginx", "sl-redis", "sl-cache", "sl-mem"],
    "rates": dict(zip(pcts, rates)),
    "latency_tool": "oha, open loop" if oha else "wrk, CLOSED loop",
    "latency_note": (
        f"Rates are {'/'.join(pcts)}% of the direct maximum ({e['DIRECT_MAX']} req/s, the median of the "
        f"no-cookie runs direct to the backend). "
        + (f"oha, open loop (`-q RATE --latency-correction`, latency counted from when each request "
           f"was due), {e['CONNS']} connections, {e['LAT_SECS']} s per run, {e['LAT_ROUNDS']} round(s). "
           if oha else
           "oha was not available: these are wrk's CLOSED-loop latencies at full speed (the rate "
           "column does not apply), which hide queueing. ")
        + "Median (min-max) over rounds. A target that cannot reach the rate shows it in the "
          "achieved req/s column and in its latency (the backlog is counted)."),
    "connections": e["CONNS"], "threads": e["THREADS"], "secs": e["SECS"], "rounds": e["ROUNDS"],
    "memory_rows": [
        ["sl-redis-idle", "stickless (Redis) RSS idle, after start, kB"],
        ["sl-redis-peak", "stickless (Redis) peak RSS over the throughput runs (VmHWM), kB"],
        ["sl-redis-10k", f"stickless (Redis) RSS with {e['IDLE_CONNS']} open idle connections, kB"],
        ["nginx-idle", "nginx proxy RSS idle (master + workers), kB"],
        ["nginx-peak", "nginx proxy peak RSS over the throughput runs (sum of VmHWM), kB"],
        ["nginx-10k", f"nginx proxy RSS with {e['IDLE_CONNS']} open idle connections, kB"],
        ["sl-mem-idle", "stickless (embedded) RSS idle, before seeding, kB"],
        ["sl-mem-per-session", "stickless (embedded) RSS growth per session (5 fields), bytes"],
        ["redis-per-session", "Redis used_memory per session (5 fields + _created, TTL; seeded without _v), bytes"],
    ],
    "command": "bash benches/side_by_side.sh  # with " + ", ".join(
        f"{k}={e[k]}" for k in ("ROUNDS", "SECS", "LAT_ROUNDS", "LAT_SECS", "CONNS", "THREADS",
                                "SESSIONS", "ZIPF_S", "WRITE_PCT", "ZIPF_WARM", "IDLE_CONNS", "LOCAL_CACHE")) + f", LAT_PCTS=\"{e['LAT_PCTS']}\"",
    "chart_title": f"stickless side by side ({e['MACHINE']}; everything on one host)",
    "preamble": ([f"> **{e['NOTE']}**", ""] if e.get("NOTE") else []) + [
        f"- Machine: {e['MACHINE']}; load average at start {e['LOAD_AT_START']}. Everything on one host "
        "(load generator, nginx, Redis, stickless share the cores).",
        f"- Versions: {e['VERSIONS']}.",
        "- Backend: nginx `return 200 \"ok\"` (`/incr` adds `X-Session-Incr-n: 1`). nginx proxy: "
        "`proxy_pass` to an `upstream { keepalive 64; }`, `proxy_http_version 1.1`, "
        "`proxy_set_header Connection \"\"`, `worker_processes auto`. stickless: release build, "
        "default settings, `--max-connections IDLE_CONNS+1000`; its access log (when on) goes to a file.",
        "- Workloads: `no-cookie`; `read`: one session of 5 fields read on every request; `read-write`: "
        "the same session plus an increment on every request; `zipf`: "
        f"{e['SESSIONS']} sessions drawn from a Zipf distribution (s={e['ZIPF_S']}), "
        f"{e['WRITE_PCT']}% of requests increment; each measured Zipf run follows {e['ZIPF_WARM']} s of the same "
        "workload, unmeasured, on the same target (a local cache starts it warm, as in service). "
        "Direct and nginx get the same cookies (they ignore them).",
        f"- Chart: [{os.path.basename(e['PNG'])}]({os.path.basename(e['PNG'])}).",
    ],
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
"$PY" benches/side_by_side/helper.py report "$RESULTS" "$TMP/meta.json" "$MD" "$PNG"
cp "$RESULTS" "benches/results/$REPORT_NAME.tsv"

log "report: $MD (chart $PNG, raw numbers benches/results/$REPORT_NAME.tsv)"
sed -n '/^## Throughput/,/^## Latency/p' "$MD" | sed '$d'
sed -n '/^## Memory/,/^## Command/p' "$MD" | sed '$d'
