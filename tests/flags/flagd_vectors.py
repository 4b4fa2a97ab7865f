"""Evaluation vectors for core/src/flags, computed by flagd's own evaluator core.

The reference is PyPI `openfeature-flagd-core==2.0.0` (pinned with what it pulls in by
tests/flags/requirements.txt). This script evaluates a fixed flagd document for ~500
targeting keys and a set of hand-picked contexts and writes tests/flags/vectors.json;
a Rust test (core/src/flags/vectors.rs) evaluates every case and must match variant, value,
reason and error exactly.

Usage:
  python3 tests/flags/flagd_vectors.py            # (re)write tests/flags/vectors.json
  python3 tests/flags/flagd_vectors.py --check F  # recompute, exit 1 on any difference with F

Cases are `{"flag", "context", "variant", "value", "reason"}` for a resolution and
`{"flag", "context", "error"}` (an OpenFeature error code) for an error. A resolution with no
variant (a disabled flag, or no default variant) has `"variant": null, "value": null`: flagd
then returns the caller's code default, and we resolve with `None` as that default.
"""
import json
import logging
import os
import sys

from importlib.metadata import version

from openfeature.contrib.tools.flagd.core import FlagdCore
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import OpenFeatureError

PINNED = "2.0.0"

# Every flag kind and targeting shape the Rust side has to agree on. Keep it valid for both
# flagd-core and FlagSet::parse (which is stricter: see core/src/flags/document.rs).
DOCUMENT = {
    "$schema": "https://flagd.dev/schema/v0/flags.json",
    "metadata": {"flagSetId": "vectors", "version": "1", "team": "switchyard"},
    "$evaluators": {
        "is-internal": {"ends_with": [{"var": "email"}, "@example.com"]},
        "is-beta": {"starts_with": [{"var": "email"}, "beta-"]},
    },
    "flags": {
        "static-bool": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": "off",
        },
        "split-30-70": {
            "state": "ENABLED",
            "variants": {"treatment": "new", "control": "old"},
            "defaultVariant": "control",
            "targeting": {"fractional": [["treatment", 30], ["control", 70]]},
            "metadata": {"owner": "growth"},
        },
        "split-30-70-by-user": {
            "state": "ENABLED",
            "variants": {"treatment": "new", "control": "old"},
            "defaultVariant": "control",
            "targeting": {"fractional": [{"var": "userId"}, ["treatment", 30], ["control", 70]]},
        },
        "split-3way": {
            "state": "ENABLED",
            "variants": {"red": "#ff0000", "green": "#00ff00", "blue": "#0000ff"},
            "defaultVariant": "red",
            "targeting": {"fractional": [["red"], ["green"], ["blue"]]},
        },
        "split-3way-by-email": {
            "state": "ENABLED",
            "variants": {"red": "#ff0000", "green": "#00ff00", "blue": "#0000ff"},
            "defaultVariant": "red",
            "targeting": {
                "fractional": [
                    {"cat": [{"var": "$flagd.flagKey"}, {"var": "email"}]},
                    ["red", 20],
                    ["green", 30],
                    ["blue", 50],
                ]
            },
        },
        "split-by-score": {
            "state": "ENABLED",
            "variants": {"a": 1, "b": 2},
            "defaultVariant": "a",
            "targeting": {"fractional": [{"var": "score"}, ["a", 50], ["b", 50]]},
        },
        "split-by-object": {
            "state": "ENABLED",
            "variants": {"a": 1, "b": 2, "c": 3},
            "defaultVariant": "a",
            "targeting": {"fractional": [{"var": "account"}, ["a", 1], ["b", 1], ["c", 1]]},
        },
        "split-gated": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": "off",
            "targeting": {
                "if": [
                    {"$ref": "is-internal"},
                    {"fractional": [["on", 50], ["off", 50]]},
                    "off",
                ]
            },
        },
        "split-zero-weights": {
            "state": "ENABLED",
            "variants": {"a": "a", "b": "b"},
            "defaultVariant": "b",
            "targeting": {"fractional": [["a", 0], ["b", -5]]},
        },
        "min-version": {
            "state": "ENABLED",
            "variants": {"new": "new-client", "old": "old-client"},
            "defaultVariant": "old",
            "targeting": {"if": [{"sem_ver": [{"var": "appVersion"}, ">=", "1.4.0"]}, "new", "old"]},
        },
        "version-ops": {
            "state": "ENABLED",
            "variants": {
                "eq": "=", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
                "caret": "^", "tilde": "~", "none": "",
            },
            "defaultVariant": "none",
            "targeting": {
                "if": [
                    {"sem_ver": [{"var": "appVersion"}, "=", "v2.1.0"]}, "eq",
                    {"sem_ver": [{"var": "appVersion"}, "~", "2.1"]}, "tilde",
                    {"sem_ver": [{"var": "appVersion"}, "^", "2"]}, "caret",
                    {"sem_ver": [{"var": "appVersion"}, "<", "1.0.0"]}, "lt",
                    {"sem_ver": [{"var": "appVersion"}, "<=", "1.2.0"]}, "le",
                    {"sem_ver": [{"var": "appVersion"}, ">", "3.0.0-rc.1"]}, "gt",
                    {"sem_ver": [{"var": "appVersion"}, ">=", "1.3.0-alpha"]}, "ge",
                    {"sem_ver": [{"var": "appVersion"}, "!=", "0.0.0"]}, "ne",
                    None,
                ]
            },
        },
        "email-rules": {
            "state": "ENABLED",
            "variants": {"internal": "internal", "beta": "beta", "public": "public"},
            "defaultVariant": "public",
            "targeting": {
                "if": [
                    {"$ref": "is-internal"}, "internal",
                    {"$ref": "is-beta"}, "beta",
                    None,
                ]
            },
        },
        "killed": {
            "state": "DISABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": "on",
            "metadata": {"reason": "incident-42"},
        },
        "fallthrough": {
            "state": "ENABLED",
            "variants": {"vip": "gold", "regular": "plain"},
            "defaultVariant": "regular",
            "targeting": {"if": [{"in": [{"var": "plan"}, ["enterprise", "pro"]]}, "vip"]},
        },
        "code-default": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": None,
            "targeting": {"if": [{"==": [{"var": "plan"}, "pro"]}, "on", None]},
        },
        "code-default-static": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
        },
        "bad-variant": {
            "state": "ENABLED",
            "variants": {"a": "a"},
            "defaultVariant": "a",
            "targeting": {"if": [{"var": "pick"}, {"var": "pick"}, "a"]},
        },
        "bool-result": {
            "state": "ENABLED",
            "variants": {"true": "yes", "false": "no"},
            "defaultVariant": "false",
            "targeting": {">=": [{"var": "age"}, 18]},
        },
        "numbers": {
            "state": "ENABLED",
            "variants": {"small": 1, "large": 1000.5},
            "defaultVariant": "small",
            "targeting": {"if": [{"and": [{">": [{"var": "seats"}, 10]}, {"<=": [{"var": "seats"}, 500]}]}, "large", "small"]},
        },
        "objects": {
            "state": "ENABLED",
            "variants": {
                "dark": {"bg": "#000", "fg": "#fff", "sizes": [1, 2, 3]},
                "light": {"bg": "#fff", "fg": "#000", "sizes": []},
            },
            "defaultVariant": "light",
            "targeting": {"if": [{"==": [{"var": "theme"}, "dark"]}, "dark"]},
            "metadata": {"owner": "design", "version": 3},
        },
        "injected": {
            "state": "ENABLED",
            "variants": {"yes": True, "no": False},
            "defaultVariant": "no",
            "targeting": {
                "if": [
                    {"and": [
                        {"==": [{"var": "$flagd.flagKey"}, "injected"]},
                        {">": [{"var": "$flagd.timestamp"}, 1700000000]},
                    ]},
                    "yes",
                    "no",
                ]
            },
        },
        "zone-rule": {
            "state": "ENABLED",
            "variants": {"local": "local", "remote": "remote"},
            "defaultVariant": "remote",
            "targeting": {"if": [{"==": [{"var": "$switchyard.zone"}, "eu-1"]}, "local", "remote"]},
        },
        "logic-mix": {
            "state": "ENABLED",
            "variants": {"x": "x", "y": "y", "z": "z"},
            "defaultVariant": "z",
            "targeting": {
                "if": [
                    {"or": [
                        {"in": ["admin", {"var": "roles"}]},
                        {"and": [{"!": {"var": "guest"}}, {"<": [1, {"var": "level"}, 5]}]},
                    ]},
                    "x",
                    {"some": [{"var": "tags"}, {"==": [{"var": ""}, "vip"]}]},
                    "y",
                    {"missing": ["country"]},
                    None,
                    "z",
                ]
            },
        },
    },
}

FRACTIONAL = [
    "split-30-70",
    "split-30-70-by-user",
    "split-3way",
    "split-3way-by-email",
    "split-by-score",
    "split-by-object",
]


# The context attribute each fractional flag buckets by (None: the targeting key).
BUCKETED_BY = {
    "split-30-70": None,
    "split-30-70-by-user": "userId",
    "split-3way": None,
    "split-3way-by-email": "email",
    "split-by-score": "score",
    "split-by-object": "account",
}


def keyed_contexts():
    """~500 targeting keys, each against two of the fractional flags (to stay small)."""
    for i in range(500):
        attributes = {
            "email": f"user{i}@example.com",
            # Integers of every CBOR width, negative ones, and strings.
            "userId": [f"u{i}", -i, i * 1_000_003, i * 40_000_000_009, i][i % 5],
            # Floats that encode as CBOR half, single and double, and integral ones.
            "score": [i / 4, i / 3, i + 0.1, float(i), i / 1024][i % 5],
            "account": {"org": f"org-{i % 7}", "id": i, "paid": i % 2 == 0, "tier": [i % 3]},
        }
        for flag in [FRACTIONAL[i % len(FRACTIONAL)], FRACTIONAL[(i + 3) % len(FRACTIONAL)]]:
            ctx = {"targetingKey": f"user-{i}"}
            if BUCKETED_BY[flag]:
                ctx[BUCKETED_BY[flag]] = attributes[BUCKETED_BY[flag]]
            yield flag, ctx
        if i % 10 == 0:
            yield "split-gated", {"targetingKey": f"user-{i}", "email": attributes["email"]}


def handpicked():
    """Contexts for the non-fractional rules and the edge cases."""
    cases = []
    for flag in ["static-bool", "killed", "code-default-static", "no-such-flag", "injected"]:
        cases.append((flag, {}))
        cases.append((flag, {"targetingKey": "someone"}))
    # Fractional without a targeting key or with an unusable bucketing value → default.
    for flag in FRACTIONAL + ["split-zero-weights"]:
        cases.append((flag, {}))
        cases.append((flag, {"targetingKey": ""}))
        cases.append((flag, {"targetingKey": "k", "userId": None, "score": True, "account": "text"}))
    cases.append(("split-by-score", {"score": 0}))
    cases.append(("split-by-score", {"score": -0.0}))
    cases.append(("split-by-score", {"score": 1e300}))
    cases.append(("split-by-score", {"score": 18446744073709551615.0}))
    cases.append(("split-by-score", {"score": -9223372036854775808}))
    cases.append(("split-by-score", {"score": 65504.0}))
    cases.append(("split-by-score", {"score": 5.960464477539063e-08}))
    cases.append(("split-by-score", {"score": "ünïcödé ✓"}))
    cases.append(("split-by-score", {"score": "x" * 300}))
    cases.append(("split-by-object", {"account": {}}))
    cases.append(("split-by-object", {"account": {"bb": 1, "a": 2, "ccc": [1.5, None, False]}}))
    for version in [
        "1.4.0", "v1.4.0", "V1.4.0", "1.4", "1", "2", "1.3.9", "1.4.0-beta", "1.4.0+build.7",
        "1.10.0", "01.4.0", "1.4.0.0", "banana", "", 1.5, 2, True, None, [1, 4],
    ]:
        cases.append(("min-version", {"appVersion": version}))
    for version in [
        "2.1.0", "v2.1.0", "2.1.0+meta", "2.1.7", "2.9.0", "0.9.9", "1.1.0", "1.2.0",
        "3.0.0", "3.0.0-rc.2", "3.0.0-rc.1", "1.3.0-beta", "1.3.0-alpha", "1.3.0-alpha.1",
        "0.0.0", "0.0.1", "bad", "2.1.0-rc.1",
    ]:
        cases.append(("version-ops", {"appVersion": version}))
    for email in [
        "ann@example.com", "beta-bob@corp.io", "beta-carl@example.com", "dan@corp.io",
        "", "@example.com", "EXAMPLE.COM", 42, None, ["x@example.com"],
    ]:
        cases.append(("email-rules", {"email": email}))
        cases.append(("split-gated", {"targetingKey": f"t-{email}", "email": email}))
    for plan in ["enterprise", "pro", "free", None, 3, ["pro"]]:
        cases.append(("fallthrough", {"plan": plan}))
        cases.append(("code-default", {"plan": plan}))
    for pick in ["a", "b", None, True, 7, ""]:
        cases.append(("bad-variant", {"pick": pick}))
    for age in [17, 18, 65, "20", "abc", None, 17.9]:
        cases.append(("bool-result", {"age": age}))
    for seats in [0, 10, 11, 500, 501, "100", 10.5]:
        cases.append(("numbers", {"seats": seats}))
    for theme in ["dark", "light", None]:
        cases.append(("objects", {"theme": theme}))
    for zone in ["eu-1", "us-2", None]:
        cases.append(("zone-rule", {"$switchyard": {"zone": zone, "service": "web"}}))
    cases.append(("zone-rule", {}))
    # A caller's own `$flagd` is replaced by the evaluator's.
    cases.append(("injected", {"$flagd": {"flagKey": "other", "timestamp": 0}}))
    for ctx in [
        {"roles": ["admin"]},
        {"roles": "superadmin"},
        {"guest": False, "level": 3},
        {"guest": True, "level": 3},
        {"level": 5},
        {"tags": ["a", "vip"]},
        {"tags": []},
        {"country": "CA"},
        {"country": ""},
        {"country": None},
        {},
    ]:
        cases.append(("logic-mix", ctx))
    return cases


def evaluate(core, flag, ctx):
    attributes = {k: v for k, v in ctx.items() if k != "targetingKey"}
    ec = EvaluationContext(targeting_key=ctx.get("targetingKey"), attributes=attributes)
    case = {"flag": flag, "context": ctx}
    try:
        # The untyped resolution (flag_type=None): no type check, and None as the code
        # default, so "no variant" shows as value null.
        details = core._resolve(flag, None, ec)
    except OpenFeatureError as e:
        case["error"] = e.error_code.value
        return case
    except Exception:  # an evaluator fault: the SDK reports it as GENERAL
        case["error"] = "GENERAL"
        return case
    case["variant"] = details.variant
    case["value"] = details.value
    case["reason"] = str(details.reason.value)
    return case


def compute():
    installed = version("openfeature-flagd-core")
    if installed != PINNED:
        sys.exit(f"openfeature-flagd-core {installed} installed, vectors are pinned to {PINNED}")
    core = FlagdCore()
    core.set_flags(json.dumps(DOCUMENT))
    cases = [evaluate(core, f, c) for f, c in list(keyed_contexts()) + handpicked()]
    return {"flagd_core": PINNED, "document": DOCUMENT, "cases": cases}


def render(data):
    # One case a line: small diffs, and well under 200 KB.
    head = json.dumps({"flagd_core": data["flagd_core"], "document": data["document"]}, indent=1)
    lines = [json.dumps(c, separators=(",", ":"), ensure_ascii=False) for c in data["cases"]]
    return head[:-2] + ',\n "cases": [\n' + ",\n".join(lines) + "\n]}\n"


def main():
    # flagd-core logs every refused operand (with a traceback); the cases record the outcome.
    logging.disable(logging.CRITICAL)
    here = os.path.dirname(os.path.abspath(__file__))
    data = compute()
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        with open(sys.argv[2], encoding="utf-8") as f:
            stored = json.load(f)
        if stored == json.loads(render(data)):
            print(f"{len(data['cases'])} vectors match openfeature-flagd-core {PINNED}")
            return
        if stored.get("document") != data["document"]:
            print("document differs from the script's DOCUMENT")
        old = stored.get("cases", [])
        for i, (a, b) in enumerate(zip(old, data["cases"])):
            if a != b:
                print(f"case {i}: stored {json.dumps(a)}\n        computed {json.dumps(b)}")
        if len(old) != len(data["cases"]):
            print(f"{len(old)} cases stored, {len(data['cases'])} computed")
        sys.exit(1)
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    out = os.path.join(here, "vectors.json")
    with open(out, "w", encoding="utf-8") as f:
        f.write(render(data))
    print(f"wrote {len(data['cases'])} cases to {out}")


if __name__ == "__main__":
    main()
