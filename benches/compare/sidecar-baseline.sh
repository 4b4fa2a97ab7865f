#!/usr/bin/env bash
# A first, honest baseline: wrk straight to one nginx backend vs through the sidecar
# (one worker thread, balancing three nginx backends by least request).
#
#   benches/compare/sidecar-baseline.sh [seconds-per-run] [rounds]
#
# Installs wrk and nginx-light from Debian if missing (idempotent). Uses loopback ports
# 17400-17501 and 18081-18083. Prints one line per run and the medians.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
ROUNDS=${2:-3}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx-light
need taskset util-linux

cargo build --release -q
BIN=$PWD/target/release/switchyard
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:18081; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:18082; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:18083; location / { return 200 "ok"; } }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
"$BIN" registry --listen 127.0.0.1:17400 --peer-listen 127.0.0.1:0 --http 127.0.0.1:17401 --data-dir "$work/registry" 2>"$work/registry.log" & pids+=($!)
sleep 0.5
for port in 18081 18082 18083; do
  "$BIN" register --registry http://127.0.0.1:17400 --service web --address 127.0.0.1 --port "$port" \
    --version 1.0.0 --id "web-$port" >/dev/null 2>&1 & pids+=($!)
done
taskset -c 1 "$BIN" sidecar --registry http://127.0.0.1:17400 --admin 127.0.0.1:17500 \
  --http-proxy 127.0.0.1:17501 --worker-threads 1 --cache-file "$work/cache.json" \
  2>"$work/sidecar.log" & pids+=($!)
sidecar_pid=$!

for _ in $(seq 1 100); do
  n=$(curl -s 127.0.0.1:17500/endpoints | grep -c '"id"' || true)
  [ "$n" = 3 ] && break
  sleep 0.1
done
[ "$n" = 3 ] || { echo "sidecar never saw 3 endpoints"; cat "$work/sidecar.log"; exit 1; }

rps() { awk '/Requests\/sec/ {print $2}'; }
p99() { awk '/ 99%/ {print $2}'; }
direct=(); proxied=()
echo "wrk -t1 -c64 -d${DURATION}s, wrk pinned to CPU 0, sidecar to CPU 1 (1 worker thread), nginx unpinned"
for round in $(seq 1 "$ROUNDS"); do
  out=$(taskset -c 0 wrk -t1 -c64 -d"${DURATION}s" --latency http://127.0.0.1:18081/)
  d=$(echo "$out" | rps); direct+=("$d")
  echo "round $round direct:  $d req/s  p99 $(echo "$out" | p99)"
  out=$(taskset -c 0 wrk -t1 -c64 -d"${DURATION}s" --latency -H 'Host: web' http://127.0.0.1:17501/)
  s=$(echo "$out" | rps); proxied+=("$s")
  echo "round $round sidecar: $s req/s  p99 $(echo "$out" | p99)"
done
rss=$(awk '/VmRSS/ {print $2}' "/proc/$sidecar_pid/status")
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
md=$(median "${direct[@]}"); ms=$(median "${proxied[@]}")
echo "median direct ${md} req/s, through the sidecar ${ms} req/s, ratio $(awk -v a="$ms" -v b="$md" 'BEGIN {printf "%.2f", a/b}'), sidecar RSS ${rss} KiB"
curl -s 127.0.0.1:17500/metrics | grep -E '^switchyard_sidecar_requests_total.*2xx' || true
