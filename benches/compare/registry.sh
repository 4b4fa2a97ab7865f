#!/usr/bin/env bash
# The switchyard registry against etcd 3 doing the equivalent work, with the same load
# client (benches/registry-load), single node and three nodes on loopback:
#
#   register  new instance + new lease        switchyard: Register   etcd: LeaseGrant + Put
#   renew     lease renewals over streams     switchyard: KeepAlive  etcd: LeaseKeepAlive
#   watch     delay for one change to reach   switchyard: Watch      etcd: prefix Watch
#             WATCHERS watchers (from sending the write to each watcher receiving it)
#   fill      FILL_COUNT instances, 100 per lease, then the server's RSS (single node)
#   watch at scale  (single node, a fresh server) WATCHERS_LARGE watchers (10000: one per
#             sidecar of a large fleet; 100 streams per connection) x CHANGES changes: the
#             delay, and the server's peak RSS (VmHWM) growth over its RSS before, per watcher
#
#   benches/compare/registry.sh [seconds-per-run] [rounds]
#
# Each round starts every setup fresh (new data dirs), switchyard and etcd alternating
# which goes first; the table shows medians over rounds. Servers are pinned to CPU 1 and
# the load client to CPU 0 (in the 3-node setups all three servers share CPU 1, so those
# figures show the cost of replication on one core, not the gain of three machines).
# etcd runs with its defaults (fsync on every commit, like switchyard).
#
# Environment: WATCHERS (1000), WATCHERS_LARGE (10000; 0 skips it), CHANGES (200),
# LEASES (1000), FILL_COUNT (100000),
# FILL_NODES ("1"; "1 3" also fills the 3-node setups), SETUPS ("1 3"),
# SKIP_BUILD=1 (use the binaries in target/release as they are).
# Installs etcd-server and etcd-client from Debian if missing. Uses loopback ports
# 19200-19331 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
ROUNDS=${2:-3}
WATCHERS=${WATCHERS:-1000}
WATCHERS_LARGE=${WATCHERS_LARGE:-10000}
CHANGES=${CHANGES:-200}
LEASES=${LEASES:-1000}
FILL_COUNT=${FILL_COUNT:-100000}
FILL_NODES=${FILL_NODES:-1}
SETUPS=${SETUPS:-1 3}

if ! command -v etcd >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
if ! command -v taskset >/dev/null 2>&1; then
  apt-get install -y -qq util-linux >/dev/null
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -q -p registry-load -p switchyard
fi
LOAD=$PWD/target/release/registry-load
SY=$PWD/target/release/switchyard
ETCD=$(command -v etcd)

if [ "$(nproc)" -ge 2 ]; then
  SRV=(taskset -c 1)
  CLI=(taskset -c 0)
  PINNING="servers on CPU 1 (all three nodes share it in the 3-node setups), load client on CPU 0"
else
  SRV=()
  CLI=()
  PINNING="unpinned (fewer than 2 CPUs)"
fi

work=$(mktemp -d /tmp/registry-bench.XXXXXX)
# Only the servers of the current setup run at any time; stop() reaps them, so the
# cleanup never signals a pid that has been reused.
server_pids=()
endpoints=""
cleanup() {
  local p
  for p in "${server_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${server_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/res"

# start TARGET NODES DIR: fresh servers; sets server_pids and endpoints; waits until a
# write succeeds on every endpoint (a leader is elected).
start() {
  local target=$1 nodes=$2 dir=$3 i p
  mkdir -p "$dir"
  server_pids=()
  # A leftover server on our ports would silently take the load: refuse to start.
  for p in 19200 19210 19220 19230 19300 19310 19320 19330; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "port $p is already in use on 127.0.0.1: stop whatever listens there first" >&2
      return 1
    fi
  done
  if [ "$target" = switchyard ]; then
    if [ "$nodes" = 1 ]; then
      "${SRV[@]}" "$SY" registry --listen 127.0.0.1:19200 --peer-listen 127.0.0.1:19202 --http 127.0.0.1:19201 --dns off \
        --data-dir "$dir/n1" 2>"$dir/n1.log" &
      server_pids+=($!)
      endpoints=http://127.0.0.1:19200
    else
      local peers=1=127.0.0.1:19212,2=127.0.0.1:19222,3=127.0.0.1:19232
      for i in 1 2 3; do
        "${SRV[@]}" "$SY" registry --node-id "$i" --peers "$peers" \
          --listen "127.0.0.1:192${i}0" --peer-listen "127.0.0.1:192${i}2" --http "127.0.0.1:192${i}1" --dns off \
          --data-dir "$dir/n$i" 2>"$dir/n$i.log" &
        server_pids+=($!)
      done
      endpoints=http://127.0.0.1:19210,http://127.0.0.1:19220,http://127.0.0.1:19230
    fi
  else
    if [ "$nodes" = 1 ]; then
      "${SRV[@]}" "$ETCD" --name n1 --data-dir "$dir/n1" \
        --listen-client-urls http://127.0.0.1:19300 --advertise-client-urls http://127.0.0.1:19300 \
        --listen-peer-urls http://127.0.0.1:19301 --initial-advertise-peer-urls http://127.0.0.1:19301 \
        --initial-cluster n1=http://127.0.0.1:19301 --initial-cluster-state new \
        --initial-cluster-token bench-1 >"$dir/n1.log" 2>&1 &
      server_pids+=($!)
      endpoints=http://127.0.0.1:19300
    else
      local cluster=n1=http://127.0.0.1:19311,n2=http://127.0.0.1:19321,n3=http://127.0.0.1:19331
      for i in 1 2 3; do
        "${SRV[@]}" "$ETCD" --name "n$i" --data-dir "$dir/n$i" \
          --listen-client-urls "http://127.0.0.1:193${i}0" \
          --advertise-client-urls "http://127.0.0.1:193${i}0" \
          --listen-peer-urls "http://127.0.0.1:193${i}1" \
          --initial-advertise-peer-urls "http://127.0.0.1:193${i}1" \
          --initial-cluster "$cluster" --initial-cluster-state new \
          --initial-cluster-token bench-3 >"$dir/n$i.log" 2>&1 &
        server_pids+=($!)
      done
      endpoints=http://127.0.0.1:19310,http://127.0.0.1:19320,http://127.0.0.1:19330
    fi
  fi
  if ! "${CLI[@]}" "$LOAD" --target "$target" --endpoints "$endpoints" --seconds 60 ready >/dev/null; then
    echo "$target ($nodes nodes) never became ready; logs in $dir" >&2
    tail -n 20 "$dir"/n*.log >&2
    return 1
  fi
  for p in "${server_pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "$target ($nodes nodes): server $p exited; logs in $dir" >&2
      tail -n 20 "$dir"/n*.log >&2
      return 1
    fi
  done
}

stop() {
  local p
  for p in "${server_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${server_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  server_pids=()
}

# record NAME VALUE: one sample of a metric (a file per metric, a line per round).
record() { echo "$2" >>"$work/res/$1"; }
# field LINE KEY: the value of KEY=... in a RESULT line.
field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k {print $2}'; }

# load TARGET ARGS...: runs the client, prints its RESULT line (empty on failure).
load() {
  local target=$1 out
  shift
  if out=$("${CLI[@]}" "$LOAD" --target "$target" --endpoints "$endpoints" "$@"); then
    grep '^RESULT' <<<"$out" || true
  else
    echo "registry-load --target $target $* failed" >&2
  fi
}

# status_kib FIELD: the largest /proc status FIELD among the current servers, in KiB.
status_kib() {
  local p max=0 v
  for p in "${server_pids[@]}"; do
    v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${v:-0}" -gt "$max" ] && max=$v
  done
  echo "$max"
}
rss_kib() { status_kib VmRSS; }   # resident now
hwm_kib() { status_kib VmHWM; }   # peak resident

run_setup() {
  local target=$1 nodes=$2 round=$3 r k key dir
  key="$target-$nodes"
  dir="$work/r$round-$key"
  start "$target" "$nodes" "$dir"
  r=$(load "$target" --seconds "$SECS" register)
  echo "  $r"
  if [ -n "$r" ]; then
    record "$key-reg_rate" "$(field "$r" rate)"
    record "$key-reg_p50" "$(field "$r" p50_ms)"
    record "$key-reg_p99" "$(field "$r" p99_ms)"
  fi
  r=$(load "$target" --seconds "$SECS" --count "$LEASES" renew)
  echo "  $r"
  [ -n "$r" ] && record "$key-renew_rate" "$(field "$r" rate)"
  if [ "$target" = switchyard ]; then
    # No etcd equivalent: etcd's keep-alive carries one lease per message.
    r=$(load "$target" --seconds "$SECS" --count "$LEASES" renew --batch 100)
    echo "  $r"
    [ -n "$r" ] && record "$key-renew100_rate" "$(field "$r" rate)"
  fi
  r=$(load "$target" --concurrency "$WATCHERS" --count "$CHANGES" watch)
  echo "  $r"
  if [ -n "$r" ]; then
    for k in p50_ms p99_ms max_ms missed; do record "$key-watch_$k" "$(field "$r" "$k")"; done
  fi
  stop
  if [[ " $FILL_NODES " == *" $nodes "* ]]; then
    start "$target" "$nodes" "$dir-fill"
    record "$key-rss_idle" "$(rss_kib)"
    r=$(load "$target" --count "$FILL_COUNT" fill)
    echo "  $r"
    if [ -n "$r" ]; then
      sleep 2
      record "$key-fill_rate" "$(field "$r" rate)"
      record "$key-rss_fill" "$(rss_kib)"
      echo "  RSS after fill: $(rss_kib) KiB (idle: $(tail -n 1 "$work/res/$key-rss_idle") KiB)"
    fi
    stop
  fi
  if [ "$nodes" = 1 ] && [ "$WATCHERS_LARGE" -gt 0 ]; then
    local before peak
    start "$target" "$nodes" "$dir-watch"
    before=$(rss_kib)
    r=$(load "$target" --concurrency "$WATCHERS_LARGE" --count "$CHANGES" watch)
    echo "  $r"
    peak=$(hwm_kib)
    if [ -n "$r" ]; then
      for k in p50_ms p99_ms max_ms missed; do record "$key-watchL_$k" "$(field "$r" "$k")"; done
      record "$key-watchL_bytes" $(( (peak - before) * 1024 / WATCHERS_LARGE ))
      echo "  peak RSS $peak KiB, $before KiB before the watchers: $(( (peak - before) * 1024 / WATCHERS_LARGE )) bytes per watcher"
    fi
    stop
  fi
  rm -rf "$dir" "$dir-fill" "$dir-watch"
}

echo "registry vs etcd: ${SECS}s per run, $ROUNDS rounds, $WATCHERS watchers x $CHANGES changes, $LEASES leases, fill $FILL_COUNT"
echo "etcd: $("$ETCD" --version | head -n 1); $PINNING"
for round in $(seq 1 "$ROUNDS"); do
  for nodes in $SETUPS; do
    if [ $((round % 2)) = 1 ]; then order="switchyard etcd"; else order="etcd switchyard"; fi
    for target in $order; do
      echo "round $round: $target, $nodes node(s)"
      run_setup "$target" "$nodes" "$round"
    done
  done
done

median() {
  local f="$work/res/$1"
  [ -s "$f" ] || { echo "-"; return; }
  sort -g "$f" | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'
}
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'
}
mib() { [ "$1" = "-" ] && echo "-" || awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

echo
echo "Medians of $ROUNDS rounds; $PINNING. Ratio = switchyard / etcd."
echo
echo "| metric | nodes | switchyard | etcd | ratio | better |"
echo "|---|---|---|---|---|---|"
row() { # label metric nodes better [mib]
  local s e
  s=$(median "switchyard-$3-$2")
  e=$(median "etcd-$3-$2")
  if [ "${5:-}" = mib ]; then s=$(mib "$s"); e=$(mib "$e"); fi
  echo "| $1 | $3 | $s | $e | $(ratio "$s" "$e") | $4 |"
}
for nodes in $SETUPS; do
  row "registrations/s (switchyard 1 RPC, etcd grant+put)" reg_rate "$nodes" higher
  row "register p50 ms" reg_p50 "$nodes" lower
  row "register p99 ms" reg_p99 "$nodes" lower
  row "lease renewals/s (1 lease per message)" renew_rate "$nodes" higher
  echo "| lease renewals/s, 100 leases per message (switchyard only) | $nodes | $(median "switchyard-$nodes-renew100_rate") | - | - | higher |"
  row "watch delay p50 ms ($WATCHERS watchers, from send)" watch_p50_ms "$nodes" lower
  row "watch delay p99 ms" watch_p99_ms "$nodes" lower
  row "watch delay max ms" watch_max_ms "$nodes" lower
  row "watch deliveries missed" watch_missed "$nodes" lower
  if [ "$nodes" = 1 ] && [ "$WATCHERS_LARGE" -gt 0 ]; then
    row "watch delay p50 ms ($WATCHERS_LARGE watchers)" watchL_p50_ms "$nodes" lower
    row "watch delay p99 ms ($WATCHERS_LARGE watchers)" watchL_p99_ms "$nodes" lower
    row "watch delay max ms ($WATCHERS_LARGE watchers)" watchL_max_ms "$nodes" lower
    row "watch deliveries missed ($WATCHERS_LARGE watchers)" watchL_missed "$nodes" lower
    row "peak RSS growth per watcher, bytes ($WATCHERS_LARGE watchers)" watchL_bytes "$nodes" lower
  fi
  if [[ " $FILL_NODES " == *" $nodes "* ]]; then
    row "fill rate (instances/s)" fill_rate "$nodes" higher
    row "RSS idle MiB (largest node)" rss_idle "$nodes" lower mib
    row "RSS with $FILL_COUNT instances MiB (largest node)" rss_fill "$nodes" lower mib
  fi
done
