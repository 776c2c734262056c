"""The published OpenAPI schema is what the server does (issue 15): schemathesis sends requests the
schema allows and requests it forbids to every operation and checks each answer against the schema:
status codes documented, bodies and headers as documented, forbidden input refused, allowed input
served. Bounded: 12 examples an operation (about 200 in all), derandomized, in-process."""

import pytest
import torch
from conftest import TINY

from glassgpt.model import GPT
from glassgpt.serve import create_app
from glassgpt.tokenizer import get_tokenizer

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (hypothesis comes with it)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          positive_data_acceptance]
# Limits no JSON schema can state: a text's length in tokens (the tokenizer decides) and two texts
# of equal token counts. These routes answer such a text 422 (documented), naming the tokens.
TOKEN_BOUND = {"POST /api/inspect", "POST /api/patch"}

torch.manual_seed(0)
APP = create_app(GPT(TINY).eval(), get_tokenizer("gpt2"), max_tokens_cap=4, inspect_max_tokens=8)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_answer_is_the_one_the_schema_publishes(label):
    operation = OPERATIONS[label]
    cases = (operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
             | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @given(cases)
    @settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call()
        if response.status_code == 413:
            # A generated body over the 64 KiB cap: refused before it is read, whatever it holds
            # (schemathesis counts 413 as neither a refusal nor an acceptance).
            assert response.json()["error"].startswith("request body too large")
            return
        checks = CHECKS
        if label in TOKEN_BOUND and response.status_code == 422 and "token" in response.json()["error"]:
            checks = [check for check in CHECKS if check is not positive_data_acceptance]
        case.validate_response(response, checks=checks)

    check()


def test_every_operation_is_fuzzed():
    """The list above is the schema's: a new route is checked without editing this file."""
    expected = {"POST /generate", "POST /generate/stream", "POST /v1/completions", "GET /healthz"}
    assert expected <= set(OPERATIONS)
