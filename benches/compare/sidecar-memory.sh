#!/usr/bin/env bash
# Sidecar memory while it tracks many endpoints (DESIGN goal: RSS below HAProxy's, < 25 MiB,
# with 10,000 endpoints across 1,000 services). For each size a fresh registry gets COUNT
# instances, PER_SERVICE per service (the load client's `fill --per-lease`), and one sidecar
# (one worker thread) watches the whole namespace; once its catalog holds them all, its RSS
# is read. The last line states the growth per 1,000 endpoints between the smallest and the
# largest size. (RSS under traffic is in proxy.sh, with 3 endpoints.)
#
#   benches/compare/sidecar-memory.sh [PER_SERVICE] [COUNT ...]    (default: 10 0 1000 10000)
#   HEAPTRACK=1 benches/compare/sidecar-memory.sh 10 10000         (a heap profile of the sidecar)
#   PROFILE=release benches/compare/sidecar-memory.sh              (the quick start's build)
#
# Loopback only, ports 19500-19509. Builds the binaries.
set -euo pipefail
cd "$(dirname "$0")/../.."
PER_SERVICE=${1:-10}
shift || true
COUNTS=("$@")
[ ${#COUNTS[@]} -gt 0 ] || COUNTS=(0 1000 10000)
command -v taskset >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq util-linux >/dev/null; }
# The sidecar as it ships: the `dist` profile of deploy/Dockerfile (release + thin LTO).
# PROFILE=release measures the quick start's build instead.
PROFILE=${PROFILE:-dist}
cargo build --profile "$PROFILE" -q -p registry-load -p switchyard
BIN=$PWD/target/$PROFILE/switchyard
LOAD=$PWD/target/$PROFILE/registry-load
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
metric() { curl -s "$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

# measure COUNT: prints "COUNT RSS_MiB" on the last line.
measure() {
  local count=$1 dir="$work/$1"
  mkdir -p "$dir"
  "$BIN" registry --listen 127.0.0.1:19500 --peer-listen 127.0.0.1:0 --http 127.0.0.1:19501 \
    --dns off --data-dir "$dir/registry" 2>"$dir/registry.log" &
  local registry=$!
  pids+=("$registry")
  "$LOAD" --target switchyard --endpoints http://127.0.0.1:19500 ready >/dev/null
  if [ "$count" -gt 0 ]; then
    "$LOAD" --target switchyard --endpoints http://127.0.0.1:19500 --count "$count" --ttl 3600 \
      fill --per-lease "$PER_SERVICE" | grep -o 'stored=[0-9]*' >&2
  fi
  local wrap=()
  [ "${HEAPTRACK:-0}" = 1 ] && wrap=(heaptrack -o "$PWD/sidecar-$count.heaptrack")
  taskset -c 1 "${wrap[@]}" "$BIN" sidecar --registry http://127.0.0.1:19500 \
    --admin 127.0.0.1:19502 --http-proxy 127.0.0.1:19503 --dns off --worker-threads 1 \
    --cache-file "$dir/cache.json" 2>"$dir/sidecar.log" &
  local sidecar=$!
  pids+=("$sidecar")
  # Ready when the sidecar's catalog revision equals the registry's (read from /metrics,
  # which stays small; polling /endpoints would build a large JSON each time and inflate RSS).
  local want got=0
  want=$(metric 127.0.0.1:19501 switchyard_registry_revision)
  for _ in $(seq 1 600); do
    got=$(metric 127.0.0.1:19502 switchyard_sidecar_catalog_revision)
    [ "${got:-0}" = "$want" ] && break
    sleep 0.1
  done
  [ "${got:-0}" = "$want" ] || { echo "sidecar at revision $got, registry at $want" >&2; exit 1; }
  sleep 1
  local pid=$sidecar
  # Under heaptrack the sidecar is heaptrack's child.
  [ "${HEAPTRACK:-0}" = 1 ] && pid=$(pgrep -P "$sidecar" -f "switchyard sidecar" || pgrep -f "$PROFILE/switchyard sidecar")
  local rss
  rss=$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
  local n
  n=$(curl -s 127.0.0.1:19502/endpoints | grep -o '"id"' | wc -l || true)
  echo "sidecar tracks $n endpoints in $(( (count + PER_SERVICE - 1) / PER_SERVICE )) services (revision $want): RSS $rss MiB" >&2
  # "$pid" too: under heaptrack, killing the wrapper alone leaves the sidecar running and
  # the wait below would never end.
  kill "$pid" "$sidecar" "$registry" 2>/dev/null || true
  wait "$sidecar" "$registry" 2>/dev/null || true
  echo "$count $rss"
}

results=()
for c in "${COUNTS[@]}"; do
  results+=("$(measure "$c" | tail -1)")
done
echo "RESULT per_service=$PER_SERVICE ${results[*]// /=}"
if [ ${#results[@]} -ge 2 ]; then
  read -r c0 r0 <<<"${results[0]}"
  read -r c1 r1 <<<"${results[-1]}"
  if [ "$c1" -gt "$c0" ]; then
    awk -v c0="$c0" -v r0="$r0" -v c1="$c1" -v r1="$r1" \
      'BEGIN {printf "growth: %.2f MiB per 1,000 endpoints (%d -> %d endpoints: %.1f -> %.1f MiB)\n", (r1 - r0) * 1000 / (c1 - c0), c0, c1, r0, r1}'
  fi
fi
