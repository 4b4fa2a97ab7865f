"""py-consul (PyPI, pinned in .ci/run) against a running registry's HTTP port.

Registers with a TTL check, passes it, blocks on health.service with an index and
checks it wakes within 100 ms of a change being acknowledged, deregisters. Usage:
python3 tests/consul/py_consul_check.py HOST:PORT
"""
import sys
import threading
import time

import consul

host, port = sys.argv[1].rsplit(":", 1)
c = consul.Consul(host=host, port=int(port))
# A fresh start, whatever an earlier run left.
for stale in ("pyweb-1", "pyweb-2"):
    c.agent.service.deregister(stale)

c.agent.service.register(
    "pyweb",
    service_id="pyweb-1",
    address="127.0.0.1",
    port=9000,
    tags=["version-1.2.3", "py"],
    meta={"team": "py"},
    check=consul.Check.ttl("10s"),
)
# A TTL check starts critical, as in Consul.
index, nodes = c.health.service("pyweb", passing=True)
assert nodes == [], nodes
c.agent.check.ttl_pass("service:pyweb-1")
index, nodes = c.health.service("pyweb", passing=True)
assert [n["Service"]["ID"] for n in nodes] == ["pyweb-1"], nodes
assert nodes[0]["Service"]["Meta"]["version"] == "1.2.3", nodes
assert "py" in nodes[0]["Service"]["Tags"], nodes
assert nodes[0]["Checks"][0]["Status"] == "passing", nodes

woke = {}


def block():
    i, n = c.health.service("pyweb", index=index, wait="30s")
    woke["at"] = time.monotonic()
    woke["index"] = i
    woke["ids"] = sorted(e["Service"]["ID"] for e in n)


t = threading.Thread(target=block)
t.start()
time.sleep(0.5)
assert "at" not in woke, "the blocking query returned before any change"
c.agent.service.register(
    "pyweb", service_id="pyweb-2", address="127.0.0.2", port=9000,
    check=consul.Check.ttl("10s"),
)
acked = time.monotonic()
t.join(10)
assert "at" in woke, "the blocking query did not wake"
ms = (woke["at"] - acked) * 1000
print(f"py-consul: the blocked health.service woke {ms:.1f} ms after the write was acknowledged")
assert ms < 100, ms
assert int(woke["index"]) > int(index), woke
assert woke["ids"] == ["pyweb-1", "pyweb-2"], woke

# An expired or unknown check answers 404, which py-consul returns as False.
assert c.agent.check.ttl_pass("service:nosuch") is False

_, services = c.catalog.services()
assert "pyweb" in services, services
c.agent.service.deregister("pyweb-1")
c.agent.service.deregister("pyweb-2")
_, nodes = c.health.service("pyweb")
assert nodes == [], nodes
print("py-consul ok: register with a TTL check, pass, blocking health.service, deregister")
