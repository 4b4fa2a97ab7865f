#!/usr/bin/env bash
# The cost of the mesh: a request through one sidecar in clear text against the same
# request through two sidecars with mutual TLS between them.
#
#   benches/compare/mesh.sh [seconds-per-run] [rounds]      (defaults 10 3)
#
#   plain: wrk -> client sidecar (no identity) -> nginx                 (one proxy hop)
#   mtls:  wrk -> client sidecar --(mTLS, pooled)--> web sidecar's inbound -> nginx
#
# The client sidecar runs with --service client in the mtls mode (so it has a leaf to
# present) and without one in the plain mode (so it dials the app port); the web sidecar
# serves --inbound only in the mtls mode (in the plain mode `web` is held by
# `switchyard register`, no mesh port). Per mode and round, interleaved:
#   1. wrk -t1 -c64 -d${DURATION}s --latency      saturation: req/s, p50/p99
#   2. wrk -t1 -c1  -d${DURATION}s --latency      one connection, one request at a time:
#                                                  p50/p99 of an unloaded path
#   CPU µs per request: utime+stime of every sidecar process over run 1 divided by the
#   requests wrk completed (both sidecars in the mtls mode: the mesh's whole cost).
# Errors (non-2xx and socket errors) are printed per run; a run with any fails the script.
#
# Pinning (2 cores): sidecars on CPU 1 (one worker thread each), wrk on CPU 0, nginx and
# the registry unpinned. Ports 127.0.0.1:19100-19199 only.
# Installs (idempotent): wrk, nginx-light, curl from apt. Builds the release binary if
# target/release/switchyard is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
ROUNDS=${2:-3}
for v in "$DURATION" "$ROUNDS"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [seconds] [rounds]" >&2; exit 2; }
done
need() {
  command -v "$1" >/dev/null 2>&1 && return
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$2" >/dev/null
}
need wrk wrk
need nginx nginx-light
need curl curl
need taskset util-linux
[ -x target/release/switchyard ] || cargo build --release -q
BIN=$PWD/target/release/switchyard
CLK_TCK=$(getconf CLK_TCK)

P_REG=19100 P_REG_HTTP=19101 P_REG_PEER=19102 P_BACKEND=19120
P_C_ADMIN=19110 P_C_PROXY=19111 P_W_ADMIN=19115 P_W_INBOUND=19116

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  server { listen 127.0.0.1:$P_BACKEND; location / { return 200 "ok"; } }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)

"$BIN" registry --listen 127.0.0.1:$P_REG --peer-listen 127.0.0.1:$P_REG_PEER \
  --http 127.0.0.1:$P_REG_HTTP --dns off --data-dir "$work/registry" 2>"$work/registry.log" & pids+=($!)
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "127.0.0.1:$P_REG_HTTP/health" && break
  sleep 0.1
done
REG=http://127.0.0.1:$P_REG

cpu_ticks() {  # utime+stime of a process
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'
}

# Starts the processes of one mode; sets MODE_PIDS (the sidecars) and ALL_MODE_PIDS.
start_mode() {
  MODE_PIDS=() ALL_MODE_PIDS=()
  if [ "$1" = plain ]; then
    "$BIN" register --registry $REG --service web --address 127.0.0.1 --port $P_BACKEND \
      --version 1.0.0 --id web-plain >"$work/register.log" 2>&1 & ALL_MODE_PIDS+=($!)
    taskset -c 1 "$BIN" sidecar --registry $REG --admin 127.0.0.1:$P_C_ADMIN \
      --http-proxy 127.0.0.1:$P_C_PROXY --dns off --worker-threads 1 \
      --cache-file "$work/client-cache.json" 2>"$work/client.log" & MODE_PIDS+=($!)
  else
    taskset -c 1 "$BIN" sidecar --registry $REG --service web --port $P_BACKEND --version 1.0.0 \
      --id web-mesh --admin 127.0.0.1:$P_W_ADMIN --http-proxy off --dns off \
      --inbound 127.0.0.1:$P_W_INBOUND --worker-threads 1 --drain 0s \
      --cache-file "$work/web-cache.json" 2>"$work/web.log" & MODE_PIDS+=($!)
    # The client's own app is never called; its health check failing changes nothing.
    taskset -c 1 "$BIN" sidecar --registry $REG --service client --port 19199 --version 1.0.0 \
      --admin 127.0.0.1:$P_C_ADMIN --http-proxy 127.0.0.1:$P_C_PROXY --dns off --inbound off \
      --worker-threads 1 --drain 0s --cache-file "$work/client-cache.json" 2>"$work/client.log" & MODE_PIDS+=($!)
  fi
  ALL_MODE_PIDS+=("${MODE_PIDS[@]}")
  # Ready: the client routes to web (and, for mtls, over mTLS).
  local ok=
  for _ in $(seq 1 150); do
    local explain
    explain=$(curl -s -D- -o /dev/null -m 2 -H 'Host: web' -H 'x-switchyard-explain: 1' \
      http://127.0.0.1:$P_C_PROXY/ | tr -d '\r' | grep -i '^x-switchyard-explain' || true)
    if [ "$1" = plain ] && [[ $explain == *"mtls=off"* ]]; then ok=1; break; fi
    if [ "$1" = mtls ] && [[ $explain == *"mtls=on"* ]]; then ok=1; break; fi
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "mode $1 never became ready" >&2; tail -n 20 "$work"/*.log >&2; exit 1; }
}

stop_mode() {
  for p in "${ALL_MODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${ALL_MODE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  # The registry forgets the instances (deregistered on exit).
  sleep 1
}

run_wrk() {  # conns -> "req/s p50_ms p99_ms requests errors"
  taskset -c 0 wrk -t1 -c"$1" -d"${DURATION}s" --latency -H 'Host: web' \
    http://127.0.0.1:$P_C_PROXY/ >"$work/wrk.out" 2>&1 || true
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    / 50%/ { p50 = ms($2) }
    / 99%/ { p99 = ms($2) }
    /requests in/ { n = $1 }
    /Non-2xx/ { err += $NF }
    /Socket errors/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
    END { printf "%.0f %.3f %.3f %d %d\n", rps, p50, p99, n, err + 0 }' "$work/wrk.out"
}

printf "%-6s %5s %10s %9s %9s %12s %9s %9s %6s\n" mode round "req/s" "p50 ms" "p99 ms" "CPU us/req" "c1 p50" "c1 p99" errors
for round in $(seq 1 "$ROUNDS"); do
  for mode in plain mtls; do
    start_mode "$mode"
    taskset -c 0 wrk -t1 -c64 -d1s -H 'Host: web' http://127.0.0.1:$P_C_PROXY/ >/dev/null 2>&1 || true
    before=0; for p in "${MODE_PIDS[@]}"; do before=$((before + $(cpu_ticks "$p"))); done
    read -r rps p50 p99 n err <<<"$(run_wrk 64)"
    after=0; for p in "${MODE_PIDS[@]}"; do after=$((after + $(cpu_ticks "$p"))); done
    cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "NA" }')
    read -r _ c1p50 c1p99 _ err1 <<<"$(run_wrk 1)"
    printf "%-6s %5s %10s %9s %9s %12s %9s %9s %6s\n" "$mode" "$round" "$rps" "$p50" "$p99" "$cpu" "$c1p50" "$c1p99" $((err + err1))
    stop_mode
    [ $((err + err1)) -eq 0 ] || { echo "errors in the $mode run" >&2; exit 1; }
  done
done
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); CPU = utime+stime of the sidecars over the -c64 run / its requests"
