"""Schemathesis against the live API: the OpenAPI document served at /openapi.json, fuzzed.

The API runs with the real broker, a worker and fake providers (every request type has a
target), and schemathesis's command line runs against it in a subprocess while the test's event
loop serves it. Its phases: coverage cases (boundaries, missing and wrong values, methods the
document does not list), generated cases valid and invalid for every operation, and stateful
scenarios that follow each submit's 202 link to the poll of the same request type, so that polls
see real jobs, pending and finished. Every response is checked with all of schemathesis's checks:
no 5xx, statuses, headers and bodies as documented, valid requests accepted and invalid ones
refused.

Why the command line rather than schemathesis's pytest plugin: its lazy schemas (``from_fixture``,
which a live server needs) set a pytest node attribute that pytest 9.2 removed.

This module is also the run's hooks file (schemathesis imports it): it holds one check, see
``negative_data_rejection_of_forms_as_sent``.

``--fuzz-examples N`` (tests/conftest.py) sets the cases per operation and phase: the default 50
takes about a minute, 1000 about a quarter of an hour.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.transforms import to_wire_text
from schemathesis.specs.openapi.checks import negative_data_rejection
from schemathesis.transport.serialization import Binary

from api.openapi import OPENAPI_PATH
from app.settings import Settings
from deploy.fakes.openai_server import FakeMistral, FakeOpenAI
from tests.helpers import PROVIDER_KEY, ferry_settings_for

REPOSITORY = Path(__file__).resolve().parents[2]

# Bounded, and loosely: a long run (--fuzz-examples 1000) takes a quarter of an hour.
pytestmark = pytest.mark.timeout(3600)


# -- the check this module gives the run ---------------------------------------------------------------


def _part_text(value: Any) -> Any:
    """One part of a form as the API reads it: bytes (a file's stand in as text of their length) or text."""
    if isinstance(value, Binary):
        return "x" * len(value.data)
    return value if isinstance(value, str) else to_wire_text(value)


def _form_as_sent(body: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A form body as the parts it is sent as, shaped for the form's schema. A form has no types:
    a value is its parts' text, one part for a field the schema has single, a list for one it may
    repeat (a single value and a list of one are the same part, and an empty list is no part).
    Repeated ``fallbacks`` fields are one comma-separated field, as the document says."""
    properties = schema.get("properties", {})
    form: dict[str, Any] = {}
    for name, value in body.items():
        parts = [_part_text(item) for item in (value if isinstance(value, list) else [value])]
        if not parts:
            continue
        types = properties.get(name, schema.get("additionalProperties", {})).get("type", [])
        if name == "fallbacks":
            form[name] = ",".join(parts)
        elif len(parts) == 1 and types != "array":
            form[name] = parts[0]
        else:
            form[name] = parts
    return form


def _form_is_valid(case: schemathesis.Case) -> bool:
    document = case.operation.schema.raw_schema
    operation = document["paths"][case.operation.path][case.operation.method.lower()]
    reference = operation["requestBody"]["content"][case.media_type]["schema"]["$ref"]
    schema = document["components"]["schemas"][reference.rsplit("/", 1)[-1]]
    validator = jsonschema_rs.Draft202012Validator({"$ref": reference, "components": document["components"]})
    return validator.is_valid(_form_as_sent(case.body, schema))


@schemathesis.check
def negative_data_rejection_of_forms_as_sent(ctx, response, case):
    """Schemathesis's negative_data_rejection, judging a multipart form by the parts it is sent as.

    Schemathesis 4.32 judges a mutated form by its generated values, with each file replaced by
    "": with a file that must not be empty, every mutation then looks invalid, so mutations that
    leave the form valid on the wire are sent as invalid data and reported when the API accepts
    them (appending "*" to a value of an open-ended pattern; a string where the schema has an
    array of files, which is the same single part). Here a form whose parts fit the document is
    not invalid data; any other case (a JSON body, a negative header) is checked by schemathesis's
    check as it is.
    """
    meta = case.meta
    negative_elsewhere = meta is not None and any(
        info.mode.is_negative for location, info in meta.components.items() if location != ParameterLocation.BODY)
    if (meta is not None and meta.is_negative_at(ParameterLocation.BODY) and not negative_elsewhere
            and case.media_type == "multipart/form-data" and isinstance(case.body, dict) and _form_is_valid(case)):
        return None
    return negative_data_rejection(ctx, response, case)


# -- the test ---------------------------------------------------------------------------------------


@pytest.fixture
async def fake_mistral() -> FakeMistral:
    fake = await FakeMistral(api_key=PROVIDER_KEY).start()
    yield fake
    await fake.stop()


@pytest.fixture
def ferry_settings(settings: Settings, fake_openai: FakeOpenAI, fake_mistral: FakeMistral) -> Settings:
    """The fake OpenAI as openai, and as together for rerank; the fake Mistral for OCR: every
    request type has a provider, so the document lets valid submits through."""
    def provider(base_url: str) -> dict:
        return {"base_url": base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 5}

    return ferry_settings_for(
        settings, fake_openai, retry_initial_backoff_seconds=0.05, retry_max_attempts=2,
        providers={"openai": provider(fake_openai.base_url), "together": provider(fake_openai.base_url),
                   "mistral": provider(fake_mistral.base_url)},
    )


@pytest.fixture
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--fuzz-examples")


@pytest.fixture
def fuzz_seed(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--fuzz-seed")


async def run_schemathesis(url: str, examples: int, workdir: Path, seed: int) -> tuple[int, str, dict]:
    """schemathesis run against ``url``: its exit code, its output and its JSON report."""
    config = workdir / "schemathesis.toml"
    # Stateful scenarios follow the document's links only: inferred ones (each submit to every
    # type's poll) would spend the scenarios on polls that answer 404 by design.
    config.write_text(f"hooks = {json.dumps(__file__)}\n[phases.stateful.inference]\nalgorithms = []\n")
    report = workdir / "report.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", url,
        "--checks", "all", "--exclude-checks", "negative_data_rejection",
        "--max-examples", str(examples), "--seed", str(seed), "--workers", "1", "--request-timeout", "30",
        "--generation-database", "none", "--report", "json", "--report-json-path", str(report), "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=REPOSITORY,  # the hooks (this module) import the project's packages
    )
    try:
        output, _ = await process.communicate()
    finally:
        if process.returncode is None:  # the test timed out or was interrupted
            process.kill()
            await process.wait()
    return process.returncode, output.decode(errors="replace"), json.loads(report.read_text())


async def test_the_api_does_what_its_document_says(api, worker, tmp_path: Path, fuzz_examples: int,
                                                   fuzz_seed: int) -> None:
    returncode, output, report = await run_schemathesis(str(api.make_url(OPENAPI_PATH)), fuzz_examples, tmp_path,
                                                        fuzz_seed)

    assert returncode == 0, f"schemathesis found failures:\n{output}"
    document = await (await api.get(OPENAPI_PATH)).json()
    operations = sum(len(item) for item in document["paths"].values())
    # schemathesis leaves out the operation serving the document it was given.
    assert report["operations"]["tested"] == report["operations"]["total"] == operations - 1
    assert {name: phase["status"] for name, phase in report["phases"].items()} == {
        "examples": "skip", "coverage": "success", "fuzzing": "success", "stateful": "success"}
