"""Validation refusals speak FHIR: a path and what R4 expects there, never the validator's wording or a value.

Both validators (``structure``, the default, and ``full``, fhir.resources) are held to the same messages."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.outcome import FhirError
from proxy.transform.structure import check_structure
from proxy.transform.validation import validate_resource
from tests.conftest import FHIR_JSON, FIXTURES, unit_policy

NEEDLE = "Zqxv7NEEDLE"
# the validator library's and Python's words: none of them may reach a client
FOREIGN = re.compile(
    r"Input should|Value error|Field required|Extra inputs|pydantic|<class|\bNone\b|\bdict\b|\[\'|\'\]"
)


VALIDATORS = pytest.mark.parametrize("validate", [check_structure, validate_resource], ids=["structure", "full"])


def _issues(resource: dict, validate) -> list[tuple[str, list[str]]]:
    with pytest.raises(FhirError) as caught:
        validate(resource)
    assert caught.value.status == 400
    return [(i.diagnostics, i.expression) for i in caught.value.issues]


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        ({"resourceType": "Patient", "name": "Budi"}, "Patient.name: expected an array of HumanName"),
        (
            {"resourceType": "Patient", "birthDate": "3 Feb 1971"},
            "Patient.birthDate: expected a date (YYYY, YYYY-MM or YYYY-MM-DD)",
        ),
        (
            {"resourceType": "Patient", "name": [{"given": "Budi"}]},
            "Patient.name[0].given: expected an array of string",
        ),
        ({"resourceType": "Patient", "foo": 1}, "Patient.foo: unknown element (not defined by FHIR R4 here)"),
        (
            {"resourceType": "Patient", "name": [{"Budi Santoso": 1}]},
            "Patient.name[0]: holds a property whose name is not a FHIR element name",
        ),
        ({"resourceType": "Patient", "id": "a b"}, "Patient.id: expected an id (1 to 64 letters, digits, '-' and '.')"),
        (
            {"resourceType": "Observation", "code": {"text": "Hb"}},
            "Observation.status: required element is missing; expected a code",
        ),
        (
            {"resourceType": "Observation", "status": "final", "code": {"text": "Hb"}, "valueQuantity": {"value": "x"}},
            "Observation.valueQuantity.value: expected a decimal number",
        ),
        (
            {"resourceType": "Patient", "deceasedBoolean": True, "deceasedDateTime": "2020"},
            "Patient.deceased[x]: only one of deceasedBoolean, deceasedDateTime may be present",
        ),
        ({"resourceType": "Patient", "name": [None]}, "Patient.name: expected an array of HumanName, without null"),
        (
            {"resourceType": "Patient", "contained": [{"resourceType": "Patient", "gender": 5}]},
            "Patient.contained[0].gender: expected a code",
        ),
        (
            {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Nope"}}]},
            "Bundle.entry[0].resource.resourceType: not a FHIR R4 resource type",
        ),
        (
            {
                "resourceType": "Questionnaire",
                "status": "draft",
                "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "2", "type": "string", "text": 5}]}],
            },
            "Questionnaire.item[0].item[0].text: expected a non-empty string",
        ),
    ],
)
@VALIDATORS
def test_each_failure_names_the_fhir_path_and_the_expected_type(resource, message, validate):
    (diagnostics, expression), *_ = _issues(resource, validate)
    assert diagnostics.startswith(message), diagnostics
    assert diagnostics.startswith(expression[0] + ": ")


def _paths(node: object, at: tuple = ()) -> list[tuple]:
    """Every position in a JSON document (object members and array entries)."""
    out = [at] if at else []
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "resourceType":
                out += _paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*at, i))
    return out


def _replace(doc: object, at: tuple, value: object) -> None:
    for step in at[:-1]:
        doc = doc[step]  # type: ignore[index]
    doc[at[-1]] = value  # type: ignore[index]


SAMPLES = [
    json.loads(p.read_text()) for p in sorted((FIXTURES / "satusehat").glob("*.json")) if p.name != "needles.json"
]
WRONG_VALUES = [
    NEEDLE,
    f" {NEEDLE} ",
    987654321987,
    -7,
    1.5,
    True,
    [NEEDLE],
    [None],
    {f"{NEEDLE} Budi": 1},
    {"value": NEEDLE},
    [[]],
    {},
]
WRONG = st.sampled_from(WRONG_VALUES)


@VALIDATORS
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), WRONG)
def test_no_message_quotes_a_value_or_speaks_python(validate, data, wrong):
    """Any wrong value anywhere in real resources: each issue is '<its expression>: <FHIR wording>'."""
    sample = json.loads(json.dumps(data.draw(st.sampled_from(SAMPLES))))
    at = data.draw(st.sampled_from(_paths(sample)))
    _replace(sample, at, wrong)
    try:
        validate(sample)
    except FhirError as exc:
        for issue in exc.issues:
            assert NEEDLE not in issue.diagnostics and "987654321987" not in issue.diagnostics
            assert not FOREIGN.search(issue.diagnostics), issue.diagnostics
            assert issue.expression and issue.diagnostics.startswith(issue.expression[0] + ": "), issue.diagnostics
            assert re.match(r"^[A-Z][A-Za-z]+(\.[_A-Za-z][A-Za-z0-9]*(\[x\])?|\[\d+\])*$", issue.expression[0])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"foo":1}', "the body: resourceType is missing (expected Patient)"),
        (b'{"resourceType":"Patient","name":"Budi"}', "Patient.name: expected an array of HumanName"),
    ],
)
async def test_the_http_refusal_carries_the_fhir_message(proxy_for, clean_upstream, body, message):
    client = await proxy_for(clean_upstream.base_url, unit_policy())
    resp = await client.post("/fhir/R4/Patient", data=body, headers=FHIR_JSON)
    outcome = await resp.json()
    assert resp.status == 400, outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["diagnostics"] for i in outcome["issue"]] == [message]
    assert "Budi" not in orjson.dumps(outcome).decode()
    assert clean_upstream.requests() == []
