"""Policy loading and compilation: errors name file, line and field; unsafe targets are refused."""

from __future__ import annotations

import pytest

from proxy.policy.compiler import Kind, compile_text
from proxy.policy.loader import PolicyError
from proxy.policy.paths import RESOLVE, SEARCH, Child, OfType, PathSyntaxError, Where, parse_path
from tests.conftest import unit_policy

HEADER = """fhircrypt-policy: 1
name: t
groups:
  g: {{}}
resources:
  {rtype}:
    elements:
      - path: {path}
        group: g
"""


def compile_one(path: str, rtype: str = "Patient"):
    return compile_text(HEADER.format(rtype=rtype, path=path), "p.yaml").resources[rtype].elements[0]


def test_path_parser_supports_the_documented_subset():
    assert parse_path("identifier.where(system='a|b' and use='official').value") == [
        Child("identifier"),
        Where((("system", "a|b"), ("use", "official"))),
        Child("value"),
    ]
    assert parse_path("value.ofType(Quantity)") == [Child("value"), OfType("Quantity")]
    assert parse_path("extension('http://x/y')") == [Child("extension"), Where((("url", "http://x/y"),))]
    for bad in ("name..given", "name.", ".name", "name.where(system)", "name.first()", "name.where(a='b'"):
        with pytest.raises(PathSyntaxError):
            parse_path(bad)


def test_one_path_parser_reads_policies_and_search_parameters():
    """Policies and R4 search expressions share tokens, literals and parentheses; each dialect adds its own forms."""
    for search_only in ("entry[0].resource", "value.as(Quantity)", "subject.where(resolve() is Patient)"):
        with pytest.raises(PathSyntaxError):
            parse_path(search_only)
    assert parse_path("entry[0].resource", SEARCH) == [Child("entry"), Child("resource")]
    assert parse_path("value.as(Quantity)", SEARCH) == parse_path("value.ofType(Quantity)")
    assert parse_path("subject.where(resolve() is Patient)", SEARCH) == [
        Child("subject"),
        Where(((RESOLVE, "Patient"),)),
    ]
    with pytest.raises(PathSyntaxError):
        parse_path("extension('http://x')", SEARCH)  # not a search parameter form: the parameter is unknown
    quoted = "identifier.where(system='a)b\\'c').value"  # a ')' and an escaped quote inside the literal
    assert (
        parse_path(quoted, SEARCH)
        == parse_path(quoted)
        == [
            Child("identifier"),
            Where((("system", "a)b'c"),)),
            Child("value"),
        ]
    )


@pytest.mark.parametrize(
    ("path", "rtype", "kind", "repeating"),
    [
        ("birthDate", "Patient", Kind.PRIMITIVE, False),
        ("Patient.birthDate", "Patient", Kind.PRIMITIVE, False),
        ("name", "Patient", Kind.COMPLEX, True),
        ("name.given", "Patient", Kind.PRIMITIVE, True),
        ("identifier.where(system='s').value", "Patient", Kind.PRIMITIVE, False),
        ("value", "Observation", Kind.CHOICE_MASKED, False),
        ("value.ofType(Quantity)", "Observation", Kind.CHOICE_MASKED, False),
        ("valueString", "Observation", Kind.CHOICE_MASKED, False),
        ("component.value", "Observation", Kind.CHOICE_MASKED, False),
        ("effective", "Observation", Kind.CHOICE, False),
        ("payload.content.ofType(string)", "Communication", Kind.CHOICE, False),
        ("section.text", "Composition", Kind.NARRATIVE, False),
        ("dosageInstruction", "MedicationRequest", Kind.COMPLEX, True),
        ("payload.content.ofType(Attachment)", "Communication", Kind.CHOICE, False),
        ("medication.ofType(CodeableConcept)", "MedicationRequest", Kind.CHOICE, False),
    ],
)
def test_paths_compile_to_the_documented_at_rest_form(path, rtype, kind, repeating):
    el = compile_one(path, rtype)
    assert el.kind is kind
    assert el.repeating is repeating


def test_where_terminal_keeps_the_discriminator_clear():
    el = compile_one("identifier.where(system='https://fhir.kemkes.go.id/id/nik')")
    assert el.kind is Kind.COMPLEX and el.keep == ("system",)
    ext = compile_one("extension('https://fhir.kemkes.go.id/r4/StructureDefinition/birthPlace')")
    assert ext.keep == ("url",)


@pytest.mark.parametrize(
    ("path", "rtype", "message"),
    [
        ("id", "Patient", "ids must stay in the clear"),
        ("meta", "Patient", "meta is managed"),
        ("managingOrganization", "Patient", "is a reference"),
        ("managingOrganization.reference", "Patient", "references must stay in the clear"),
        ("status", "Observation", "modifier element"),
        ("active", "Patient", "modifier element"),
        ("note", "Observation", "required child 'text'"),
        ("component", "Observation", "required child 'code'"),
        ("extension", "Patient", "select extensions by URL"),
        ("nickname", "Patient", "'nickname' is not an element of Patient"),
        ("birthDate.value", "Patient", "is a primitive"),
        ("value.ofType(Money)", "Observation", "has no type Money"),
        ("gender.where(system='x')", "Patient", "does not repeat"),
        ("contained", "Patient", "own type's policy"),
        ("text", "Patient", "narrative"),
        ("contact", "Patient", "invariant pat-1"),
        ("participant", "Encounter", "holds the reference 'participant.individual'"),
        ("section", "Composition", "invariant cmp-1"),
        ("dosage", "MedicationAdministration", "invariant mad-1"),
        ("section.section.title", "Composition", "already apply at every nesting depth"),
        ("name.given.where(x='1')", "Patient", "a primitive"),
    ],
)
def test_unsafe_or_impossible_targets_are_load_errors_naming_file_line_and_field(path, rtype, message):
    with pytest.raises(PolicyError) as err:
        compile_one(path, rtype)
    text = str(err.value)
    assert text.startswith("p.yaml:8: path:"), text
    assert message in text


def test_unknown_resource_type_group_and_field_are_named():
    with pytest.raises(PolicyError, match=r"p.yaml:6: Bundle: has no extension element"):
        compile_text(HEADER.format(rtype="Bundle", path="identifier"), "p.yaml")
    with pytest.raises(PolicyError, match=r"p.yaml:6: Patent: not an R4 resource type"):
        compile_text(HEADER.format(rtype="Patent", path="name"), "p.yaml")
    with pytest.raises(PolicyError, match=r"p.yaml:9: group: unknown group 'h'"):
        compile_text(HEADER.format(rtype="Patient", path="name").replace("group: g", "group: h"), "p.yaml")
    with pytest.raises(PolicyError, match=r"p.yaml:10: frobnicate: unknown field"):
        compile_text(HEADER.format(rtype="Patient", path="name") + "        frobnicate: 1\n", "p.yaml")
    with pytest.raises(PolicyError, match=r"p.yaml:\d+: yaml:"):
        compile_text("fhircrypt-policy: 1\nname: [unclosed\n", "p.yaml")


def test_overlapping_and_duplicate_elements_are_refused():
    doc = HEADER.format(rtype="Patient", path="name") + "      - {path: name.family, group: g}\n"
    with pytest.raises(PolicyError, match="overlaps"):
        compile_text(doc, "p.yaml")
    disjoint = (
        HEADER.format(rtype="Patient", path="identifier.where(system='a').value")
        + "      - {path: \"identifier.where(system='b').value\", group: g}\n"
    )
    assert len(compile_text(disjoint, "p.yaml").resources["Patient"].content_elements) == 2


def test_reference_display_covers_every_reference_and_narrative_needs_every_group():
    policy = unit_policy()
    encounter = policy.for_type("Encounter")
    assert encounter is not None and not encounter.search_sensitive
    assert "display:subject" in {e.field_id for e in encounter.elements}
    patient_displays = {e.field_id for e in unit_policy().for_type("Patient").elements}
    assert {"display:identifier.assigner", "display:generalPractitioner"} <= patient_displays
    assert "display:note.authorReference" in {e.field_id for e in policy.for_type("Condition").elements}
    patient = policy.for_type("Patient")
    narrative = patient.elements[-1]
    assert narrative.kind is Kind.NARRATIVE and narrative.groups == {"identity", "demographics"}
    assert patient.search_sensitive


def test_shipped_policies_compile():
    from proxy.policy.compiler import compile_file
    from tests.conftest import ROOT

    for name in ("satusehat.yaml", "hipaa.yaml"):
        policy = compile_file(ROOT / "policies" / name)
        assert policy.resources["Patient"].search_sensitive


def test_recursive_backbones_are_reached_at_every_depth():
    el = compile_one("section.title", "Composition")
    assert el.nav[0].recurse == (("section",),)
    qr = compile_one("item.answer.value.ofType(string)", "QuestionnaireResponse")
    assert set(qr.nav[0].recurse) == {("item",), ("answer", "item")}


def test_different_types_of_one_choice_are_separate_elements():
    doc = (
        HEADER.format(rtype="Communication", path="payload.content.ofType(string)")
        + "      - {path: payload.content.ofType(Attachment), group: g}\n"
    )
    assert len(compile_text(doc, "p.yaml").resources["Communication"].content_elements) == 2
    clash = HEADER.format(rtype="Observation", path="value") + "      - {path: value.ofType(Quantity), group: g}\n"
    with pytest.raises(PolicyError, match="overlaps"):
        compile_text(clash, "p.yaml")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("  graphql: {body: encrypt}\n", "operations.graphql: not a configurable operation name"),
        ("  validate: {body: maybe}\n", "operations.validate.body: must be one of uncovered, encrypt"),
        ("  validate: {parameters: [1]}\n", "operations.validate.parameters: must be a list of parameter names"),
        (
            "  validate: {forward: true}\n",
            "operations.validate: must be a mapping with parameters, body, refuse and/or read_only",
        ),
    ],
)
def test_the_operations_block_is_checked(block, message):
    with pytest.raises(PolicyError, match=message):
        compile_text(HEADER.format(rtype="Patient", path="name") + "operations:\n" + block, "p.yaml")
    rules = compile_text(
        HEADER.format(rtype="Patient", path="name") + "operations:\n  $validate: {body: encrypt, parameters: [mode]}\n",
        "p.yaml",
    ).operations
    assert rules["validate"].body == "encrypt" and rules["validate"].parameters == {"mode"}
