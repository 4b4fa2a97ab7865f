#!/usr/bin/env bash
# Sidecar memory while it tracks many endpoints (DESIGN goal: RSS below HAProxy's, < 25 MiB,
# with 10,000 endpoints). A registry gets COUNT instances (100 per service, the load client's
# `fill`), one sidecar (one worker thread) watches the whole namespace; once its catalog
# holds them all, its RSS is read. (RSS under traffic is in proxy.sh, with 3 endpoints.)
#
#   benches/compare/sidecar-memory.sh [count]      (default 10000)
#
# Loopback only, ports 19500-19509. Builds the binaries.
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNT=${1:-10000}
command -v taskset >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq util-linux >/dev/null; }
cargo build --release -q -p registry-load -p switchyard
BIN=$PWD/target/release/switchyard
LOAD=$PWD/target/release/registry-load
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$BIN" registry --listen 127.0.0.1:19500 --peer-listen 127.0.0.1:0 --http 127.0.0.1:19501 --dns off \
  --data-dir "$work/registry" 2>"$work/registry.log" & pids+=($!)
"$LOAD" --target switchyard --endpoints http://127.0.0.1:19500 ready >/dev/null
"$LOAD" --target switchyard --endpoints http://127.0.0.1:19500 --count "$COUNT" --ttl 3600 fill \
  | grep RESULT
taskset -c 1 "$BIN" sidecar --registry http://127.0.0.1:19500 --admin 127.0.0.1:19502 \
  --http-proxy 127.0.0.1:19503 --dns off --worker-threads 1 --cache-file "$work/cache.json" \
  2>"$work/sidecar.log" & pids+=($!)
sidecar=$!
# Ready when the sidecar's catalog revision equals the registry's (read from /metrics, which
# stays small; polling /endpoints would build a 10,000-entry JSON each time and inflate RSS).
metric() { curl -s "$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
want=$(metric 127.0.0.1:19501 switchyard_registry_revision)
got=0
for _ in $(seq 1 300); do
  got=$(metric 127.0.0.1:19502 switchyard_sidecar_catalog_revision)
  [ "${got:-0}" = "$want" ] && break
  sleep 0.1
done
[ "${got:-0}" = "$want" ] || { echo "sidecar at revision $got, registry at $want" >&2; exit 1; }
sleep 1
n=$(curl -s 127.0.0.1:19502/endpoints | grep -o '"id"' | wc -l || true)
rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$sidecar/status"; }
before=$(rss)
echo "sidecar tracks $n endpoints (catalog revision $want): RSS $before MiB (and $(rss) MiB after one /endpoints listing)"
