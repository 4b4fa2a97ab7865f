#!/usr/bin/env bash
# The OpenFeature SDK with its OFREP provider (PyPI, pinned in requirements-ofrep.txt)
# against a real sidecar's admin port: a registry, a sidecar registered as web 2.0.0
# (the canary), flags set with the switchyard CLI. Then the registry is stopped and the
# answers must go on. Usage: tests/flags/ofrep_check.sh BIN (BIN: the switchyard binary).
set -euo pipefail
bin=${1:?usage: ofrep_check.sh path/to/switchyard}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" registry --listen 127.0.0.1:17699 --peer-listen 127.0.0.1:0 --http 127.0.0.1:17698 --dns off \
  --data-dir "$work/registry" 2>"$work/registry.log" &
registry_pid=$!
pids+=($registry_pid)
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:17698/health >/dev/null 2>&1 && break
  sleep 0.1
done
# The app the sidecar registers (any listening port).
python3 -m http.server 17697 --bind 127.0.0.1 >/dev/null 2>&1 &
pids+=($!)
"$bin" sidecar --registry http://127.0.0.1:17699 --admin 127.0.0.1:17696 --http-proxy 127.0.0.1:17695 \
  --dns off --service web --port 17697 --version 2.0.0 \
  --cache-file "$work/sidecar-cache.json" 2>"$work/sidecar.log" &
pids+=($!)
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:17696/ready >/dev/null 2>&1 && break
  sleep 0.1
done
export SWITCHYARD_REGISTRY=http://127.0.0.1:17699
if ! timeout 120 python3 "$here/ofrep_check.py" "$bin" 127.0.0.1:17696 "$registry_pid" "$here"; then
  echo "--- registry log"; tail -20 "$work/registry.log"
  echo "--- sidecar log"; tail -20 "$work/sidecar.log"
  exit 1
fi
