"""The OpenFeature SDK (openfeature-sdk) with the OFREP provider
(openfeature-provider-ofrep), both from PyPI and pinned, against a sidecar's admin port.

Usage: python3 tests/flags/ofrep_check.py BIN SIDECAR_ADMIN REGISTRY_PID DIR
(run by tests/flags/ofrep_check.sh, which starts the registry and the sidecar).
"""
import os
import signal
import subprocess
import sys
import time

from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.flag_evaluation import Reason

binary, admin, registry_pid, here = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


def cli(*args):
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SystemExit(f"switchyard {' '.join(args)} failed: {out.stderr}")
    return out.stdout


cli("flags", "import", "--file", os.path.join(here, "defs", "document.json"))
# A bad definition is refused, naming the path, and changes nothing.
bad = subprocess.run(
    [binary, "flags", "set", "broken", "--file", "-"],
    input='{"state":"ENABLED","variants":{"a":1},"defaultVariant":"b"}',
    capture_output=True, text=True, timeout=30,
)
assert bad.returncode != 0 and "flags.broken.defaultVariant" in bad.stderr, bad.stderr

api.set_provider(OFREPProvider(f"http://{admin}"))
client = api.get_client()

# The sidecar gets the flags from its watch stream: wait for the first answer.
deadline = time.monotonic() + 10
while client.get_string_value("greeting", "unset") == "unset":
    assert time.monotonic() < deadline, "the sidecar never served the flags"
    time.sleep(0.05)

# Every type, and targeting.
assert client.get_boolean_value("dark-mode", True) is False
ctx = EvaluationContext(targeting_key="ann", attributes={"email": "ann@example.com"})
d = client.get_boolean_details("dark-mode", False, ctx)
assert d.value is True and d.variant == "on" and d.reason == Reason.TARGETING_MATCH, d
assert client.get_string_value("greeting", "x") == "Good day"
assert client.get_integer_value("max-items", 0) == 10
assert client.get_float_value("ratio", 0.0) == 0.25
assert client.get_object_value("theme", {}) == {"color": "grey", "size": 1}
d = client.get_string_details("missing-flag", "fallback")
assert d.value == "fallback" and d.error_code is not None and d.error_code.value == "FLAG_NOT_FOUND", d
# A type the flag does not have is the SDK's TYPE_MISMATCH, and the default.
d = client.get_boolean_details("greeting", True)
assert d.value is True and d.error_code is not None, d
# The canary-only flag: this sidecar registers web 2.0.0, whatever the caller says.
d = client.get_boolean_details("canary-banner", False,
                               EvaluationContext(attributes={"$switchyard": {"version": "1.0.0"}}))
assert d.value is True and d.variant == "on", d
print("openfeature OFREP ok: boolean, string, integer, float, object, targeting, not found, canary-only")

# A 30/70 rollout measured over many targeting keys.
n = 2000
on = sum(
    client.get_boolean_value("new-checkout", False, EvaluationContext(targeting_key=f"user-{i}"))
    for i in range(n)
)
share = on / n
print(f"fractional 30/70 over {n} keys: {share:.3f} on")
assert 0.27 <= share <= 0.33, share
# The same key always lands in the same bucket.
again = [client.get_boolean_value("new-checkout", False, EvaluationContext(targeting_key="user-7"))
         for _ in range(5)]
assert len(set(again)) == 1, again

# A change pushed from the CLI is seen at the sidecar within one watch update.
changed_at = time.monotonic()
cli("flags", "set", "greeting", "--file", os.path.join(here, "defs", "greeting-casual.json"))
acked = time.monotonic()
seen = None
while time.monotonic() < acked + 2:
    if client.get_string_value("greeting", "x") == "Hi":
        seen = time.monotonic()
        break
    time.sleep(0.002)
assert seen is not None, "the CLI's change did not reach the sidecar within 2 s"
print(f"flags set -> seen at the sidecar {(seen - acked) * 1000:.1f} ms after the CLI returned")
cli("flags", "disable", "dark-mode")
deadline = time.monotonic() + 2
while True:
    d = client.get_boolean_details("dark-mode", True, ctx)
    if d.reason == Reason.DISABLED:
        break
    assert time.monotonic() < deadline, d
    time.sleep(0.01)
assert d.value is True, d  # disabled: the code default

# The registry goes away: the sidecar keeps answering from memory.
os.kill(registry_pid, signal.SIGKILL)
time.sleep(0.5)
for _ in range(100):
    assert client.get_string_value("greeting", "x") == "Hi"
d = client.get_boolean_details("canary-banner", False)
assert d.value is True, d
print("openfeature OFREP ok: the registry killed, the sidecar still answers from memory")
