#!/usr/bin/env bash
# The registry's DNS against unbound serving the same records as authoritative local data,
# both driven by dnsperf over UDP.
#
#   benches/compare/dns.sh [seconds-per-run] [rounds]      (defaults 10 and 3)
#
# Catalog: 100 services (svc001..svc100) x 3 instances (10.1.<n>.1-3, port 9000, version
# 1.0.0) = 300 instances. `switchyard register` takes one instance and stays running (~10 MB
# RSS each, 3 GB for 300), so each instance is registered with `--ttl 1h` and its register
# process is killed with SIGKILL once it printed "registered": no deregistration happens and
# the lease outlives the benchmark (the script refuses runs that would take over 50 minutes).
# No lease renewals then run during the measurement.
#
# unbound gets its local-data from the registry's own answers (dig), so both servers hold
# the same A, SRV and <hex-ip>.addr A records with the same TTL; the script checks that both
# return the same answer sections for every query (plain UDP, no EDNS, like dnsperf) before
# measuring. Query file: per service one A query; for every 4th service also its SRV name
# and one of its addr names (150 lines: 100 service A, 25 SRV, 25 addr A), sent in a loop.
#
# Both servers run pinned to CPU 1 (registry: its runtime then sees one CPU; unbound:
# num-threads 1), dnsperf pinned to CPU 0. Rounds interleave registry and unbound. Any
# response code other than NOERROR fails the run. Installs dnsperf, unbound and dig from
# Debian if missing (idempotent); unbound runs from its own config in a temp dir and never
# touches a system unbound. Loopback ports 19100-19154 only.
#
# Then the canary split (registry only; unbound has no such thing): every service gets a
# fourth instance, version 2.0.0 (10.1.<n>.4), and rounds interleave the 100 service A names
# answered plainly (no policy: the 4 instances, shuffled) with the same names under
# `route split svcNNN 1.0.0=90 2.0.0=10` (each answer one subset, drawn by the weights), the
# policies set and cleared between rounds. The split's share is checked with dig first.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
ROUNDS=${2:-3}
case "$DURATION$ROUNDS" in *[!0-9]*|'') echo "usage: $0 [seconds] [rounds]" >&2; exit 2;; esac
[ "$DURATION" -ge 1 ] && [ "$ROUNDS" -ge 1 ] || { echo "seconds and rounds must be >= 1" >&2; exit 2; }
# the leases are 1 h: keep the whole measurement well inside them
[ $((DURATION * ROUNDS * 2)) -le 3000 ] || { echo "seconds x rounds x 2 must be <= 3000 (leases are 1 h)" >&2; exit 2; }

SERVICES=100
INSTANCES=3
TTL=5                      # registry --dns-ttl, and unbound's local-data TTL
CLIENTS=16                 # dnsperf -c: source ports
OUTSTANDING=100            # dnsperf -q: queries in flight
GRPC=127.0.0.1:19100
HTTP=127.0.0.1:19101
REG_DNS_PORT=19153
UNB_PORT=19154

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need dnsperf dnsperf
need unbound unbound
need unbound-checkconf unbound
need dig bind9-dnsutils
need taskset util-linux
need curl curl

[ -x target/release/switchyard ] || cargo build --release -q
BIN=$PWD/target/release/switchyard
work=$(mktemp -d)
mkdir -p "$work/reg"
pids=()
cleanup() {
  local p f
  for f in "$work"/reg/*.pid; do [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for port in 19100 19101 "$REG_DNS_PORT" "$UNB_PORT"; do
  if ss -Hlntu "( sport = :$port )" | grep -q .; then echo "port $port is already in use" >&2; exit 1; fi
done

svc() { printf 'svc%03d' "$1"; }
ip() { printf '10.1.%d.%d' "$1" "$2"; }
hexip() { printf '%02x%02x%02x%02x' 10 1 "$1" "$2"; }

# --- registry ------------------------------------------------------------------------
taskset -c 1 "$BIN" registry --listen "$GRPC" --peer-listen 127.0.0.1:0 --http "$HTTP" --dns "127.0.0.1:$REG_DNS_PORT" \
  --dns-ttl "$TTL" --data-dir "$work/registry" 2>"$work/registry.log" & pids+=($!)
reg_pid=$!
for _ in $(seq 1 100); do curl -sf "http://$HTTP/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://$HTTP/health" >/dev/null || { echo "registry not healthy"; tail -20 "$work/registry.log"; exit 1; }

# register instance i of service s (version $3, default 1.0.0) with a 1 h lease, wait
# (<= 10 s) for "registered", then SIGKILL the process so it does not deregister
reg_one() {
  local s=$1 i=$2 version=${3:-1.0.0} id out p
  id=$(svc "$s")-$i
  out=$work/reg/$id.out
  : >"$out"    # exists before the background process opens it: grep below must not race
  "$BIN" register --registry "http://$GRPC" --service "$(svc "$s")" --address "$(ip "$s" "$i")" \
    --port 9000 --version "$version" --id "$id" --ttl 1h >>"$out" 2>&1 &
  p=$!
  echo "$p" >"$work/reg/$id.pid"
  for _ in $(seq 1 200); do
    grep -q '^registered' "$out" && break
    kill -0 "$p" 2>/dev/null || break
    sleep 0.05
  done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  rm -f "$work/reg/$id.pid"
  grep -q '^registered' "$out" || { echo "register $id failed:"; cat "$out"; return 1; }
}
echo "registering $SERVICES services x $INSTANCES instances ..."
t0=$(date +%s)
batch=()
fail=0
for s in $(seq 1 "$SERVICES"); do
  for i in $(seq 1 "$INSTANCES"); do
    reg_one "$s" "$i" & batch+=($!)
    if [ "${#batch[@]}" -ge 20 ]; then
      for b in "${batch[@]}"; do wait "$b" || fail=1; done
      batch=()
    fi
  done
done
for b in "${batch[@]}"; do wait "$b" || fail=1; done
[ "$fail" = 0 ] || { echo "some registrations failed"; exit 1; }
echo "registered $((SERVICES * INSTANCES)) instances in $(( $(date +%s) - t0 )) s"

# --- names and query file ------------------------------------------------------------
: >"$work/a-names"; : >"$work/srv-names"; : >"$work/addr-names"; : >"$work/queries"
for s in $(seq 1 "$SERVICES"); do
  echo "$(svc "$s").service.switchyard A" >>"$work/a-names"
  echo "_$(svc "$s")._tcp.service.switchyard SRV" >>"$work/srv-names"
  for i in $(seq 1 "$INSTANCES"); do echo "$(hexip "$s" "$i").addr.switchyard A" >>"$work/addr-names"; done
  echo "$(svc "$s").service.switchyard A" >>"$work/queries"
  if [ $((s % 4)) = 0 ]; then
    echo "_$(svc "$s")._tcp.service.switchyard SRV" >>"$work/queries"
    echo "$(hexip "$s" $(( s % INSTANCES + 1 ))).addr.switchyard A" >>"$work/queries"
  fi
done

# answer sections, normalised: one record a line, single spaces, sorted (order is random)
answers() { # port file
  dig @127.0.0.1 -p "$1" +noedns +ignore +tries=1 +time=1 +noall +answer -f "$2" 2>/dev/null \
    | awk 'NF && $1 !~ /^;/ {$1=$1; print}' | sort
}

want=$((SERVICES * INSTANCES))
n=0
for _ in $(seq 1 100); do
  n=$(answers "$REG_DNS_PORT" "$work/a-names" | wc -l)
  [ "$n" = "$want" ] && break
  sleep 0.2
done
[ "$n" = "$want" ] || { echo "registry DNS answers $n of $want A records"; tail -20 "$work/registry.log"; exit 1; }

# --- unbound, fed the registry's own records ----------------------------------------
cat "$work/a-names" "$work/srv-names" "$work/addr-names" >"$work/all-names"
answers "$REG_DNS_PORT" "$work/all-names" | sort -u >"$work/records"
nsrv=$(awk '$4 == "SRV"' "$work/records" | wc -l)
[ "$nsrv" = "$want" ] || { echo "registry DNS gave $nsrv of $want SRV records"; exit 1; }
bad_ttl=$(awk -v t="$TTL" '$2 != t' "$work/records" | wc -l)
[ "$bad_ttl" = 0 ] || { echo "registry records with a TTL other than $TTL:"; awk -v t="$TTL" '$2 != t' "$work/records"; exit 1; }

{
  cat <<CONF
server:
  interface: 127.0.0.1@$UNB_PORT
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$work"
  pidfile: "$work/unbound.pid"
  logfile: "$work/unbound.log"
  use-syslog: no
  verbosity: 0
  num-threads: 1
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  prefetch: no
  local-zone: "switchyard." static
  local-data: "switchyard. $TTL IN SOA ns.switchyard. hostmaster.switchyard. 1 3600 600 86400 $TTL"
CONF
  awk '{printf "  local-data: \"%s\"\n", $0}' "$work/records"
  cat <<CONF
remote-control:
  control-enable: no
CONF
} >"$work/unbound.conf"
unbound-checkconf "$work/unbound.conf" >/dev/null
taskset -c 1 unbound -d -c "$work/unbound.conf" 2>"$work/unbound.stderr" & pids+=($!)
unb_pid=$!
for _ in $(seq 1 100); do
  dig @127.0.0.1 -p "$UNB_PORT" +tries=1 +time=1 +short svc001.service.switchyard A 2>/dev/null | grep -q . && break
  kill -0 "$unb_pid" 2>/dev/null || break
  sleep 0.1
done
dig @127.0.0.1 -p "$UNB_PORT" +tries=1 +time=1 +short svc001.service.switchyard A 2>/dev/null | grep -q . \
  || { echo "unbound did not answer"; cat "$work/unbound.stderr" "$work/unbound.log" 2>/dev/null; exit 1; }

# both servers must give the same answer sections for every query in the file
answers "$REG_DNS_PORT" "$work/queries" >"$work/check-registry"
answers "$UNB_PORT" "$work/queries" >"$work/check-unbound"
if ! cmp -s "$work/check-registry" "$work/check-unbound"; then
  echo "registry and unbound answer differently:"; diff "$work/check-registry" "$work/check-unbound" | head -20; exit 1
fi
echo "$(wc -l <"$work/records") records ($want service A, $want SRV, $want addr A; TTL $TTL) in both servers;" \
  "$(wc -l <"$work/check-registry") answer records for the $(wc -l <"$work/queries") queries match"
addl() { dig @127.0.0.1 -p "$1" +noedns +ignore +tries=1 +time=1 +noall +additional "_$(svc 4)._tcp.service.switchyard" SRV | grep -c . || true; }
echo "additional records on an SRV answer: registry $(addl "$REG_DNS_PORT"), unbound $(addl "$UNB_PORT")" \
  "(see the response sizes below)"

# --- measurement ---------------------------------------------------------------------
# run <label> <port> [query-file]: one dnsperf run, prints "qps latency_ms lost size" or fails
run() {
  local label=$1 port=$2 file=${3:-queries} out qps lat lost rc size
  out=$(taskset -c 0 dnsperf -s 127.0.0.1 -p "$port" -d "$work/$file" -l "$DURATION" \
    -c "$CLIENTS" -T 1 -q "$OUTSTANDING" -t 2 2>&1) || { echo "$out" >&2; echo "dnsperf failed ($label)" >&2; return 1; }
  rc=$(echo "$out" | awk -F': *' '/Response codes:/ {print $2}')
  if ! [[ "$rc" =~ ^NOERROR\ [0-9]+\ \(100\.00%\)$ ]]; then
    echo "$out" >&2
    echo "FAIL: $label answered with response codes other than NOERROR: ${rc:-none}" >&2
    return 1
  fi
  qps=$(echo "$out" | awk '/Queries per second:/ {print $4}')
  lat=$(echo "$out" | awk '/Average Latency \(s\):/ {printf "%.3f", $4 * 1000}')
  lost=$(echo "$out" | awk '/Queries lost:/ {print $3}')
  size=$(echo "$out" | awk -F'response ' '/Average packet size:/ {print $2}')
  [ -n "$qps" ] && [ -n "$lat" ] && [ -n "$lost" ] || { echo "$out" >&2; echo "cannot parse dnsperf output" >&2; return 1; }
  echo "$qps $lat $lost $size"
}

echo "dnsperf -l $DURATION -c $CLIENTS -T 1 -q $OUTSTANDING -t 2 (UDP, no EDNS, no qps limit), dnsperf on CPU 0," \
  "server on CPU 1; $ROUNDS round(s), registry and unbound interleaved"
r_qps=(); r_lat=(); r_lost=0; u_qps=(); u_lat=(); u_lost=0
for round in $(seq 1 "$ROUNDS"); do
  read -r q l lo sz < <(run registry "$REG_DNS_PORT") || exit 1
  [ -n "${q:-}" ] || exit 1
  r_qps+=("$q"); r_lat+=("$l"); r_lost=$((r_lost + lo))
  printf 'round %d registry: %10.0f q/s  avg latency %7.3f ms  lost %d  avg response %s B  rcode NOERROR 100%%\n' "$round" "$q" "$l" "$lo" "$sz"
  read -r q l lo sz < <(run unbound "$UNB_PORT") || exit 1
  [ -n "${q:-}" ] || exit 1
  u_qps+=("$q"); u_lat+=("$l"); u_lost=$((u_lost + lo))
  printf 'round %d unbound:  %10.0f q/s  avg latency %7.3f ms  lost %d  avg response %s B  rcode NOERROR 100%%\n' "$round" "$q" "$l" "$lo" "$sz"
done

# the leases must still be there: same answers as before the runs
answers "$REG_DNS_PORT" "$work/queries" | cmp -s - "$work/check-registry" \
  || { echo "registry answers changed during the runs"; exit 1; }

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
r_rss=$(rss "$reg_pid"); u_rss=$(rss "$unb_pid")

# --- the canary split ------------------------------------------------------------------
echo "canary split: a 2.0.0 instance per service, then plain vs split A answers"
batch=(); fail=0
for s in $(seq 1 "$SERVICES"); do
  reg_one "$s" 4 2.0.0 & batch+=($!)
  if [ "${#batch[@]}" -ge 20 ]; then for b in "${batch[@]}"; do wait "$b" || fail=1; done; batch=(); fi
done
for b in "${batch[@]}"; do wait "$b" || fail=1; done
[ "$fail" = 0 ] || { echo "canary registrations failed"; exit 1; }
cp "$work/a-names" "$work/split-queries"
policies() {  # split|clear
  local s batch=()
  for s in $(seq 1 "$SERVICES"); do
    if [ "$1" = split ]; then
      "$BIN" route --registry "http://$GRPC" split "$(svc "$s")" 1.0.0=90 2.0.0=10 >/dev/null & batch+=($!)
    else
      "$BIN" route --registry "http://$GRPC" clear "$(svc "$s")" >/dev/null & batch+=($!)
    fi
    if [ "${#batch[@]}" -ge 20 ]; then for b in "${batch[@]}"; do wait "$b" || return 1; done; batch=(); fi
  done
  for b in "${batch[@]}"; do wait "$b" || return 1; done
}
# dig's answer for svc001 after each change: 4 records plain, 3 or 1 with the split.
first_answer() { dig @127.0.0.1 -p "$REG_DNS_PORT" +noedns +tries=1 +time=1 +short svc001.service.switchyard A | sort | tr '\n' ' '; }
wait_answers() {  # count of records wanted (4: plain) or "split"
  local a
  for _ in $(seq 1 100); do
    a=$(first_answer | wc -w)
    if [ "$1" = split ]; then [ "$a" = 3 ] || [ "$a" = 1 ] && return 0; else [ "$a" = "$1" ] && return 0; fi
    sleep 0.1
  done
  echo "registry DNS did not settle ($1): $(first_answer)"; return 1
}
wait_answers 4
policies split; wait_answers split
canary=0
for _ in $(seq 1 200); do
  a=$(first_answer)
  case "$a" in
    "10.1.1.4 ") canary=$((canary + 1)) ;;
    "10.1.1.1 10.1.1.2 10.1.1.3 ") ;;
    *) echo "a split answer mixing subsets: '$a'"; exit 1 ;;
  esac
done
echo "split check: $canary of 200 dig answers were the canary (want ~20: 10 %)"
[ "$canary" -ge 5 ] && [ "$canary" -le 45 ] || { echo "the split's share is off"; exit 1; }
p_qps=(); s_qps=(); p_lat=(); s_lat=()
for round in $(seq 1 "$ROUNDS"); do
  policies clear; wait_answers 4
  read -r q l lo sz < <(run "registry plain" "$REG_DNS_PORT" split-queries) || exit 1
  p_qps+=("$q"); p_lat+=("$l")
  printf 'round %d registry plain: %10.0f q/s  avg latency %7.3f ms  lost %d  avg response %s B\n' "$round" "$q" "$l" "$lo" "$sz"
  policies split; wait_answers split
  read -r q l lo sz < <(run "registry split" "$REG_DNS_PORT" split-queries) || exit 1
  s_qps+=("$q"); s_lat+=("$l")
  printf 'round %d registry split: %10.0f q/s  avg latency %7.3f ms  lost %d  avg response %s B\n' "$round" "$q" "$l" "$lo" "$sz"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mrq=$(median "${r_qps[@]}"); muq=$(median "${u_qps[@]}")
mrl=$(median "${r_lat[@]}"); mul=$(median "${u_lat[@]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'; }

echo
echo "| server (CPU 1) | median q/s | median avg latency | lost (all runs) | RSS |"
echo "|---|---:|---:|---:|---:|"
printf '| switchyard registry DNS | %.0f | %.3f ms | %d | %d KiB |\n' "$mrq" "$mrl" "$r_lost" "$r_rss"
printf '| unbound %s, num-threads 1, local-data | %.0f | %.3f ms | %d | %d KiB |\n' \
  "$(unbound -V | awk 'NR==1 {print $2}')" "$muq" "$mul" "$u_lost" "$u_rss"
printf '| ratio registry/unbound | %s | %s | | %s |\n' "$(ratio "$mrq" "$muq")" "$(ratio "$mrl" "$mul")" "$(ratio "$r_rss" "$u_rss")"
echo
echo "| registry, 100 service A names, 4 instances each | median q/s | median avg latency |"
echo "|---|---:|---:|"
printf '| plain (no policy; shuffled answers kept) | %.0f | %.3f ms |\n' "$(median "${p_qps[@]}")" "$(median "${p_lat[@]}")"
printf '| canary split 1.0.0=90 2.0.0=10 | %.0f | %.3f ms |\n' "$(median "${s_qps[@]}")" "$(median "${s_lat[@]}")"
printf '| ratio split/plain | %s | %s |\n' "$(ratio "$(median "${s_qps[@]}")" "$(median "${p_qps[@]}")")" "$(ratio "$(median "${s_lat[@]}")" "$(median "${p_lat[@]}")")"
