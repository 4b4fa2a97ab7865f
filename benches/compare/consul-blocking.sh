#!/usr/bin/env bash
# What 10,000 held Consul blocking queries cost a registry node, and whether they slow
# writes.
#
#   benches/compare/consul-blocking.sh [watchers] [writes]      (defaults 10000 300)
#
# One release registry (fsync on, as shipped). A Python asyncio client (one thread)
# opens `watchers` blocking reads, GET /v1/health/service/svc-N?index=I&wait=5m over
# 1,000 services (10 per service at 10,000), from 127.0.0.2-127.0.0.6 so that no client
# address passes --consul-max-blocking-per-client. Before and while they are held it
# times `writes` sequential registrations (PUT /v1/agent/service/register, one
# keep-alive connection) of a service nobody watches, and reads the node's threads and
# RSS from /proc. Then one write to a watched service: how long until its 10 watchers
# have their answers. Ports 127.0.0.1:19200-19201 only. Builds the release binary if
# target/release/switchyard is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
WATCHERS=${1:-10000}
WRITES=${2:-300}
for v in "$WATCHERS" "$WRITES"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [watchers] [writes]" >&2; exit 2; }
done
[ -x target/release/switchyard ] || cargo build --release -q
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
target/release/switchyard registry --listen 127.0.0.1:19201 --peer-listen 127.0.0.1:0 --http 127.0.0.1:19200 \
  --dns off --data-dir "$work/registry" --consul-max-blocking $((WATCHERS + 100)) 2>"$work/registry.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:19200/health >/dev/null 2>&1 && break
  sleep 0.1
done
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, watchers $WATCHERS, writes $WRITES"
python3 - "$pid" "$WATCHERS" "$WRITES" <<'PY'
import asyncio, json, statistics, sys, time

PID, WATCHERS, WRITES = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
HOST, PORT = "127.0.0.1", 19200
SERVICES = 1000

def proc():
    status = open(f"/proc/{PID}/status").read().split("\n")
    get = lambda k: next(l.split()[1] for l in status if l.startswith(k))
    return int(get("Threads:")), int(get("VmRSS:")) / 1024

async def request(reader, writer, method, path, body=b""):
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    index = None
    for line in head.split(b"\r\n"):
        k, _, v = line.partition(b":")
        if k.lower() == b"content-length":
            length = int(v)
        if k.lower() == b"x-consul-index":
            index = int(v)
    body = await reader.readexactly(length)
    request.body = body
    return int(head.split()[1]), index

async def writes(reader, writer, service, n, start):
    took = []
    for i in range(n):
        body = json.dumps({"Name": service, "ID": f"{service}-{start + i}", "Address": "10.9.0.1", "Port": 80}).encode()
        t = time.perf_counter()
        status, _ = await request(reader, writer, "PUT", "/v1/agent/service/register", body)
        took.append((time.perf_counter() - t) * 1000)
        assert status == 200, status
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1]

async def main():
    r, w = await asyncio.open_connection(HOST, PORT)
    # One instance per watched service, so each has an index of its own.
    for s in range(SERVICES):
        body = json.dumps({"Name": f"svc-{s}", "ID": f"svc-{s}-0", "Address": "10.8.0.1", "Port": 80}).encode()
        assert (await request(r, w, "PUT", "/v1/agent/service/register", body))[0] == 200
    _, index = await request(r, w, "GET", "/v1/health/service/svc-7")
    threads0, rss0 = proc()
    p50a, p99a = await writes(r, w, "unwatched", WRITES, 0)
    held = []
    async def hold(i):
        ip = f"127.0.0.{2 + i % 5}"
        rr, ww = await asyncio.open_connection(HOST, PORT, local_addr=(ip, 0))
        s = i % SERVICES
        _, idx = await request(rr, ww, "GET", f"/v1/health/service/svc-{s}")
        ww.write(f"GET /v1/health/service/svc-{s}?index={idx}&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await ww.drain()
        return s, rr, ww
    for start in range(0, WATCHERS, 500):
        held += await asyncio.gather(*(hold(i) for i in range(start, min(start + 500, WATCHERS))))
    # Wait until the node holds them all.
    for _ in range(200):
        await request(r, w, "GET", "/metrics")
        text = request.body.decode()
        n = next((float(l.split()[1]) for l in text.splitlines() if l.startswith("switchyard_registry_consul_blocked_queries ")), 0)
        if n >= WATCHERS:
            break
        await asyncio.sleep(0.1)
    threads1, rss1 = proc()
    p50b, p99b = await writes(r, w, "unwatched", WRITES, WRITES)
    # A write to svc-7: its watchers answer.
    mine = [(rr, ww) for s, rr, ww in held if s == 7]
    t = time.perf_counter()
    body = json.dumps({"Name": "svc-7", "ID": "svc-7-new", "Address": "10.8.0.2", "Port": 80}).encode()
    await request(r, w, "PUT", "/v1/agent/service/register", body)
    acked = time.perf_counter()
    await asyncio.gather(*(rr.readuntil(b"\r\n\r\n") for rr, _ in mine))
    woke = (time.perf_counter() - acked) * 1000
    print(f"| | held 0 | held {WATCHERS} |")
    print(f"|---|---|---|")
    print(f"| registry threads | {threads0} | {threads1} |")
    print(f"| registry RSS MiB | {rss0:.1f} | {rss1:.1f} ({(rss1 - rss0) * 1024 * 1024 / WATCHERS / 1024:.1f} KiB per held query) |")
    print(f"| write p50 ms (unwatched service) | {p50a:.2f} | {p50b:.2f} |")
    print(f"| write p99 ms (unwatched service) | {p99a:.2f} | {p99b:.2f} |")
    print(f"| {len(mine)} watchers of the written service answered, after the ack | | {woke:.2f} ms |")
    print(f"(blocked queries held by the node: {int(n)})")

asyncio.run(main())
PY
