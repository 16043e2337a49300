"""Creates, updates and patches: the stored version read, the write judged on what it stores, encryption."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping

import jsonpatch
import jsonpointer
import orjson

from proxy.auth.decision import Decision, key_holder
from proxy.outcome import FhirError
from proxy.policy.access import CallerGrants
from proxy.transform import jsonnum, sentinel
from proxy.transform.attachments import refuse_external
from proxy.transform.bodies import decrypt_body, encrypt_for_write, nested_resources, shape_refusal, too_deep
from proxy.transform.interactions import Interaction
from proxy.transform.operations import resources_to_encrypt
from proxy.transform.records import ReadReport, ShapeError
from proxy.transform.write_judgement import (
    WriteAccess,
    check_compartment,
    holds_masked,
    judge_groups,
    restore_masked,
)
from proxy.web import headers as hdr


async def stored_version(rt, it: Interaction, request_id: str, authorization: str | None) -> dict | None:
    """The current version at the upstream as stored (encrypted), or None when there is none.

    Read through the upstream client: with the proxy's credential, or the caller's when forwarded."""
    url = f"{it.resource_type}/{it.id}"
    headers = {"Accept": hdr.FHIR_JSON, "X-Request-ID": request_id}
    async with rt.client.request("GET", url, headers=headers, caller_authorization=authorization) as resp:
        status, raw = resp.status, await rt.client.read(resp)
    if status in (404, 410):
        return None
    try:
        stored = jsonnum.loads(raw) if status == 200 and raw is not None else None
    except orjson.JSONDecodeError:
        stored = None
    if type(stored) is not dict or stored.get("resourceType") != it.resource_type or too_deep(stored):
        raise FhirError(502, "structure", "the upstream did not return the stored version")
    return stored


async def _decrypted(rt, it: Interaction, stored: dict) -> dict:
    """The stored version decrypted in full, nested resources included, for the judgement (never sent
    anywhere). Decrypted in place: pass a copy if the stored form is still needed."""
    await rt.prefetch_patient_keys(stored)
    report = ReadReport()
    decrypt_body(stored, rt.policy, rt.read_keys, key_holder(), report)
    _refuse_shredded(it, report)
    if report.failures:
        raise FhirError(
            409,
            "conflict",
            f"{it.resource_type}/{it.id}: the stored version fails verification, so the write cannot be "
            "judged against it (nor its masked elements restored from it)",
        )
    return stored


def _refuse_shredded(it: Interaction, report: ReadReport) -> None:
    if report.shredded:
        where = f"{it.resource_type}/{it.id}"
        raise FhirError(409, "conflict", f"{where} was crypto-shredded: its elements cannot be restored or patched")


def _confined(it: Interaction, grants: CallerGrants | None, access: str) -> bool:
    """Refuse (403) a caller without a scope for ``access`` on the type; True when its scopes for it
    are patient/ scopes only (it is confined to its patient's compartment)."""
    where = it.resource_type or ""
    if grants is None:
        raise FhirError(403, "forbidden", "the policy has no access rules, so it grants no writes", [where])
    if not grants.has_scope(where, access):
        raise FhirError(403, "forbidden", f"this caller has no {access} scope for {where}", [where])
    return grants.patient_only(where, access)


async def check_scope(
    rt,
    it: Interaction,
    grants: CallerGrants | None,
    access: str,
    resource: dict | None,
    request_id: str,
    authorization: str | None,
) -> dict | None:
    """A write or delete needs a scope for the type; a caller confined to its patient's compartment also
    needs the *stored* resource (and ``resource``, when given) wholly in it, and may not write by search.
    Returns the stored version when it was read."""
    if not _confined(it, grants, access):
        return None
    if it.conditional:
        raise FhirError(
            403, "forbidden", "patient-scoped callers cannot write by search (conditional)", [it.resource_type or ""]
        )
    patient = grants.caller.patient  # type: ignore[union-attr]
    stored = await stored_version(rt, it, request_id, authorization) if it.id else None
    for candidate, state in ((stored, "stored"), (resource, "written")):
        if candidate is not None:
            check_compartment(candidate, patient, state)
    return stored


async def prepare_write(
    rt,
    it: Interaction,
    resource: dict,
    grants: CallerGrants | None,
    restricted: bool,
    request_headers: Mapping[str, str],
    request_id: str,
    stored: dict | None = None,
    names: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Judge a write on the resource stored after it, validate and encrypt ``resource`` in place; returns
    the headers to add upstream (an If-Match on the version the write was judged against, so a
    concurrent writer gets a conflict instead of a lost update).

    Every route that writes a resource comes here: create, update, conditional update, the result of
    a JSON Patch (``stored`` is then the version it was applied to), each Bundle entry and the
    resources in an operation's body. After encryption the PHI sentinel looks at what is left in the
    clear (``names``: words of names that other resources of the same request encrypt, e.g. the
    Patient of a transaction)."""
    try:  # the judgement walks covered paths before validation: a wrong JSON type is a 400
        stored = await _judge(rt, it, resource, grants, restricted, request_headers, request_id, stored)
    except ShapeError as exc:
        raise shape_refusal(it.resource_type or "?", exc) from None
    extra: dict[str, str] = {}
    version = (stored.get("meta") or {}).get("versionId") if stored is not None else None
    if "If-Match" not in request_headers and isinstance(version, str):
        extra["If-Match"] = f'W/"{version}"'
    policy = rt.policy
    if policy.external_attachments == "refuse":
        refuse_external(resource, rt.public_base)
    wrap_for = None
    if policy.per_patient_keys and rt.patient_keys is not None:
        wrap_for = await rt.patient_keys.wraps_for_write(resource, policy.resources)
    cfg = policy.sentinel
    names = names | sentinel.names_of(cfg, _resources_in(resource))
    encrypt_for_write(resource, policy, rt.keyring, rt.settings.validate, wrap_for, names)
    readable = sentinel.names_of(cfg, _resources_in(resource))  # still clear after encryption: not secrets
    sentinel.check_resource(cfg, resource, it.resource_type or "?", names - readable)
    return extra


async def _judge(
    rt,
    it: Interaction,
    resource: dict,
    grants: CallerGrants | None,
    restricted: bool,
    request_headers: Mapping[str, str],
    request_id: str,
    stored: dict | None,
) -> dict | None:
    """Read what the judgement needs (the stored version), then apply the pure judgement
    (``proxy.transform.write_judgement``); returns the stored version it was made against, if any."""
    policy = rt.policy
    masked = holds_masked(resource, policy)
    if masked and (it.kind != "update" or it.conditional):
        raise FhirError(
            409, "conflict", "masked elements can only be written back by an update of the resource they were read from"
        )
    confined = restricted and _confined(it, grants, "write")  # scope and compartment: every type
    judged = restricted and any(policy.resources.get(r.get("resourceType")) for r in _resources_in(resource))
    partial = judged and not _all_groups(policy) <= grants.write_groups_for(resource)  # type: ignore[union-attr]
    if (masked or confined or partial) and stored is None:
        if it.conditional:
            raise FhirError(
                403,
                "forbidden",
                "patient-scoped callers cannot write by search (conditional)"
                if confined
                else "callers that may not write every group cannot update by search (conditional): "
                "what they may not change could not be kept",
                [it.resource_type or ""],
            )
        if it.kind == "update" and it.id:
            stored = await stored_version(rt, it, request_id, request_headers.get("Authorization"))
    if confined:
        for candidate, state in ((stored, "stored"), (resource, "written")):
            if candidate is not None:
                check_compartment(candidate, grants.caller.patient, state)  # type: ignore[union-attr]
    if not (masked or partial):
        return stored
    readable = grants.for_resource(stored) if judged and stored is not None else frozenset()  # type: ignore[union-attr]
    plain = await _decrypted(rt, it, copy.deepcopy(stored)) if stored is not None else None
    if masked:
        if plain is None:
            where = f"{it.resource_type}/{it.id}"
            raise FhirError(409, "conflict", f"{where} has no stored version to restore its masked elements from")
        restore_masked(resource, plain, policy, it.resource_type or "?")
    if judged:
        writable = grants.write_groups_for(resource)  # type: ignore[union-attr]
        judge_groups(resource, plain, policy, WriteAccess(readable, writable), it.resource_type or "?")
    return stored


def _resources_in(resource: dict) -> Iterator[dict]:
    yield resource
    for inner, _ in nested_resources(resource, ""):
        yield inner


def _all_groups(policy) -> frozenset[str]:
    """Every group an element of the policy belongs to: a caller writing all of them needs no stored version."""
    return frozenset().union(*(el.groups for rp in policy.resources.values() for el in rp.content_elements))


async def apply_patch(
    rt,
    it: Interaction,
    ops: list,
    decision: Decision,
    grants: CallerGrants | None,
    restricted: bool,
    request_headers: Mapping[str, str],
    request_id: str,
) -> tuple[dict, dict[str, str]]:
    """JSON Patch on a resource with encrypted elements: read, decrypt what the caller may see, apply the
    patch in the proxy, then write the result back as an update on the version read (If-Match), so a
    concurrent writer gets a conflict. Elements the caller sees masked stay masked for the patch (a
    ``test`` on them fails) and keep their stored values; the result is judged like a PUT of it."""
    authorization = request_headers.get("Authorization")
    stored = await check_scope(rt, it, grants, "write", None, request_id, authorization) if restricted else None
    stored = stored or await stored_version(rt, it, request_id, authorization)
    if stored is None:
        raise FhirError(404, "not-found", f"{it.resource_type}/{it.id} does not exist")
    view = copy.deepcopy(stored)
    report = ReadReport()
    await rt.prefetch_patient_keys(view)
    decrypt_body(view, rt.policy, rt.read_keys, decision, report)  # what the caller may see, contained too
    _refuse_shredded(it, report)
    if report.failures:
        raise FhirError(409, "conflict", f"{it.resource_type}/{it.id}: the stored version fails verification")
    try:
        patched = jsonpatch.apply_patch(view, ops)
    except jsonpatch.JsonPatchTestFailed:
        raise FhirError(422, "processing", "a test operation of the patch failed") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, ValueError):
        raise FhirError(422, "processing", "the patch cannot be applied to this resource") from None
    if type(patched) is not dict or patched.get("resourceType") != it.resource_type or patched.get("id") != it.id:
        raise FhirError(422, "processing", "a patch may not change the resource type or id")
    update = dataclasses.replace(it, kind="update")
    extra = await prepare_write(rt, update, patched, grants, restricted, request_headers, request_id, stored)
    return patched, extra  # If-Match: the version the patch was applied to


async def prepare_operation(
    rt,
    it: Interaction,
    body: dict,
    grants: CallerGrants | None,
    restricted: bool,
    request_headers: Mapping[str, str],
    request_id: str,
) -> None:
    """An operation's body: resources of encrypted types are encrypted like creates (with the same write
    rules) where the policy allows the operation to carry them, and refused otherwise."""
    for resource, where in resources_to_encrypt(it, body, rt.policy):
        create = Interaction("create", "type", str(resource.get("resourceType")))
        try:
            await prepare_write(rt, create, resource, grants, restricted, request_headers, request_id)
        except FhirError as exc:
            raise exc.located(where) from None
    sentinel.check_value(rt.policy.sentinel, body.get("parameter"), f"${it.operation}.parameter")
