#!/usr/bin/env bash
# End to end (issue 8, proof 6): the webhook_server example under loadgen,
# 200 concurrent users x 50 requests, in memory and on Redis; loadgen checks
# the invariants from the outside and exits non-zero on any violation.
# On Redis a second run kills the server with SIGKILL mid-burst and restarts
# it on the same Redis and port: every accepted webhook must still be
# processed exactly once (loadgen --survive-restart, durable counters).
#
#   scripts/e2e.sh          CI run: memory, then Redis (dev build)
#   scripts/e2e.sh bench    throughput with raceguard's layers on vs off
#                           (release build, memory backend; not run in CI)
#
# Environment: E2E_USERS, E2E_REQUESTS (default 200 x 50); E2E_PROFILE
# (dev|release; default dev for CI, release for bench); E2E_BENCH_ROUNDS
# (default 3); RACEGUARD_REQUIRE_REDIS=1 fails instead of skipping the Redis
# run when redis-server is missing.
#
# Only 127.0.0.1. No sleeps as synchronisation: readiness is polled with a
# bounded number of tries; every process started here is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-ci}
case "$mode" in
  ci | bench) ;;
  *)
    echo "usage: scripts/e2e.sh [ci|bench]" >&2
    exit 2
    ;;
esac
users=${E2E_USERS:-200}
requests=${E2E_REQUESTS:-50}
if [ "$mode" = bench ]; then profile=${E2E_PROFILE:-release}; else profile=${E2E_PROFILE:-dev}; fi

say() { printf '\n== e2e: %s\n' "$*"; }

workdir=$(mktemp -d "${TMPDIR:-/tmp}/raceguard-e2e.XXXXXX")
server_pid=""
redis_pid=""
loadgen_pid=""

# Stops one process we started: SIGTERM, bounded wait, then SIGKILL.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "e2e: process $pid ignored SIGTERM for 30 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  stop_pid "$loadgen_pid"
  stop_pid "$server_pid"
  stop_pid "$redis_pid"
  if [ $rc -ne 0 ] && [ -f "$workdir/server.log" ]; then
    echo "---- last server log lines" >&2
    tail -n 30 "$workdir/server.log" >&2 || true
  fi
  rm -rf "$workdir"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback TCP port.
free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 40000))
    # A refused connection means nothing listens there.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "e2e: no free port found" >&2
  return 1
}

# GET http://$1$2 succeeds with 200 (curl if present, else bash /dev/tcp).
http_ok() {
  local hostport=$1 path=$2
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 2 "http://$hostport$path" 2>/dev/null
    return
  fi
  local host=${hostport%:*} port=${hostport##*:} status
  exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || return 1
  printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
  IFS= read -r -t 2 status <&3 || status=""
  exec 3<&- 3>&-
  [[ "$status" == "HTTP/1.1 200"* ]]
}

build() {
  say "build ($profile): webhook_server + loadgen"
  local flag=()
  [ "$profile" = release ] && flag=(--release)
  cargo build "${flag[@]}" --all-features --example webhook_server --example loadgen
  bin="target/$([ "$profile" = release ] && echo release || echo debug)/examples"
}

# GET http://$1$2: the body on stdout (curl if present, else bash /dev/tcp).
http_body() {
  local hostport=$1 path=$2
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 2 "http://$hostport$path" 2>/dev/null
    return
  fi
  local host=${hostport%:*} port=${hostport##*:}
  exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || return 1
  printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&- 3>&-
}

# A top-level integer field of the server's /stats JSON (the nested objects,
# which hold fields of the same names, are removed first).
stat_field() {
  sed -E 's/"(durable|limits)":\{[^}]*\}//g' <<<"$1" | grep -o "\"$2\":[0-9]*" | head -n 1 | cut -d: -f2
}

# Starts the server with the given flags and waits until /healthz answers
# (on $listen if set, else on any free port).
start_server() {
  rm -f "$workdir/addr"
  "$bin/webhook_server" --addr "${listen:-127.0.0.1:0}" --addr-file "$workdir/addr" "$@" \
    >>"$workdir/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 300); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "e2e: webhook_server exited during start-up" >&2
      cat "$workdir/server.log" >&2
      server_pid=""
      return 1
    fi
    if [ -s "$workdir/addr" ] && http_ok "$(cat "$workdir/addr")" /healthz; then
      addr=$(cat "$workdir/addr")
      echo "e2e: server ready on $addr ($*)"
      return 0
    fi
    sleep 0.1
  done
  echo "e2e: webhook_server not ready after 30 s" >&2
  return 1
}

# SIGTERM, then the server must drain its queue and exit 0.
stop_server() {
  kill -TERM "$server_pid"
  local rc=0
  wait "$server_pid" || rc=$?
  server_pid=""
  tail -n 2 "$workdir/server.log"
  if [ $rc -ne 0 ]; then
    echo "e2e: webhook_server exited with $rc after SIGTERM" >&2
    return 1
  fi
}

loadgen() {
  "$bin/loadgen" --url "http://$addr" --users "$users" --requests "$requests" "$@" \
    | tee "$workdir/loadgen.out"
}

start_redis() {
  local port
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no >"$workdir/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 1 100); do
    if ! kill -0 "$redis_pid" 2>/dev/null; then
      echo "e2e: redis-server exited during start-up" >&2
      cat "$workdir/redis.log" >&2
      redis_pid=""
      return 1
    fi
    if command -v redis-cli >/dev/null 2>&1; then
      [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ] && break
    elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  redis_url="redis://127.0.0.1:$port/"
  echo "e2e: redis-server ready on 127.0.0.1:$port"
}

ci() {
  build
  say "memory backend: $users users x $requests requests"
  start_server
  loadgen
  stop_server

  say "Redis backend: $users users x $requests requests"
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "${RACEGUARD_REQUIRE_REDIS:-0}" = 1 ]; then
      echo "e2e: redis-server not found and RACEGUARD_REQUIRE_REDIS=1" >&2
      exit 1
    fi
    echo "e2e: NOTICE: redis-server not found; Redis run skipped"
    return 0
  fi
  start_redis
  start_server --redis "$redis_url"
  loadgen
  stop_server
  crash_restart
  stop_pid "$redis_pid"
  redis_pid=""
  say "passed"
}

# Redis: SIGKILL the server mid-burst (accepted webhooks not yet processed,
# requests in flight), restart it on the same Redis and port; loadgen
# retries what failed and checks the durable counters.
crash_restart() {
  say "Redis backend: SIGKILL mid-burst and restart: $users users x $requests webhooks"
  local flags=(--redis "$redis_url" --reclaim-idle 2)
  start_server "${flags[@]}"
  local port=${addr##*:}
  "$bin/loadgen" --url "http://$addr" --users "$users" --requests "$requests" \
    --survive-restart >"$workdir/survive.out" 2>&1 &
  loadgen_pid=$!
  # Kill once a quarter of the burst is accepted and jobs are outstanding
  # (bounded polling of /stats).
  local want=$((users * requests / 5)) stats="" accepted=0 processed=0 killed=0
  for _ in $(seq 1 600); do
    stats=$(http_body "$addr" /stats || true)
    accepted=$(stat_field "$stats" accepted)
    processed=$(stat_field "$stats" processed)
    if [ "${accepted:-0}" -ge "$want" ] && [ "${accepted:-0}" -gt "${processed:-0}" ]; then
      kill -KILL "$server_pid"
      wait "$server_pid" 2>/dev/null || true
      killed=1
      break
    fi
    kill -0 "$loadgen_pid" 2>/dev/null || break
    sleep 0.05
  done
  if [ $killed = 0 ]; then
    echo "e2e: never saw $want accepted webhooks with jobs outstanding (last: $stats)" >&2
    return 1
  fi
  echo "e2e: killed the server (SIGKILL) with $accepted accepted, $processed processed; restarting on port $port"
  server_pid=""
  listen="127.0.0.1:$port" start_server "${flags[@]}"
  local rc=0
  wait "$loadgen_pid" || rc=$?
  loadgen_pid=""
  cat "$workdir/survive.out"
  grep 'start-up reclaim' "$workdir/server.log" || true
  if [ $rc -ne 0 ]; then
    echo "e2e: loadgen --survive-restart failed ($rc)" >&2
    return 1
  fi
  stop_server
}

bench() {
  build
  local rounds=${E2E_BENCH_ROUNDS:-3}
  local breq=${E2E_REQUESTS:-200}
  # Limits far above the load: this measures the layers' cost, not throttling.
  local flags=(--user-limit 1000000 --global-limit 10000000 --queue-capacity 1000000
    --external-limit 1000000 --external-burst 100000 --worker-burst 1000)
  local on=() off=() on99=() off99=()
  for r in $(seq 1 "$rounds"); do
    for layers in on off; do
      say "bench round $r, layers $layers: $users users x $breq requests"
      if [ $layers = on ]; then start_server "${flags[@]}"; else start_server "${flags[@]}" --no-layers; fi
      "$bin/loadgen" --url "http://$addr" --users "$users" --requests "$breq" --skip-limit-phase \
        | tee "$workdir/loadgen.out"
      stop_server
      local line rps p99
      line=$(grep '^RESULT ' "$workdir/loadgen.out")
      rps=$(sed -E 's/.* rps=([0-9.]+).*/\1/' <<<"$line")
      p99=$(sed -E 's/.* p99_ms=([0-9.]+).*/\1/' <<<"$line")
      if [ $layers = on ]; then on+=("$rps"); on99+=("$p99"); else off+=("$rps"); off99+=("$p99"); fi
    done
  done
  say "layers on vs off ($rounds rounds, memory backend, $profile build)"
  python3 - "${on[*]}" "${off[*]}" "${on99[*]}" "${off99[*]}" <<'PY'
import statistics, sys
on, off, on99, off99 = ([float(x) for x in a.split()] for a in sys.argv[1:5])
m_on, m_off = statistics.median(on), statistics.median(off)
print(f"layers on : requests/s {on}  median {m_on:.0f}; p99 ms {on99}")
print(f"layers off: requests/s {off}  median {m_off:.0f}; p99 ms {off99}")
print(f"throughput ratio on/off = {m_on / m_off:.3f}  (layers cost {100 * (1 - m_on / m_off):.1f}% of throughput)")
PY
}

"$mode"
