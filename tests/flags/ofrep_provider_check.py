"""Our OFREP replies as PyPI `openfeature-provider-ofrep==0.3.0` reads them.

tests/flags/ofrep_replies.json holds replies of core::flags::ofrep::evaluate_one (a Rust
test keeps it current). Each is handed to the provider in place of an HTTP response, and
the provider must make of it what the reply means: the value (or the code default when the
reply has none), reason and variant of a 200, the error code of a 4xx. Pinned by
tests/flags/requirements.txt. Usage: python3 tests/flags/ofrep_provider_check.py
"""
import json
import os
import sys

import requests
from openfeature.exception import OpenFeatureError
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.flag_evaluation import Reason


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "ofrep_replies.json"), encoding="utf-8") as f:
        replies = json.load(f)
    provider = OFREPProvider("http://switchyard.invalid")
    failures = 0
    for reply in replies:
        response = requests.Response()
        response.status_code = reply["status"]
        response.reason = "test"
        response._content = json.dumps(reply["body"]).encode()
        response.headers["Content-Type"] = "application/json"
        response.url = "http://switchyard.invalid/ofrep/v1/evaluate/flags/" + reply["key"]
        provider.session.post = lambda *a, **k: response  # noqa: B023
        body = reply["body"]
        value = body.get("value")
        sentinel = object()
        try:
            if isinstance(value, bool) or value is None:
                details = provider.resolve_boolean_details(reply["key"], False)
                default = False
            elif isinstance(value, str):
                details = provider.resolve_string_details(reply["key"], "code-default")
                default = "code-default"
            elif isinstance(value, int):
                details = provider.resolve_integer_details(reply["key"], -1)
                default = -1
            else:
                details = provider.resolve_object_details(reply["key"], {})
                default = {}
            got = (details.value, details.reason, details.variant)
            want = (
                body.get("value", default),
                Reason[body["reason"]] if "reason" in body else sentinel,
                body.get("variant", sentinel),
            )
        except OpenFeatureError as e:
            got = e.error_code.value
            want = body.get("errorCode") if reply["status"] != 404 else "FLAG_NOT_FOUND"
        if got != want:
            failures += 1
            print(f"{reply['key']} {reply['request']!r}: provider read {got!r}, reply means {want!r}")
    print(f"{len(replies) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
