"""``schemathesis`` fuzzes the server's OpenAPI schema: no 5xx, no hang, documented answers.

Every operation (rank, feedback, health, metrics, admin) gets generated requests,
schema-valid and not; each response must not be a server error, must use a status
code the schema documents, and must match the documented body. The server runs on a
real home (bundle on disk, embedded store and event log).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from codistill.app.export import export_bundle
from serving.app import create_app
from serving.commands import build_server
from stores import open_configured_store


@pytest.fixture(scope="module")
def api(serving_env, tmp_path_factory: pytest.TempPathFactory):
    s, students = serving_env
    s = s.model_copy(update={
        "serving": s.serving.model_copy(update={"admin_api_key": "fuzz-key"}),
        "stream": s.stream.model_copy(update={"path": tmp_path_factory.mktemp("fuzz-events")})})
    store = open_configured_store(s)
    try:
        version = export_bundle(s, store, students["asym-bow"]).bundle_version
    finally:
        store.close()
    server = build_server(s, bundle=version)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(server))
    server.sink.close()
    server.store.close()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_only_documented_answers(api, mode: GenerationMode) -> None:
    """Each operation, valid and invalid generated requests (hypothesis, derandomized)."""
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/rank", "/v1/feedback", "/readyz",
                                              "/v1/admin/promote"}
    unfuzzable: set[str] = set()
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @hyp_settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except Unsatisfiable:  # no invalid input exists (no body, any header string is one)
            assert mode is GenerationMode.NEGATIVE, op.path
            unfuzzable.add(op.path)
    assert not unfuzzable & {"/v1/rank", "/v1/feedback", "/v1/admin/promote"}
