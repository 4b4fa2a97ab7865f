#!/usr/bin/env bash
# Debian's Prometheus finds its targets through a registry's /v1/prometheus/sd
# (http_sd_configs) and scrapes them: the registry's own /metrics, registered as an
# instance with the switchyard CLI. Usage: tests/consul/prometheus_sd_check.sh BIN
# (BIN: the switchyard binary). Installs Prometheus with apt if it is missing.
set -euo pipefail
bin=${1:?usage: prometheus_sd_check.sh path/to/switchyard}
if ! command -v prometheus >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" registry --listen 127.0.0.1:17599 --peer-listen 127.0.0.1:0 --http 127.0.0.1:17598 --dns off \
  --data-dir "$work/registry" 2>"$work/registry.log" &
pids+=($!)
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:17598/health >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin" register --registry http://127.0.0.1:17599 --service registry-metrics --address 127.0.0.1 \
  --port 17598 --version 1.0.0 --label team=platform --zone eu-1 --ttl 30s >"$work/register.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q registered "$work/register.log" && break
  sleep 0.1
done
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: switchyard-discovered
    http_sd_configs:
      - url: http://127.0.0.1:17598/v1/prometheus/sd
        refresh_interval: 1s
    relabel_configs:
      - source_labels: [__meta_switchyard_service]
        target_label: app
      - source_labels: [__meta_switchyard_version]
        target_label: app_version
      - source_labels: [__meta_switchyard_label_team]
        target_label: team
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address=127.0.0.1:19090 >"$work/prometheus.log" 2>&1 &
pids+=($!)
query='switchyard_registry_revision{app="registry-metrics",app_version="1.0.0",team="platform"}'
for _ in $(seq 1 60); do
  answer=$(curl -sf --get --data-urlencode "query=$query" http://127.0.0.1:19090/api/v1/query || true)
  if echo "$answer" | grep -q '"result":\[{'; then
    echo "prometheus: $query -> $(echo "$answer" | head -c 300)"
    targets=$(curl -sf http://127.0.0.1:19090/api/v1/targets)
    echo "$targets" | grep -q '"health":"up"' || { echo "the target is not up: $targets"; exit 1; }
    echo "prometheus-sd ok: Debian's Prometheus found and scraped a target through /v1/prometheus/sd"
    exit 0
  fi
  sleep 1
done
echo "Prometheus never scraped the discovered target"
curl -s http://127.0.0.1:19090/api/v1/targets || true
tail -20 "$work/prometheus.log"
exit 1
