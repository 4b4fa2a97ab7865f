#!/usr/bin/env bash
# A rolling upgrade from the previous release, built from its git tag, to this one:
#
#   1. three registry nodes of the previous release (tag v0.1.0) on loopback, with a
#      registration held by a client of that release and KV writes;
#   2. the nodes are upgraded one at a time (SIGTERM, then this release on the same data
#      dir and ports). After each step: a leader, writes through an old and a new node,
#      every node reads every write, the held registration is still there, and the
#      cluster stays at log format 1 while any old node is left;
#   3. after the last one the cluster moves to log format 2 by itself;
#   4. a node of the previous release can no longer join: it is refused, naming both
#      formats ("downgrades are not supported").
#
# Usage: tests/upgrade/rolling.sh BIN [PREVIOUS_TAG]
#   BIN: this release's switchyard binary. The previous release is built with
#   `cargo build`, sharing ./target (dependencies are reused; its binary is copied out and
#   this release's is rebuilt at the end), from one of:
#   - its git tag, in a worktree, when the checkout has the tag; the script then also checks
#     that tests/upgrade/$TAG-src.tar.xz is exactly that tag's tree;
#   - tests/upgrade/$TAG-src.tar.xz otherwise: `git archive $TAG` of the paths the binary
#     needs (PREV_PATHS below). A CI checkout is often shallow or without tags, and the
#     upgrade must be tested there too. To make it for a new release:
#       git archive --format=tar TAG -- PREV_PATHS | xz -9e > tests/upgrade/TAG-src.tar.xz
set -euo pipefail
bin=$(realpath "${1:?usage: rolling.sh path/to/switchyard [tag]}")
tag=${2:-v0.1.0}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  git -C "$repo" worktree remove --force "$work/prev-src" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "rolling upgrade FAILED: $*"
  for f in "$work"/*.log; do echo "--- $f"; tail -15 "$f"; done
  exit 1
}

# What the previous release's binary is built from (the workspace's manifests and crates).
prev_paths=(Cargo.toml Cargo.lock proto core tls registry sidecar testkit benches/micro
  benches/registry-load src)
archive="$repo/tests/upgrade/$tag-src.tar.xz"
cp "$bin" "$work/new"
if git -C "$repo" rev-parse -q --verify "refs/tags/$tag" >/dev/null 2>&1; then
  echo "== building the previous release ($tag) from its tag"
  if [ -f "$archive" ]; then
    want=$(git -C "$repo" archive --format=tar "$tag" -- "${prev_paths[@]}" | sha256sum)
    have=$(xz -dc "$archive" | sha256sum)
    [ "$want" = "$have" ] || fail "$archive is not the tree of $tag; remake it (see the top of this script)"
    echo "$archive is the tree of $tag"
  fi
  git -C "$repo" worktree add -q --detach "$work/prev-src" "$tag"
else
  [ -f "$archive" ] || fail "no tag $tag in $repo and no $archive (git fetch --tags)"
  echo "== building the previous release ($tag) from $archive (this checkout has no tag $tag)"
  mkdir "$work/prev-src"
  xz -dc "$archive" | tar -x -C "$work/prev-src" || fail "cannot unpack $archive"
fi
(cd "$work/prev-src" && CARGO_TARGET_DIR="$repo/target" cargo build -q --bin switchyard)
cp "$repo/target/debug/switchyard" "$work/old"
# This release's binary again where the other tests expect it.
(cd "$repo" && cargo build -q --bin switchyard)
old="$work/old" new="$work/new"
echo "previous: $("$old" --version)  this: $("$new" --version)"

# Ports: client 178N1, HTTP 178N2, peer 178N3 for node N.
peers="1=127.0.0.1:17813,2=127.0.0.1:17823,3=127.0.0.1:17833"
start() { # start NODE BINARY
  local n=$1 b=$2
  "$b" registry --node-id "$n" --peers "$peers" --peer-listen "127.0.0.1:178${n}3" \
    --listen "127.0.0.1:178${n}1" --http "127.0.0.1:178${n}2" --dns off \
    --data-dir "$work/node$n" --lease-checkpoint-interval 500ms 2>>"$work/node$n.log" &
  pid[$n]=$!
  pids+=($!)
}
url() { echo "http://127.0.0.1:178${1}1"; }
metric() { # metric NODE NAME
  curl -sf "127.0.0.1:178${1}2/metrics" | awk -v m="$2" '$1 == m { print $2 }'
}
wait_leader() {
  for _ in $(seq 1 200); do
    for n in 1 2 3; do
      l=$(metric "$n" switchyard_registry_raft_leader || true)
      [ -n "$l" ] && [ "$l" != "0" ] && return 0
    done
    sleep 0.1
  done
  fail "no leader within 20 s"
}
writes=0
write_through() { # write_through NODE BINARY
  writes=$((writes + 1))
  for _ in $(seq 1 50); do
    if "$2" kv put --registry "$(url "$1")" "upgrade/k$writes" "v$writes" >/dev/null 2>>"$work/cli.log"; then
      return 0
    fi
    sleep 0.2
  done
  fail "write $writes through node $1 was not acknowledged"
}
check_reads() { # every node has every write and the held registration
  for n in 1 2 3; do
    for _ in $(seq 1 50); do
      got=$("$new" kv list --registry "$(url "$n")" upgrade/ 2>/dev/null | grep -c '^upgrade/k' || true)
      [ "$got" = "$writes" ] && break
      sleep 0.2
    done
    [ "$got" = "$writes" ] || fail "node $n has $got of $writes writes"
    # Read whole, then searched: `| grep -q` may close the pipe before the CLI is done.
    held=$("$new" instances held --registry "$(url "$n")" -o json) ||
      fail "node $n did not answer instances held"
    grep -q '"held-1"' <<<"$held" || fail "node $n lost the held registration"
  done
}
cluster_format_is() { # cluster_format_is FORMAT NODES...
  local f=$1; shift
  for n in "$@"; do
    for _ in $(seq 1 100); do
      [ "$(metric "$n" switchyard_registry_cluster_format || true)" = "$f" ] && continue 2
      sleep 0.1
    done
    fail "node $n: cluster format $(metric "$n" switchyard_registry_cluster_format || true), expected $f"
  done
}

echo "== three nodes of $tag"
for n in 1 2 3; do start "$n" "$old"; done
wait_leader
"$old" register --registry "$(url 1)" --service held --id held-1 --address 127.0.0.1 \
  --port 9 --version 1.0.0 >"$work/held.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -qs registered "$work/held.log" && break; sleep 0.1; done
grep -q registered "$work/held.log" || fail "the held registration did not register"
write_through 1 "$old"
write_through 2 "$old"
check_reads

declare -A upgraded=()
for n in 3 2 1; do
  echo "== upgrading node $n"
  kill -TERM "${pid[$n]}"
  wait "${pid[$n]}" 2>/dev/null || true
  start "$n" "$new"
  upgraded[$n]=1
  wait_leader
  for _ in $(seq 1 100); do
    curl -sf "127.0.0.1:178${n}2/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  write_through "$n" "$new"
  for m in 1 2 3; do
    if [ -z "${upgraded[$m]:-}" ]; then write_through "$m" "$old"; break; fi
  done
  check_reads
  if [ "${#upgraded[@]}" -lt 3 ]; then
    # Give the leader a few polls: it must not move while an old node is left.
    sleep 3
    cluster_format_is 1 "${!upgraded[@]}"
    echo "node $n upgraded; $writes writes on every node; cluster format still 1"
  fi
done
cluster_format_is 2 1 2 3
write_through 1 "$new"
check_reads
echo "every node upgraded: cluster format 2, $writes writes and the held registration on every node"

echo "== a node of $tag may no longer join"
"$old" registry --node-id 4 --join 127.0.0.1:17813 --advertise 127.0.0.1:17843 \
  --peer-listen 127.0.0.1:17843 --listen 127.0.0.1:17841 --http 127.0.0.1:17842 --dns off \
  --data-dir "$work/node4" 2>"$work/node4.log" &
pids+=($!)
for _ in $(seq 1 150); do
  grep -q "downgrades are not supported" "$work/node4.log" && break
  sleep 0.1
done
grep -q "downgrades are not supported" "$work/node4.log" ||
  fail "the old node was not refused with a reason"
grep -o "runs release [^:]*" "$work/node4.log" | head -1
members=$("$new" members --registry "$(url 1)" -o json)
echo "$members" | grep -q '"id": *4' && fail "the old node was added: $members"
echo "rolling upgrade ok: $tag -> $("$new" --version | awk '{print $2}'), no write or registration lost, format 1 until the last node, then 2; an old node refused"
