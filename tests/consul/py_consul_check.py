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

# KV: put, get (bytes back), cas, recurse and keys, a blocking get that wakes on a change.
c.kv.delete("pyconf/", recurse=True)
assert c.kv.put("pyconf/web/timeout", "5s", flags=7) is True
kv_index, entry = c.kv.get("pyconf/web/timeout")
assert entry["Value"] == b"5s" and entry["Flags"] == 7, entry
modify = entry["ModifyIndex"]
assert c.kv.put("pyconf/web/timeout", "6s", cas=modify - 1) is False
assert c.kv.put("pyconf/web/timeout", "6s", cas=modify) is True
assert c.kv.put("pyconf/api/retries", "3") is True
_, keys = c.kv.get("pyconf/", keys=True, separator="/")
assert keys == ["pyconf/api/", "pyconf/web/"], keys
_, entries = c.kv.get("pyconf/", recurse=True)
assert [e["Key"] for e in entries] == ["pyconf/api/retries", "pyconf/web/timeout"], entries
kv_index, entry = c.kv.get("pyconf/web/timeout")
got = {}


def kv_block():
    i, e = c.kv.get("pyconf/web/timeout", index=kv_index, wait="30s")
    got["at"] = time.monotonic()
    got["index"] = i
    got["value"] = e["Value"]


t = threading.Thread(target=kv_block)
t.start()
time.sleep(0.5)
assert "at" not in got, "the blocking kv.get returned before any change"
c.kv.put("pyconf/other", "x")
time.sleep(0.3)
assert "at" not in got, "a change to another key woke it"
c.kv.put("pyconf/web/timeout", "9s")
acked = time.monotonic()
t.join(10)
assert "at" in got, "the blocking kv.get did not wake"
ms = (got["at"] - acked) * 1000
print(f"py-consul: the blocked kv.get woke {ms:.1f} ms after the write was acknowledged")
assert ms < 100, ms
assert got["value"] == b"9s" and int(got["index"]) > int(kv_index), got
assert c.kv.delete("pyconf/", recurse=True) is True
assert c.kv.get("pyconf/web/timeout") [1] is None
print("py-consul ok: kv.put/get with flags and cas, keys with a separator, recurse, blocking kv.get, delete")
