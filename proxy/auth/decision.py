"""The one access decision per request: every route asks here, and nothing decrypts without it.

The cloud server is not trusted to confine callers (many FHIR servers enforce no SMART scopes
at all), so the proxy is the access gateway, in the pattern of google/fhir-gateway's
AccessChecker → AccessDecision: :func:`decide` looks at the caller's grants and the classified
interaction once, before anything is forwarded, and returns a :class:`Decision` that

* refuses the interaction (``FhirError`` 403) when no SMART scope allows it, or when a caller
  confined to a patient compartment asks for something that cannot be confined (type or
  system history, type- and system-level operations, another patient's record);
* changes the request: a search by a confined caller gets the compartment as an added,
  ANDed search parameter (``patient=Patient/<own>``, ``_id=<own>`` on Patient);
* post-processes the response: :meth:`Decision.screen` drops every resource the caller may
  not see from searchsets, histories and batch responses (and refuses a read of one), and
  :meth:`Decision.groups` says which element groups are decrypted in each resource that
  remains. The decrypt entry point (:func:`proxy.transform.bodies.decrypt_body`) accepts only
  a Decision, and "every group" exists only in development mode (``--auth none``).

Confinement follows SMART App Launch v2: a type the caller can read only through ``patient/``
scopes is confined to the launch patient's compartment; a ``user/`` or ``system/`` scope on the
type lifts it, and never the other way round (``patient/`` grants decrypt only inside the
compartment, see :class:`proxy.policy.access.CallerGrants`). Types that are never in a Patient
compartment (Organization, Practitioner, Medication, ...) are shared reference data: a
``patient/`` scope on them allows reading them, but decrypts nothing of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.outcome import FhirError
from proxy.policy.access import CallerGrants
from proxy.policy.compartment import compartment_params, compartment_types
from proxy.transform.interactions import Interaction
from proxy.transform.records import ALL_GROUPS, Grants

_READS = frozenset({"read", "vread", "search", "history"})
_WRITES = {"create": "create", "update": "update", "patch": "update", "delete": "delete"}  # SMART v2 c, u, d
_CONTAINERS = frozenset({"searchset", "history", "batch-response", "transaction-response"})
_MADE_HERE = object()  # only this module makes Decisions
# the search parameter that confines a search to one patient's compartment, in order of preference
_CONFINING = ("patient", "subject", "beneficiary", "individual", "requester")


class Decision:
    """What one caller may see of one request: which resources, and which groups in each."""

    __slots__ = ("_by_type", "_everything", "_grants", "_watch", "constraint", "searchable")

    def __init__(
        self,
        grants: CallerGrants | None,
        everything: bool,
        constraint: tuple[str, str] | None,
        searchable: frozenset[str] | None,
        watch: Callable[[dict[str, Any], Grants], None] | None,
        made_by: object,
    ) -> None:
        if made_by is not _MADE_HERE:
            raise TypeError("decisions are made by proxy.auth.decision.decide only")
        self._grants = grants
        self._everything = everything
        self._watch = watch
        self.constraint = constraint  # (parameter, value) ANDed to a search, or None
        self.searchable = searchable  # groups the caller may search by; None: every group
        self._by_type: dict[str, bool | None] = {}  # resource type -> visible, None: by its compartment

    def groups(self, resource: dict[str, Any]) -> Grants:
        """The groups decrypted in ``resource`` (still encrypted: only clear data is looked at);
        ``ALL_GROUPS`` only in development mode and for the key holder."""
        groups: Grants
        if self._everything:
            groups = ALL_GROUPS
        elif self._grants is None:
            groups = frozenset()
        else:
            groups = self._grants.for_resource(resource)
        if self._watch is not None:
            self._watch(resource, groups)
        return groups

    def hides_nothing(self) -> bool:
        """Whether every resource is :meth:`visible` to the caller, whatever it holds: a streamed answer
        can then promise a searchset's ``total`` before it has seen the entries."""
        return self._everything or self._grants is None or not self._grants.scopes_required

    def judges_content(self) -> bool:
        """Whether :meth:`visible` may look inside a resource, not only at its type: only for a caller
        with ``patient/`` read scopes (a type read only through them is confined to the compartment).
        Otherwise an answer can be judged on its outline (``proxy.transform.outline``)."""
        grants = self._grants
        return not self.hides_nothing() and grants is not None and grants.reads_in_context("patient")

    def visible(self, resource: dict[str, Any]) -> bool:
        """Whether the caller may see ``resource`` at all (its type and its compartment)."""
        grants = self._grants
        if self.hides_nothing() or grants is None:
            return True
        rtype = resource.get("resourceType")
        if type(rtype) is not str:
            return False
        by_type = self._by_type.get(rtype, ...)
        if by_type is ...:  # a page holds a hundred resources of one or two types: decided once per type
            by_type = self._by_type[rtype] = self._type_visible(grants, rtype)
        return grants.in_own_compartment(resource) if by_type is None else by_type

    @staticmethod
    def _type_visible(grants: CallerGrants, rtype: str) -> bool | None:
        """Whether every resource of the type is visible to the caller (None: only those in its compartment)."""
        if rtype == "OperationOutcome":
            return True
        contexts = grants.contexts(rtype, "read")
        if contexts - {"patient"}:
            return True
        if "patient" not in contexts:
            return False
        return True if rtype not in _compartment_types() else None

    def watched(self, watch: Callable[[dict[str, Any], Grants], None]) -> Decision:
        """The same decision, telling ``watch`` about every resource it decides groups for (canaries)."""
        return Decision(self._grants, self._everything, self.constraint, self.searchable, watch, _MADE_HERE)

    def screen(self, body: dict[str, Any], it: Interaction) -> int:
        """Remove what the caller may not see from a response body (in place); the number removed.

        A read of a resource the caller may not see is refused (403). Searchsets and histories lose
        the entries, batch responses answer those entries with 403; a searchset that lost entries
        loses its ``total`` too (it would count what the caller may not see). Contained resources
        are part of their container and are judged with it, never on their own local ids.
        """
        if self.hides_nothing():
            return 0  # every resource is visible: nothing to remove, no read to refuse
        if body.get("resourceType") == "Bundle" and body.get("type") in _CONTAINERS:
            return self._screen_bundle(body)
        if body.get("resourceType") == "Parameters" and it.kind == "operation":
            return self._screen_parameters(body)
        if (it.kind in _READS or it.kind == "operation") and not self.visible(body):
            raise _outside(body)
        return 0

    def _screen_bundle(self, bundle: dict[str, Any]) -> int:
        entries = bundle.get("entry")
        if type(entries) is not list:
            return 0
        kept, removed = [], 0
        responses = bundle.get("type") in ("batch-response", "transaction-response")
        for entry in entries:
            inner = entry.get("resource") if type(entry) is dict else None
            if type(inner) is not dict:
                kept.append(entry)
                continue
            if inner.get("resourceType") == "Bundle" and inner.get("type") in _CONTAINERS:
                removed += self._screen_bundle(inner)  # a search or history inside a batch response
                kept.append(entry)
            elif self.visible(inner):
                kept.append(entry)
            elif responses:
                removed += 1
                kept.append({"response": {"status": "403 Forbidden", "outcome": _outside(inner).outcome()}})
            else:
                removed += 1
        if removed:
            bundle["entry"] = kept
            if not responses:
                bundle.pop("total", None)
        return removed

    def _screen_parameters(self, parameters: dict[str, Any]) -> int:
        removed = 0

        def keep(param: object) -> bool:
            nonlocal removed
            if type(param) is not dict:
                return True
            inner = param.get("resource")
            if type(inner) is dict and not (
                self.visible(inner) or (inner.get("resourceType") == "Bundle" and inner.get("type") in _CONTAINERS)
            ):
                removed += 1
                return False
            if type(inner) is dict and inner.get("resourceType") == "Bundle" and inner.get("type") in _CONTAINERS:
                removed += self._screen_bundle(inner)
            if type(param.get("part")) is list:
                param["part"] = [p for p in param["part"] if keep(p)]
            return True

        if type(parameters.get("parameter")) is list:
            parameters["parameter"] = [p for p in parameters["parameter"] if keep(p)]
        return removed


def _outside(resource: dict[str, Any]) -> FhirError:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    ref = f"{rtype}/{rid}" if type(rtype) is str and type(rid) is str and len(rid) <= 64 else "the resource"
    return FhirError(403, "forbidden", f"{ref} is outside what this caller may read (SMART scopes, compartment)")


def _compartment_types() -> frozenset[str]:
    return compartment_types() | {"Patient"}


_EVERYTHING = Decision(None, True, None, None, None, _MADE_HERE)  # immutable: one instance serves all


def development() -> Decision:
    """``--auth none``: every group of every resource, for every caller. Never in production."""
    return _EVERYTHING


def key_holder() -> Decision:
    """Every group, where the reader is the key holder itself, never a caller: the operator's offline
    tools (migration assessment, re-encryption) and the proxy's own write merge (the stored version a
    write is judged against and restored from; it is never returned to the caller)."""
    return _EVERYTHING


def unscoped(grants: CallerGrants | None) -> Decision:
    """A caller whose access is not confined by the proxy: the policy has no access rules (nothing
    is decrypted) or asks to ignore SMART scopes (the rules' groups, everywhere)."""
    return Decision(grants, False, None, grants.groups if grants else frozenset(), None, _MADE_HERE)


def decide(grants: CallerGrants | None, it: Interaction, read_only: frozenset[str] = frozenset()) -> Decision:
    """The decision for one authenticated request; raises 403 (an OperationOutcome) when refused.
    ``read_only``: operations the policy declares free of side effects, beside :data:`READ_ONLY_OPERATIONS`."""
    if grants is None or not grants.scopes_required or it.kind == "capabilities":
        return unscoped(grants if it.kind != "capabilities" else None)
    rtype = it.resource_type
    if it.kind == "operation" and it.operation not in READ_ONLY_OPERATIONS | read_only:
        _may_change(grants, it)
    if rtype is None:
        return _system_level(grants, it)
    if it.kind in _WRITES:
        if not grants.has_scope(rtype, _WRITES[it.kind]):
            raise _refused(f"no SMART scope of this caller allows {_WRITES[it.kind]} on {rtype}", rtype)
        return Decision(grants, False, None, _searchable(grants, rtype), None, _MADE_HERE)
    contexts = grants.contexts(rtype, "read")
    if not contexts:
        raise _refused(f"no SMART scope of this caller allows reading {rtype}", rtype)
    confined = contexts == {"patient"} and rtype in _compartment_types()
    if confined or ((it.compartment or "").startswith("Patient/") and contexts == {"patient"}):
        return _confined(grants, it, rtype)
    if it.kind == "operation" and it.operation == "export" and not _population(grants):
        raise _refused("Bulk export needs a user/ or system/ read scope on all resource types", f"{rtype}/$export")
    return Decision(grants, False, None, _searchable(grants, rtype), None, _MADE_HERE)


# R4 operations whose definitions say affectsState: false (a read scope is enough for them)
READ_ONLY_OPERATIONS = frozenset(
    {
        "everything", "validate", "lastn", "stats", "match", "meta", "document", "expand", "lookup",
        "validate-code", "translate", "subsumes", "closure", "evaluate-measure", "data-requirements",
        "care-gaps", "collect-data", "questionnaire", "populate", "find", "versions", "summary", "export",
    }
)  # fmt: skip


def _may_change(grants: CallerGrants, it: Interaction) -> None:
    """An operation that may change what the server stores (``$expunge``, ``$meta-add``, a custom one)
    needs an update scope on its type - on every type (``*``) at the system level - not a read scope."""
    rtype = it.resource_type or "*"
    if not any(s.update and s.resource_type in ("*", rtype) for s in grants.caller.scopes):
        where = f"{it.resource_type}/${it.operation}" if it.resource_type else f"${it.operation}"
        raise _refused(
            f"${it.operation} may change stored data: it needs an update scope on {rtype} (or the policy "
            "declares it read_only)",
            where,
        )


def _confined(grants: CallerGrants, it: Interaction, rtype: str) -> Decision:
    """A caller that reads ``rtype`` only through patient/ scopes: inside its own compartment."""
    own = grants.caller.patient
    if not own:
        raise _refused(f"patient/ scopes on {rtype} need a launch patient (the token has no patient claim)", rtype)
    searchable = grants.context_groups({"patient"})
    if it.kind == "search":
        if it.compartment is not None:
            if it.compartment != f"Patient/{own}":
                raise _refused("a compartment search is allowed only in the caller's own patient compartment", rtype)
            return Decision(grants, False, None, searchable, None, _MADE_HERE)
        return Decision(grants, False, _constraint(rtype, own), searchable, None, _MADE_HERE)
    if it.kind == "history" and it.level != "instance":
        raise _refused(f"{rtype}/_history spans other patients: read the history of one resource instead", rtype)
    if it.kind == "operation" and (it.level != "instance" or (rtype == "Patient" and it.id != own)):
        raise _refused(f"the operation ${it.operation} is allowed only on the caller's own Patient", rtype)
    if rtype == "Patient" and it.id is not None and it.id != own:
        raise _refused(f"Patient/{it.id} is not the caller's own patient", rtype)
    return Decision(grants, False, None, searchable, None, _MADE_HERE)


def _system_level(grants: CallerGrants, it: Interaction) -> Decision:
    """System-level searches, histories and operations span every type and patient: they need a
    user/ or system/ read scope on all types. Batches are decided entry by entry."""
    if it.kind != "batch" and not _population(grants):
        what = f"${it.operation}" if it.kind == "operation" else f"system-level {it.kind}"
        raise _refused(f"{what} needs a user/ or system/ read scope on all resource types", what)
    return Decision(grants, False, None, _searchable(grants, None), None, _MADE_HERE)


def _population(grants: CallerGrants) -> bool:
    """A read scope on every type outside the patient context (user/*.rs, system/*.read)."""
    return any(s.read and s.resource_type == "*" and s.context != "patient" for s in grants.caller.scopes)


def _searchable(grants: CallerGrants, rtype: str | None) -> frozenset[str]:
    """Groups the caller may search by outside a compartment: those of its user/ and system/ scopes
    (a patient/ grant would otherwise become an oracle over every patient's records)."""
    contexts = grants.contexts(rtype, "read") if rtype else frozenset(s.context for s in grants.caller.scopes)
    return grants.context_groups(contexts - {"patient"})


def _constraint(rtype: str, own: str) -> tuple[str, str]:
    if rtype == "Patient":
        return ("_id", own)
    params = compartment_params(rtype)
    name = next((p for p in _CONFINING if p in params), params[0] if params else None)
    if name is None:  # never in R4: every compartment type has a parameter
        raise _refused(f"searches on {rtype} cannot be confined to a patient compartment", rtype)
    return (name, f"Patient/{own}")


def _refused(message: str, where: str) -> FhirError:
    return FhirError(403, "forbidden", message, [where])
