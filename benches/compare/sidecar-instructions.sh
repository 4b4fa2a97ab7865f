#!/usr/bin/env bash
# User-space instructions per proxied HTTP/1.1 request in the sidecar, counted by
# valgrind's callgrind: a deterministic measure of the proxy's own work, for changes
# too small to see through this machine's 5-15 % spread in requests/s.
#
#   benches/compare/sidecar-instructions.sh [REQUESTS] [OTHER_BINARY]   (default 20000)
#
# One nginx backend (return 200, keep-alive) on loopback, a registry, and the sidecar
# (--worker-threads 1, its --http-upstream port for service web) under callgrind.
# After a 2,000-request warm-up the counters are zeroed, REQUESTS GETs are sent
# (h2load, 8 keep-alive HTTP/1.1 connections, one request in flight each), and the
# counters are dumped: every instruction the sidecar's threads ran in between, divided
# by REQUESTS. Kernel time (the system calls) is not counted. Two runs of one binary
# agree within 0.1 %. HAProxy (nbthread 1, keep-alive both sides, `http-reuse always`)
# is measured the same way in the same run, as the peer; with OTHER_BINARY another
# sidecar build is measured too (an A/B). Ratios are printed. The functions with the
# most instructions of their own are listed for each (inlined code counts as its
# caller's). Installs valgrind, nginx, haproxy and h2load from Debian if missing.
# Loopback ports 19620-19633 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
OTHER=${2:-}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [requests] [other binary]" >&2; exit 2; }
[ -z "$OTHER" ] || [ -x "$OTHER" ] || { echo "$OTHER: not an executable" >&2; exit 2; }
need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need valgrind valgrind
need callgrind_control valgrind
need nginx nginx-light
need h2load nghttp2-client
need haproxy haproxy
need curl curl
need python3 python3
[ -x target/release/switchyard ] || cargo build --release -q
BIN=$PWD/target/release/switchyard
work=$(mktemp -d /tmp/sidecar-instructions.XXXXXX)
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
  server { listen 127.0.0.1:19621; location / { return 200 "ok"; } } }
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
"$BIN" registry --listen 127.0.0.1:19620 --peer-listen 127.0.0.1:0 --http 127.0.0.1:19622 --dns off \
  --data-dir "$work/registry" 2>"$work/registry.log" & pids+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null 127.0.0.1:19622/health && break; sleep 0.1; done
"$BIN" register --registry http://127.0.0.1:19620 --service web --address 127.0.0.1 --port 19621 \
  --version 1.0.0 --id web-1 >"$work/register.log" 2>&1 & pids+=($!)

cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 600s
  timeout server 600s
frontend fe
  bind 127.0.0.1:19633
  default_backend web
backend web
  server web-1 127.0.0.1:19621
CONF

# run <label> <binary|haproxy>: prints instructions per request; the table of
# functions is $work/<label>.out
run() {
  local label=$1 bin=$2 vg n port
  if [ "$bin" = haproxy ]; then
    port=19633
    valgrind --tool=callgrind --callgrind-out-file="$work/$label.%p" --dump-instr=no \
      haproxy -db -f "$work/haproxy.cfg" >"$work/$label.log" 2>&1 &
    vg=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null 127.0.0.1:$port/ && break; sleep 0.2; done
  else
    port=19631
    valgrind --tool=callgrind --callgrind-out-file="$work/$label.%p" --dump-instr=no \
      "$bin" sidecar --registry http://127.0.0.1:19620 --admin 127.0.0.1:19630 \
      --http-proxy off --http-upstream web=127.0.0.1:$port --dns off --worker-threads 1 \
      --cache-file "$work/cache-$label.json" >"$work/$label.log" 2>&1 &
    vg=$!
    n=0
    for _ in $(seq 1 600); do
      n=$(curl -s 127.0.0.1:19630/endpoints | grep -c '"id"' || true)
      [ "$n" = 1 ] && break
      sleep 0.2
    done
    [ "$n" = 1 ] || { echo "the sidecar never saw its endpoint" >&2; tail "$work/$label.log" >&2; exit 1; }
  fi
  h2load --h1 -n 2000 -c 8 -m 1 http://127.0.0.1:$port/ >"$work/$label-warm.txt"
  callgrind_control -z "$vg" >/dev/null 2>&1
  h2load --h1 -n "$N" -c 8 -m 1 http://127.0.0.1:$port/ >"$work/$label-load.txt"
  grep -q " $N succeeded, 0 failed, 0 errored" "$work/$label-load.txt" \
    || { echo "failed requests:" >&2; cat "$work/$label-load.txt" >&2; exit 1; }
  callgrind_control -d "$vg" >/dev/null 2>&1
  kill "$vg"; wait "$vg" 2>/dev/null || true
  local dump
  dump=$(ls "$work/$label".*.1 2>/dev/null | head -n 1 || true)
  [ -n "$dump" ] || { echo "no callgrind dump for $label" >&2; ls "$work" >&2; exit 1; }
  python3 - "$dump" "$N" >"$work/$label.out" <<'PY'
import collections, re, sys
# Self cost per function from a callgrind dump (name compression: "(id) name").
names, own, calls = {}, collections.Counter(), collections.Counter()
def name(tok):
    m = re.match(r'\((\d+)\)(?: (.*))?', tok)
    if not m:
        return tok
    i, n = m.groups()
    if n:
        names[i] = n
    return names.get(i, i)
fn = cfn = None
after_call = False
for line in open(sys.argv[1]):
    line = line.rstrip('\n')
    if line.startswith('fn='):
        fn, after_call = name(line[3:]), False
    elif line.startswith('cfn='):
        cfn = name(line[4:])
    elif line.startswith('calls='):
        after_call = True
        calls[cfn] += int(line[6:].split()[0])
    elif line[:1].isdigit() or line[:1] in '+-*':
        parts = line.split()
        if len(parts) >= 2:
            if after_call:
                after_call = False  # the call's inclusive cost, not this function's
            else:
                own[fn] += int(parts[1])
n = int(sys.argv[2])
total = sum(own.values())
print(total // n)
for f, c in own.most_common(25):
    print(f'{c / n:8.0f} {100 * c / total:5.1f} %  {calls[f] / n:5.1f} calls  {f[:140]}')
PY
  head -n 1 "$work/$label.out"
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
this=$(run this "$BIN")
echo "RESULT sidecar_instructions_per_request=$this requests=$N commit=$commit"
peer=$(run haproxy haproxy)
echo "RESULT haproxy_instructions_per_request=$peer version=$(haproxy -v | head -n 1 | awk '{print $3}')"
awk -v a="$this" -v b="$peer" 'BEGIN {printf "RESULT ratio_sidecar_to_haproxy=%.2f\n", a / b}'
if [ -n "$OTHER" ]; then
  other=$(run other "$OTHER")
  echo "RESULT other_instructions_per_request=$other binary=$OTHER"
  awk -v a="$this" -v b="$other" 'BEGIN {printf "RESULT ratio_this_to_other=%.3f\n", a / b}'
  awk -v a="$other" -v b="$peer" 'BEGIN {printf "RESULT ratio_other_to_haproxy=%.2f\n", a / b}'
fi
for label in this haproxy; do
  echo
  echo "Instructions per request by function ($label, their own): per request, share, calls"
  tail -n +2 "$work/$label.out"
done
