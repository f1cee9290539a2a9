"""No input answers 5xx: schemathesis generates requests, valid and invalid, for every operation
of the coordinator's OpenAPI document and sends them to the app over a live round.

Long polls are cut to half a second (``wait_s`` is the client's to choose, and a generated one
could hold a case for the full 30 s); everything else is sent as generated.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from fedledger.coordinator.api import create_app
from harness import Harness

EXAMPLES = 40  # per operation and mode: about 400 requests in all


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_generated_request_gets_a_server_error(
    make_harness: Callable[..., Harness], mode: GenerationMode
) -> None:
    harness = make_harness()
    harness.make_upload(harness.orgs[0])  # a committed round with something in it
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(harness.service))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    if mode is GenerationMode.NEGATIVE:  # an operation without parameters has no invalid form
        operations = [op for op in operations if _has_parameters(op)]
    sent: list[int] = []

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            if case.query and case.query.get("wait_s"):
                case.query["wait_s"] = 0.5
            response = case.call()
            sent.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code < 400:
                case.validate_response(response, checks=[response_schema_conformance])

        check()
    assert len(sent) >= 5 * len(operations)
    print(f"{mode.value}: {len(sent)} requests to {len(operations)} operations")


def _has_parameters(operation: schemathesis.APIOperation) -> bool:
    parts = (operation.path_parameters, operation.query, operation.headers, operation.body)
    return any(len(part) for part in parts)
