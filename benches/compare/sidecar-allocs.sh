#!/usr/bin/env bash
# Heap allocations per proxied request in the sidecar, counted by heaptrack.
#
#   benches/compare/sidecar-allocs.sh [REQUESTS]        (default 20000)
#
# One nginx backend (return 200, keep-alive) on loopback, a registry, and the sidecar
# (its --http-upstream port for service web, so no Host header is needed)
# (--worker-threads 1) run under heaptrack twice: once with a 200-request warm-up only
# and once with the warm-up plus REQUESTS more (h2load -n, 8 keep-alive HTTP/1.1
# connections, one request in flight each). The difference in allocation calls divided
# by REQUESTS is the allocations per request on the happy path (start-up, discovery and
# connection set-up cancel out). The top allocation sites of the second run are
# printed. Installs heaptrack, nginx and h2load (nghttp2-client) from Debian if missing.
# Loopback ports 19600-19611 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [requests]" >&2; exit 2; }
need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need heaptrack heaptrack
need heaptrack_print heaptrack
need nginx nginx-light
need h2load nghttp2-client
need curl curl
[ -x target/release/switchyard ] || cargo build --release -q
BIN=$PWD/target/release/switchyard
work=$(mktemp -d /tmp/sidecar-allocs.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/nginx.conf" <<CONF
worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.err; daemon off;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  server { listen 127.0.0.1:19601; location / { return 200 "ok"; } } }
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
"$BIN" registry --listen 127.0.0.1:19600 --peer-listen 127.0.0.1:0 --http 127.0.0.1:19602 --dns off \
  --data-dir "$work/registry" 2>"$work/registry.log" & pids+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null 127.0.0.1:19602/health && break; sleep 0.1; done
"$BIN" register --registry http://127.0.0.1:19600 --service web --address 127.0.0.1 --port 19601 \
  --version 1.0.0 --id web-1 >"$work/register.log" 2>&1 & pids+=($!)

# run <label> <requests after the warm-up>: allocation calls of one sidecar lifetime
run() {
  local label=$1 extra=$2 sc n calls
  heaptrack -o "$work/$label" "$BIN" sidecar --registry http://127.0.0.1:19600 --admin 127.0.0.1:19610 \
    --http-proxy off --http-upstream web=127.0.0.1:19611 --dns off --worker-threads 1 --cache-file "$work/cache-$label.json" \
    >"$work/$label.out" 2>&1 &
  sc=$!
  n=0
  for _ in $(seq 1 300); do
    n=$(curl -s 127.0.0.1:19610/endpoints | grep -c '"id"' || true)
    [ "$n" = 1 ] && break
    sleep 0.1
  done
  [ "$n" = 1 ] || { echo "the sidecar never saw its endpoint" >&2; cat "$work/$label.out" >&2; exit 1; }
  h2load --h1 -n 200 -c 8 -m 1 http://127.0.0.1:19611/ >"$work/$label-warm.txt"
  if [ "$extra" -gt 0 ]; then
    h2load --h1 -n "$extra" -c 8 -m 1 http://127.0.0.1:19611/ >"$work/$label-load.txt"
    grep -q "succeeded, 0 errored" <(grep '^requests:' "$work/$label-load.txt" | sed 's/, [0-9]* failed//') \
      || { echo "failed requests:" >&2; cat "$work/$label-load.txt" >&2; exit 1; }
    grep -q " $extra succeeded" "$work/$label-load.txt" || { cat "$work/$label-load.txt" >&2; exit 1; }
  fi
  # heaptrack is a wrapper script: stop the sidecar itself, then let heaptrack finish
  # writing its data.
  local p
  for p in $(pgrep -f "cache-$label.json"); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = switchyard ] && kill -TERM "$p"
  done
  wait "$sc" 2>/dev/null || true
  local data
  data=$(ls "$work/$label".*zst "$work/$label".*gz "$work/$label".zst 2>/dev/null | head -n 1 || true)
  [ -n "$data" ] || { echo "no heaptrack data for $label" >&2; ls "$work" >&2; exit 1; }
  heaptrack_print -f "$data" >"$work/$label.txt"
  calls=$(awk '/^calls to allocation functions:/ {print $5}' "$work/$label.txt")
  [ -n "$calls" ] || { echo "no heaptrack summary for $label" >&2; tail "$work/$label.txt" >&2; exit 1; }
  echo "$calls"
}

base=$(run base 0)
loaded=$(run loaded "$N")
per=$(awk -v a="$base" -v b="$loaded" -v n="$N" 'BEGIN {printf "%.1f", (b - a) / n}')
echo "allocation calls: $base (warm-up only), $loaded (warm-up + $N requests)"
echo "RESULT allocations_per_request=$per requests=$N commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo
echo "Most calls to allocation functions in the loaded run (heaptrack_print):"
awk '/^MOST CALLS TO ALLOCATION FUNCTIONS/ {p = 1} /^PEAK MEMORY CONSUMERS/ {p = 0} p' "$work/loaded.txt" \
  | grep -A3 -E '^[0-9]+ calls' | grep -v -e '^--$' -e '^ *in /' | head -60
