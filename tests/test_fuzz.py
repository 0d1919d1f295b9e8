"""Fuzz the HTTP API from its own OpenAPI document: no 5xx, nothing off the documented schema.

Driven without schemathesis' pytest plugin (it does not load under pytest 9):
each operation's Hypothesis strategy is run inside an ordinary test.
"""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api import create_app


@pytest.fixture(scope="module")
def operations(redis_url, tiny_worker):
    app = create_app({"REDIS_URL": redis_url, "TESTING": True, "KEEPALIVE_S": 0.5})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_every_route_is_in_the_document(operations):
    labels = {op.label for op in operations}
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}",
            "GET /v1/jobs/{job_id}/stream", "POST /v1/chat/completions"} <= labels


def test_api_never_errors_and_keeps_its_schema(operations):
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate()

        fuzz()
