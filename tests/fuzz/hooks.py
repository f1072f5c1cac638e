"""Schemathesis hooks for `make fuzz` (loaded through SCHEMATHESIS_HOOKS).

An Idempotency-Key that is valid is made unique per generated create: a
repeated key answers the first create's id even after that process was
deleted (the contract), which schemathesis' stateful availability check
cannot tell from a lost record. Invalid keys are left as generated, so
their 400 is still checked; repeats are tested in tests/it/idempotency.rs.
"""

import re
import uuid

import schemathesis

VALID = re.compile(r"^[!-~]{1,255}$")


@schemathesis.hook
def map_headers(context, headers):
    op = context.operation
    if headers is None or op is None or op.method.upper() != "POST" or op.path != "/processes":
        return headers
    for name in list(headers):
        if name.lower() == "idempotency-key":
            key = headers[name]
            if isinstance(key, str) and VALID.match(key):
                headers[name] = (key[:222] + "-" + uuid.uuid4().hex)[:255]
    return headers
