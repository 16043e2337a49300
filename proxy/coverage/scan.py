"""Classify every value of a stored resource as encrypted, masked or clear, by element path (pure).

The walk is generic (the whole JSON tree, not the policy's paths), so it also sees what no policy
names. Each value found is a ``Finding``: its element path (``Patient.name.given``; extensions and
identifiers named by URL and system, ``Patient.identifier.where(system='…').value``, the way a policy
names them), its status, whether the policy covers that location, what the detector says of a clear
value, and its concrete location (``Patient/p1 identifier[0].value``) — never the value itself.

- ``encrypted``: an element holding fhircrypt's ciphertext extension (a primitive's ``_twin``, a
  complex element, a narrative), or a choice masked with ``dataAbsentReason`` whose ciphertext sits on
  its parent (``Observation.value[x]``).
- ``masked``: the data-absent-reason ``masked`` marker (or a masked ``dataAbsentReason``) without
  ciphertext: the value is gone.
- ``clear``: any other primitive value. ``covered`` tells a clear value the policy covers (the proxy
  would encrypt or refuse it: stored around the proxy, so ``reencrypt`` has work) from one the policy
  leaves in the clear; None when no policy was given.

Left out as fhircrypt's own or as server bookkeeping: ``resourceType``, the root ``id`` and ``meta``,
the envelope, blind-index identifiers, and extension URLs (they are in the path).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from proxy.coverage.detectors import Detector
from proxy.policy.compiler import CompiledPolicy
from proxy.transform import jsonnum
from proxy.transform import markers as mk
from proxy.transform.records import covered_locations

STATUSES = ("encrypted", "masked", "clear")
_LEAF = (str, bool, int, float, jsonnum.Number)


@dataclass(frozen=True)
class Finding:
    rtype: str
    path: str  # element path, no indices
    status: str  # one of STATUSES
    covered: bool | None  # None: no policy given
    detector: str | None  # clear values only: what the detector says it looks like
    location: str  # "<Type>/<id> <concrete path>", never the value


def classify(resource: dict, policy: CompiledPolicy | None, detector: Detector) -> list[Finding]:
    """Every value of ``resource`` and of the resources nested in it (contained, Bundle entries)."""
    out: list[Finding] = []
    _Walk(resource, policy, detector, out, "").run()
    return out


def _ciphertext(node: dict) -> bool:
    exts = node.get("extension")
    return type(exts) is list and any(type(e) is dict and e.get("url") == mk.CIPHERTEXT_URL for e in exts)


def _grouped(resource: dict) -> bool:
    """A format-v2 record: its elements were sealed per group, so a mask marker marks an encrypted value."""
    meta = resource.get("meta")
    for holder in (resource, meta if type(meta) is dict else {}):
        exts = holder.get("extension")
        if type(exts) is list and any(type(e) is dict and e.get("url") == mk.GROUP_URL for e in exts):
            return True
    return False


def _ours(ext: object) -> bool:
    """fhircrypt's own extensions (envelope, ciphertext, mask marker): bookkeeping, not values."""
    if type(ext) is not dict:
        return False
    url = ext.get("url")
    return type(url) is str and (mk.mentions_reserved(url) or (url == mk.DAR_URL and ext.get("valueCode") == "masked"))


class _Walk:
    def __init__(
        self, resource: dict, policy: CompiledPolicy | None, detector: Detector, out: list[Finding], where: str
    ) -> None:
        self.resource, self.policy, self.detector, self.out = resource, policy, detector, out
        self.rtype = str(resource.get("resourceType"))
        self.label = f"{self.rtype}/{resource.get('id', '?')}" + (f" (in {where})" if where else "")
        rp = policy.for_type(self.rtype) if policy is not None else None
        self.covered: set[str] | None = None if policy is None else covered_locations(resource, rp) if rp else set()
        self.sealed = "encrypted" if _grouped(resource) else "masked"  # what a bare mask marker stands for

    def run(self) -> None:
        self.element(self.resource, self.rtype, "", root=True)

    def is_covered(self, loc: str) -> bool | None:
        """Whether ``loc`` or an element containing it is a location the policy covers."""
        if self.covered is None:
            return None
        return any(loc[:i] in self.covered for i in range(1, len(loc) + 1) if i == len(loc) or loc[i] in ".[")

    def add(self, path: str, status: str, loc: str, value: object = None) -> None:
        hit = self.detector(value) if type(value) is str and value else None
        self.out.append(Finding(self.rtype, path, status, self.is_covered(loc), hit, f"{self.label} {loc}"))

    def element(self, node: dict, path: str, loc: str, root: bool = False) -> None:
        skip: set[str] = {"resourceType", "id", "meta"} if root else set()
        if mk.is_masked_concept(node.get("dataAbsentReason")):  # a choice encrypted (v1: its ciphertext is here)
            self.add(f"{path}.value[x]", "encrypted" if _ciphertext(node) else self.sealed, _join(loc, "value[x]"))
            skip.add("dataAbsentReason")
        elif not root and _ciphertext(node):
            self.add(path, "encrypted", loc)
            return
        elif not root and mk.has_mask_marker(node):
            self.add(path, self.sealed, loc)
            return
        for key, value in node.items():
            if key in skip:
                continue
            name = key[1:] if key.startswith("_") else key
            self.value(value, f"{path}.{name}", _join(loc, name), key)

    def value(self, value: object, path: str, loc: str, key: str) -> None:
        if type(value) is list:
            for i, item in enumerate(value):
                self.item(item, path, f"{loc}[{i}]", key)
        else:
            self.item(value, path, loc, key)

    def item(self, item: object, path: str, loc: str, key: str) -> None:
        if item is None:
            return
        if type(item) is not dict:
            if item == mk.NEUTRAL_DIV:  # a narrative the proxy replaced: nothing of the original is left
                self.add(path, "masked", loc)
            elif type(item) in _LEAF:
                self.add(path, "clear", loc, item)
            return
        if "resourceType" in item:  # contained, Bundle entry, Parameters resource: a resource of its own
            _Walk(item, self.policy, self.detector, self.out, f"{self.label} {loc}").run()
            return
        if key in ("extension", "modifierExtension"):
            if _ours(item):
                return
            url = item.get("url")
            item = {k: v for k, v in item.items() if k != "url"}
            path = path[: -len(key)] + f"{key}('{url}')"
        elif key == "identifier" and type(item.get("system")) is str:
            if item["system"].startswith(mk.BLIND_INDEX_BASE):
                return
            path += f".where(system='{item['system']}')"
            item = {k: v for k, v in item.items() if k != "system"}
        self.element(item, path, loc)


def _join(loc: str, key: str) -> str:
    return f"{loc}.{key}" if loc else key


class Coverage:
    """The counts by type and element path, with up to ``EXAMPLES`` locations each (never values).

    Counter keys: ``encrypted``, ``masked``, ``clear``, ``clear.covered``, ``clear.uncovered``,
    ``phi`` (clear values a detector flags) and ``phi.<detector>``. Kept in the checkpoint.
    """

    EXAMPLES = 3

    def __init__(self, doc: dict | None = None) -> None:
        doc = doc or {}
        self.resources: Counter = Counter(doc.get("resources") or {})
        self.rows: dict[str, dict[str, Counter]] = {
            t: {p: Counter(c) for p, c in rows.items()} for t, rows in (doc.get("rows") or {}).items()
        }
        self.examples: dict[str, dict[str, dict[str, list[str]]]] = doc.get("examples") or {}

    def add_resource(self, resource: dict, policy: CompiledPolicy | None, detector: Detector) -> None:
        self.resources[str(resource.get("resourceType"))] += 1
        for f in classify(resource, policy, detector):
            self.add(f)

    def add(self, f: Finding) -> None:
        counts = self.rows.setdefault(f.rtype, {}).setdefault(f.path, Counter())
        counts[f.status] += 1
        kinds = ["any"]
        if f.status == "clear":
            if f.covered is not None:
                counts["clear.covered" if f.covered else "clear.uncovered"] += 1
            if f.detector:
                counts["phi"] += 1
                counts[f"phi.{f.detector}"] += 1
                kinds.append("phi")
        shown = self.examples.setdefault(f.rtype, {}).setdefault(f.path, {})
        for kind in kinds:
            where = shown.setdefault(kind, [])
            if len(where) < self.EXAMPLES:
                where.append(f.location)

    def to_doc(self) -> dict:
        return {
            "resources": dict(self.resources),
            "rows": {t: {p: dict(c) for p, c in rows.items()} for t, rows in self.rows.items()},
            "examples": self.examples,
        }
