"""Creates and updates of resources with encrypted elements: write rules, masked write-back, encryption."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import jsonpatch
import jsonpointer
import orjson

from proxy.outcome import FhirError
from proxy.policy.access import CallerGrants
from proxy.transform import jsonnum
from proxy.transform.attachments import refuse_external
from proxy.transform.bodies import encrypt_for_write, shape_refusal, too_deep
from proxy.transform.interactions import Interaction
from proxy.transform.masked import has_masked, merge_masked, written_groups
from proxy.transform.operations import resources_to_encrypt
from proxy.transform.records import ALL_GROUPS, ReadReport, ShapeError, decrypt_resource
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


def _decrypted(rt, it: Interaction, stored: dict | None) -> tuple[dict, str | None]:
    """The stored version decrypted in full for the merge (never sent anywhere), and its version id."""
    if stored is None:
        raise FhirError(
            409, "conflict", f"{it.resource_type}/{it.id} has no stored version to restore its masked elements from"
        )
    report = ReadReport()
    decrypt_resource(
        stored, rt.policy.resources[it.resource_type], rt.read_keys, ALL_GROUPS, rt.policy.unenveloped, report
    )
    _refuse_shredded(it, report)
    if report.failures:
        raise FhirError(
            409,
            "conflict",
            f"{it.resource_type}/{it.id}: the stored version fails verification, so its "
            "masked elements cannot be restored from it",
        )
    version = (stored.get("meta") or {}).get("versionId")
    return stored, version if isinstance(version, str) else None


def _refuse_shredded(it: Interaction, report: ReadReport) -> None:
    if report.shredded:
        where = f"{it.resource_type}/{it.id}"
        raise FhirError(409, "conflict", f"{where} was crypto-shredded: its elements cannot be restored or patched")


async def check_scope(
    rt,
    it: Interaction,
    grants: CallerGrants | None,
    access: str,
    resource: dict | None,
    request_id: str,
    authorization: str | None,
) -> dict | None:
    """A write or delete needs a scope for the type; patient/-only scopes also need the *stored* resource
    (not just the new body) in the caller's compartment. Returns the stored version when it was read."""
    where = it.resource_type or ""
    if grants is None:
        raise FhirError(403, "forbidden", "the policy has no access rules, so it grants no writes", [where])
    probe = resource or {"resourceType": it.resource_type}
    if not grants.has_scope(it.resource_type or "", access):
        raise FhirError(403, "forbidden", f"this caller has no {access} scope for {where}", [where])
    if not grants.patient_only(it.resource_type or "", access):
        return None
    stored = await stored_version(rt, it, request_id, authorization) if it.id and not it.conditional else None
    for candidate in (probe if resource is not None else None, stored):
        if candidate is not None and not grants.in_own_compartment(candidate):
            raise FhirError(403, "forbidden", f"this {where} is outside the caller's patient compartment", [where])
    if it.conditional:
        raise FhirError(403, "forbidden", "patient-scoped callers cannot write by search (conditional)", [where])
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
) -> dict[str, str]:
    """Check write rules, restore masked elements, validate and encrypt ``resource`` in place; returns the
    headers to add upstream (an If-Match when the proxy merged masked elements from the stored version)."""
    rp = rt.policy.resources.get(it.resource_type)
    extra: dict[str, str] = {}
    try:  # written_groups and has_masked walk covered paths before validation: a wrong JSON type is a 400
        if rp is not None:
            if restricted:
                stored = stored or await check_scope(
                    rt, it, grants, "write", resource, request_id, request_headers.get("Authorization")
                )
                allowed = grants.write_groups  # type: ignore[union-attr]
                written = written_groups(resource, rp).items()
                denied = [(path, groups) for path, groups in written if not groups <= allowed]
                if denied:
                    path, groups = denied[0]
                    where = f"{it.resource_type}.{path}"
                    raise FhirError(
                        403,
                        "forbidden",
                        f"{where}: this caller may not write the group(s) {', '.join(sorted(groups - allowed))}",
                        [where],
                    )
            if has_masked(resource, rp):
                if it.kind != "update" or it.conditional:
                    raise FhirError(
                        409,
                        "conflict",
                        "masked elements can only be written back by an update of the resource they were read from",
                    )
                if stored is None:
                    stored = await stored_version(rt, it, request_id, request_headers.get("Authorization"))
                if stored is not None:
                    await rt.prefetch_patient_keys(stored)
                stored, version = _decrypted(rt, it, stored)
                missing = merge_masked(resource, stored, rp)
                if missing:
                    where = [f"{it.resource_type}.{p}" for p in missing[:5]]
                    raise FhirError(
                        409, "conflict", f"{where[0]}: masked in the request but absent from the stored version", where
                    )
                if "If-Match" not in request_headers and version:
                    extra["If-Match"] = f'W/"{version}"'  # a concurrent writer gets 412, not a lost update
    except ShapeError as exc:
        raise shape_refusal(it.resource_type or "?", exc) from None
    if rt.policy.external_attachments == "refuse":
        refuse_external(resource, rt.public_base)
    wrap_for = None
    if rt.policy.per_patient_keys and rt.patient_keys is not None:
        wrap_for = await rt.patient_keys.wraps_for_write(resource, rt.policy.resources)
    encrypt_for_write(resource, rt.policy, rt.keyring, rt.settings.validate, wrap_for)
    return extra


async def apply_patch(
    rt,
    it: Interaction,
    ops: list,
    grants_for,
    grants: CallerGrants | None,
    restricted: bool,
    request_headers: Mapping[str, str],
    request_id: str,
) -> tuple[dict, dict[str, str]]:
    """JSON Patch on a resource with encrypted elements: read, decrypt what the caller may see, apply the
    patch in the proxy, then write the result back as an update on the version read (If-Match), so a
    concurrent writer gets a conflict. Elements the caller sees masked stay masked for the patch (a
    ``test`` on them fails) and keep their stored values."""
    if restricted and grants is not None:
        await check_scope(rt, it, grants, "write", None, request_id, request_headers.get("Authorization"))
    stored = await stored_version(rt, it, request_id, request_headers.get("Authorization"))
    if stored is None:
        raise FhirError(404, "not-found", f"{it.resource_type}/{it.id} does not exist")
    view = copy.deepcopy(stored)
    report = ReadReport()
    rp = rt.policy.resources[it.resource_type]
    await rt.prefetch_patient_keys(view)
    decrypt_resource(view, rp, rt.read_keys, grants_for(view), rt.policy.unenveloped, report)
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
    version = (stored.get("meta") or {}).get("versionId")
    update = dataclasses.replace(it, kind="update")
    extra = await prepare_write(rt, update, patched, grants, restricted, request_headers, request_id, stored)
    if "If-Match" not in request_headers and isinstance(version, str):
        extra["If-Match"] = f'W/"{version}"'
    return patched, extra


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
