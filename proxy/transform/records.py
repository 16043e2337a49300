"""Encrypt and decrypt the covered elements of one resource, in place.

The at-rest representation is described in ``docs/at-rest-format.md``. Everything
here works on plain dicts produced by ``jsonnum.loads``; the compiled policy tells exactly where
to look, so nothing walks the whole tree.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.envelope import IntegrityError, KeyLookup, RecordCipher, grouped_envelope
from proxy.keymgmt.keyring import Keyring
from proxy.keymgmt.patientkeys import KeyShredded
from proxy.policy.closed import Unlisted, canonical, same_uri
from proxy.policy.compiler import CompiledElement, Dispatch, Hop, Kind, ResourcePolicy
from proxy.policy.sentinel import STRAY_FIELD
from proxy.transform import jsonnum, sentinel
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON
from proxy.transform.namechain import chain_label, name_chains
from proxy.transform.slots import (
    IN_GROUP,
    ChoiceMaskedSlot,
    ComplexSlot,
    Container,
    GoneSlot,
    NarrativeSlot,
    PrimitiveItemSlot,
    PrimitiveSlot,
    Slot,
)


class AllGroups:
    """The grant of every group. A distinct type, not ``None``: a forgotten or missing grants argument
    fails (``TypeError``) instead of decrypting everything. Only ``ALL_GROUPS`` exists; it is passed where
    nobody but the operator can be the reader (``--auth none``, offline tools, the write merge)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ALL_GROUPS"


ALL_GROUPS = AllGroups()
Grants = frozenset[str] | AllGroups  # the groups one resource may be decrypted to for the reader


class ShapeError(ValueError):
    """A covered location holds an unexpected JSON type; ``path`` names it, never the value."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class UnlistedRefused(ShapeError):
    """A write holds an identifier system or extension URL the policy does not name, under ``refuse``.

    ``named`` is that system or URL (not PHI: the value is); the value is never carried.
    """

    def __init__(self, path: str, what: str, named: object) -> None:
        super().__init__(path)
        self.what, self.named = what, named if type(named) is str else None


@dataclass
class ReadReport:
    """What happened while decrypting a response; contains paths and counts, never values."""

    decrypted: int = 0
    masked: int = 0
    shredded: int = 0  # resources whose patient key was destroyed on purpose (masked, not a failure)
    failures: list[str] = field(default_factory=list)
    decrypted_groups: set[str] = field(default_factory=set)  # for the audit trail
    masked_groups: set[str] = field(default_factory=set)  # withheld from this caller by the access rules

    def fail(self, where: str, why: str) -> None:
        self.failures.append(f"{where}: {why}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_CANONICAL_KEYS = frozenset({"system", "url"})


def _matches(item: JSON, criteria: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``item``'s fields equal the where() literals; systems and URLs compare canonically
    (``.../id/NIK`` is the NIK system: it is encrypted and indexed as the policy spells it)."""
    for k, v in criteria:
        got = item.get(k)
        if got != v and not (k in _CANONICAL_KEYS and same_uri(got, v)):
            return False
    return True


def _admits(item: JSON, hop: Hop) -> bool:
    """``item`` is selected by ``hop``: its where() criteria hold and, on a catch-all, the policy
    does not name its system or URL."""
    return _matches(item, hop.criteria) and (hop.unlisted is None or hop.unlisted.admits(item))


def _parents(resource: JSON, nav: tuple[Hop, ...], strict: bool) -> list[tuple[JSON, str]]:
    """Objects reached by the hops, with their concrete paths (``identifier[1]``).

    A value of the wrong JSON type raises ShapeError when writing (``strict``); when
    reading it is removed, since it cannot be anything the proxy wrote.
    """
    if nav and nav[0].key not in resource:  # most locations are absent (a type's 18 reference paths): no lists
        return []
    if len(nav) == 1 and not nav[0].recurse:  # the common case (identifier.where(...).value): one scan
        out: list[tuple[JSON, str]] = []
        _children(resource, "", nav[0].key, nav[0].criteria, strict, out, nav[0].unlisted)
        return out
    level = [(resource, "")]
    for hop in nav:
        nxt: list[tuple[JSON, str]] = []
        for obj, path in level:
            _children(obj, path, hop.key, hop.criteria, strict, nxt, hop.unlisted)
        if hop.recurse:
            pending = list(nxt)
            while pending:
                obj, path = pending.pop()
                for keys in hop.recurse:
                    found = [(obj, path)]
                    for i, key in enumerate(keys):
                        step: list[tuple[JSON, str]] = []
                        for o, p in found:
                            last = i == len(keys) - 1
                            _children(
                                o, p, key, hop.criteria if last else (), strict, step, hop.unlisted if last else None
                            )
                        found = step
                    nxt.extend(found)
                    pending.extend(found)
        level = nxt
    return level


def _children(
    obj: JSON,
    path: str,
    key: str,
    criteria: tuple[tuple[str, str], ...],
    strict: bool,
    out: list[tuple[JSON, str]],
    unlisted: Unlisted | None = None,
) -> None:
    """Append the objects under ``obj[key]`` that match ``criteria`` (and ``unlisted``, on a catch-all)."""
    value = obj.get(key)
    if value is None:
        return
    p = f"{path}.{key}" if path else key
    if type(value) is list:
        for i, item in enumerate(value):
            if type(item) is dict:
                if (not criteria or _matches(item, criteria)) and (unlisted is None or unlisted.admits(item)):
                    out.append((item, f"{p}[{i}]"))
            elif item is not None:
                if strict:
                    raise ShapeError(f"{p}[{i}]")
                value[i] = None
    elif type(value) is dict and not criteria:
        if unlisted is None or unlisted.admits(value):
            out.append((value, p))
    else:
        if strict:
            raise ShapeError(p)
        del obj[key]


def _dispatched(resource: JSON, d: Dispatch, strict: bool) -> list[tuple[CompiledElement, JSON, str]] | None:
    """(element, list item, its path) for every item of ``resource[d.key]`` an element of ``d`` selects, in
    one scan; None when the value is not a list (the elements then walk it one by one, and decide)."""
    items = resource.get(d.key)
    if type(items) is not list:
        return [] if items is None else None
    out: list[tuple[CompiledElement, JSON, str]] = []
    unlisted = d.unlisted
    for i, item in enumerate(items):
        if type(item) is not dict:
            if item is not None:
                if strict:
                    raise ShapeError(f"{d.key}[{i}]")
                items[i] = None
            continue
        value = item.get(d.field)
        els = d.table.get(canonical(value), ()) if type(value) is str else ()
        if unlisted is not None and unlisted.admits(item):
            els = (*els, *d.catch_all)
        path = f"{d.key}[{i}]"
        out.extend((el, item, path) for el in els)
    return out


def _planned(resource: JSON, rp: ResourcePolicy, strict: bool) -> Iterator[tuple[CompiledElement, JSON | None, str]]:
    """The policy's elements in plan order, as reads and writes handle them: ``(el, None, "")`` for one
    to walk from the resource (those under an absent top-level element are skipped), ``(el, item,
    path)`` for the list item a :class:`Dispatch` handed to it."""
    for step in rp.plan:
        if not isinstance(step, Dispatch):
            if _may_hold(resource, step):
                yield step, None, ""
            continue
        found = _dispatched(resource, step, strict)
        if found is None:
            yield from ((el, None, "") for el in step.elements)
        else:
            yield from found


def _ct_of(obj: object, grouped: bool = False) -> str | None:
    """The ciphertext carried by an element's extensions; with ``grouped`` (a v2 record) ``IN_GROUP``
    where the mask marker alone marks an element sealed in its group; else None."""
    placed = None
    if type(obj) is dict:
        exts = obj.get("extension")
        if type(exts) is list:
            for ext in exts:
                if type(ext) is dict:
                    url = ext.get("url")
                    if url == mk.CIPHERTEXT_URL:
                        ct = ext.get("valueString")
                        return ct if type(ct) is str else ""
                    if grouped and url == mk.DAR_URL and ext.get("valueCode") == "masked":
                        placed = IN_GROUP
    return placed


_PRIMITIVE_JSON = (str, bool, int, float, jsonnum.Number)


def _primitive_pair(value: object, under: object, path: str) -> list[object]:
    """The [value, _element] pair that a primitive's ciphertext holds; checks JSON types."""
    if (value is not None and type(value) not in _PRIMITIVE_JSON) or (under is not None and type(under) is not dict):
        raise ShapeError(path)
    return [value, under]


# --------------------------------------------------------------------------- writing


class _Sealer:
    """Encrypts the covered elements of one resource and collects the MAC items.

    Format v1 seals each element alone; format v2 collects the elements of each access group and
    seals them together in :meth:`finish` (one AES-GCM call and one JSON document per group
    instead of one per element), leaving the mask marker where each was."""

    def __init__(self, cipher: RecordCipher, indexer: BlindIndexer) -> None:
        self.cipher, self.indexer = cipher, indexer
        self.items: list[tuple[str, str]] = []
        self.groups: dict[str, dict[str, object]] | None = {} if cipher.grouped else None

    def seal(self, field_id: str, path: str, payload: object) -> str:
        """Seal one value alone, under its own ciphertext (v1, and what the sentinel seals)."""
        ct = self.cipher.seal(field_id, path, jsonnum.dumps(payload))
        self.items.append((path, ct))
        return ct

    def place(self, el: CompiledElement, path: str, payload: object) -> str | None:
        """Seal an element of the policy: alone (v1, returns its ciphertext) or into its group (v2, None)."""
        if self.groups is None:
            return self.seal(el.field_id, path, payload)
        group = self.groups.get(el.group_key)
        if group is None:
            group = self.groups[el.group_key] = {}
        group[path] = payload
        self.items.append((path, el.group_member))
        return None

    def finish(self) -> list[JSON]:
        """The group ciphertext extensions (v2), each also an item of the record MAC. A group's plaintext
        lists its elements' plaintexts in the order of their locations (sorted, as the MAC sorts them):
        the reader knows the locations from the marks, which the MAC covers with their group and field id."""
        exts = []
        for key, entries in (self.groups or {}).items():
            ct = self.cipher.seal_group(key, jsonnum.dumps([entries[path] for path in sorted(entries)]))
            self.items.append(("@" + key, ct))
            exts.append(mk.group_extension(ct))
        return exts

    def primitive(self, parent: JSON, path: str, key: str, repeating: bool, el: CompiledElement) -> None:
        ukey = "_" + key
        if key not in parent and ukey not in parent:
            return
        p = _join(path, key)
        if not repeating:
            pair = _primitive_pair(parent.pop(key, None), parent.pop(ukey, None), p)
            parent[ukey] = mk.sealed_form(self.place(el, p, pair))
            return
        values, unders = parent.get(key) or [], parent.get(ukey) or []
        if type(values) is not list or type(unders) is not list:
            raise ShapeError(p)
        n = max(len(values), len(unders))
        sealed: list[JSON | None] = []
        for i in range(n):
            pair = _primitive_pair(
                values[i] if i < len(values) else None, unders[i] if i < len(unders) else None, f"{p}[{i}]"
            )
            sealed.append(None if pair == [None, None] else mk.sealed_form(self.place(el, f"{p}[{i}]", pair)))
        parent[key] = [None] * n
        parent[ukey] = sealed

    def complex(self, parent: JSON, path: str, key: str, el: CompiledElement) -> None:
        value = parent.get(key)
        if value is None:
            return
        p = _join(path, key)
        if el.repeating:
            if type(value) is not list:
                raise ShapeError(p)
            for i, item in enumerate(value):
                if item is None:
                    continue
                if type(item) is not dict:
                    raise ShapeError(f"{p}[{i}]")
                if _admits(item, el.terminal):
                    value[i] = self._complex_form(item, f"{p}[{i}]", el)
        elif type(value) is dict:
            parent[key] = self._complex_form(value, p, el)
        else:
            raise ShapeError(p)

    def _complex_form(self, item: JSON, path: str, el: CompiledElement) -> JSON:
        form = {k: item[k] for k in el.keep if k in item}
        chained = next((s for s in el.indexes if s.chain), None)
        if chained is not None:  # a HumanName searched through chains in its own parts (namechain.py)
            label = chain_label(self.cipher.resource_type, el.field_id)
            form.update(name_chains(item, self.indexer, label, chained.prefix_min or 1))
        sealed = mk.sealed_form(self.place(el, path, item))
        holder = mk.value_holder(item) if el.terminal.key == "extension" else None
        if holder is not None:  # a simple extension keeps a value[x]: the markers go inside it
            form[holder] = sealed
        else:
            form.update(sealed)
        return form

    def choice_masked(self, parent: JSON, path: str, el: CompiledElement) -> None:
        present = [n for n, _ in el.choices if n in parent or "_" + n in parent]
        # v2 marks the place by the masked dataAbsentReason alone, so a reason the client wrote without a
        # value is sealed too: a clear one could not be told from the mark
        if not present and (self.groups is None or "dataAbsentReason" not in parent):
            return
        p = _join(path, el.terminal.key + "[x]")
        exts = parent.get("extension", [])
        if len(present) > 1 or type(exts) is not list:
            raise ShapeError(p)
        keys = [k for name in present for k in (name, "_" + name)] + ["dataAbsentReason"]
        payload = {k: parent.pop(k) for k in keys if k in parent}
        ct = self.place(el, p, payload)
        parent["dataAbsentReason"] = mk.masked_concept()
        if ct is not None:
            parent["extension"] = [*exts, mk.ciphertext_extension(ct)]

    def narrative(self, parent: JSON, path: str, el: CompiledElement) -> None:
        text = parent.get(el.terminal.key)
        if text is None:
            return
        p = _join(path, el.terminal.key)
        if type(text) is not dict:
            raise ShapeError(p)
        if el.replace:
            parent[el.terminal.key] = mk.neutral_narrative()
            return
        form = mk.neutral_narrative()
        ct = self.place(el, p, text)
        if ct is not None:
            form["extension"] = [mk.ciphertext_extension(ct)]
        parent[el.terminal.key] = form

    def element(self, resource: JSON, el: CompiledElement) -> None:
        if el.refuses:
            _refuse_unlisted(resource, el)
            return
        for parent, path in _parents(resource, el.nav, strict=True):
            kind = el.kind
            if kind is Kind.PRIMITIVE:
                self.primitive(parent, path, el.terminal.key, el.repeating, el)
            elif kind is Kind.COMPLEX:
                self.complex(parent, path, el.terminal.key, el)
            elif kind is Kind.CHOICE_MASKED:
                self.choice_masked(parent, path, el)
            elif kind is Kind.NARRATIVE:
                self.narrative(parent, path, el)
            else:  # CHOICE: the typed slot stays, its content is encrypted as primitive or complex
                for name, primitive in el.choices:
                    if primitive:
                        self.primitive(parent, path, name, False, el)
                    elif name in parent:
                        parent[name] = self._complex_form_checked(parent[name], _join(path, name), el)

    def strays(self, resource: JSON, rp: ResourcePolicy, names: frozenset[str]) -> bool:
        """Seal what the sentinel's encrypt detectors find in the clear strings left after the policy's
        elements were sealed (``names``: of the request, minus those still readable now); True if any."""
        cfg = rp.sentinel
        if names:
            names = names - sentinel.names_of(cfg, (resource,))
        places = sentinel.find(cfg, resource, names, rp.type)
        for place in places:
            self.stray(place)
        return bool(places)

    def stray(self, place: sentinel.Place) -> None:
        """One hit sealed in place like a covered primitive (``_key`` holds the markers), bound to its path."""
        owner, key, ukey = place.owner, place.key, "_" + place.key
        if place.index is None:
            pair = _primitive_pair(owner.pop(key), owner.pop(ukey, None), place.path)
            owner[ukey] = mk.encrypted_form(self.seal(STRAY_FIELD, place.path, pair))
            return
        values, unders = owner[key], owner.get(ukey) or []
        if type(unders) is not list:
            raise ShapeError(f"{place.path.rpartition('[')[0]}")
        unders.extend([None] * (len(values) - len(unders)))
        pair = _primitive_pair(values[place.index], unders[place.index], place.path)
        values[place.index] = None
        unders[place.index] = mk.encrypted_form(self.seal(STRAY_FIELD, place.path, pair))
        owner[ukey] = unders

    def _complex_form_checked(self, item: object, path: str, el: CompiledElement) -> JSON:
        if type(item) is not dict:
            raise ShapeError(path)
        return self._complex_form(item, path, el)


def _refuse_unlisted(resource: JSON, el: CompiledElement) -> None:
    """Under ``refuse``: the first identifier value (or extension) the catch-all would have sealed."""
    closing = el.closing
    for parent, path in _parents(resource, el.nav, strict=True):
        if closing is el.terminal.unlisted:  # extensions: the items themselves
            items = parent.get(el.terminal.key)
            for i, item in enumerate(items if type(items) is list else ()):
                if type(item) is not dict:
                    raise ShapeError(f"{_join(path, el.terminal.key)}[{i}]")
                if _admits(item, el.terminal):
                    raise UnlistedRefused(f"{_join(path, el.terminal.key)}[{i}]", "extension URL", item.get("url"))
        elif el.terminal.key in parent or "_" + el.terminal.key in parent:  # identifiers: a value is present
            raise UnlistedRefused(path, "identifier system", parent.get("system"))


def _may_hold(resource: JSON, el: CompiledElement) -> bool:
    """False when the element lies under a top-level element the resource does not have: one dict lookup
    instead of a walk, for most of the closed defaults' catch-alls (dozens per type, few present)."""
    return not el.nav or el.nav[0].key in resource


def encrypt_resource(
    resource: JSON,
    rp: ResourcePolicy,
    keyring: Keyring,
    wrap: tuple[str, bytes] | None = None,
    names: frozenset[str] = frozenset(),
) -> None:
    """Encrypt every covered element, and what the sentinel's encrypt detectors find in the clear
    ones, and attach the envelope and tag (in place).

    ``wrap`` (key id, key) wraps the data key instead of the keyring's primary: a patient key.
    ``names``: words of names other resources of the same request encrypt (for the name detector).
    Raises ShapeError when a covered location has the wrong JSON type, FhirError when the sentinel
    finds a value it cannot seal.
    """
    cfg = rp.sentinel
    if cfg.action("name") == "encrypt":
        names = names | sentinel.names_of(cfg, (resource,))
    sealer = _Sealer(RecordCipher.new(keyring, rp.type, wrap, rp.at_rest_format), keyring.indexer)
    for el, item, path in _planned(resource, rp, strict=True):
        if item is None:
            sealer.element(resource, el)
        else:
            sealer.primitive(item, path, el.terminal.key, el.repeating, el)
    strays = bool(cfg.sealing) and sealer.strays(resource, rp, names)
    sealed = sealer.finish()
    mac = sealer.cipher.mac(sorted(sealer.items))  # sorted: reordering policy entries changes nothing
    envelope = {"url": mk.ENVELOPE_URL, "valueString": sealer.cipher.envelope(mac)}
    meta = resource.get("meta")
    if meta is None:
        meta = resource["meta"] = {}
    elif type(meta) is not dict:
        raise ShapeError("meta")
    holder = meta if rp.envelope_in_meta else resource
    exts = holder.get("extension")
    if exts is not None and type(exts) is not list:
        raise ShapeError("meta.extension" if rp.envelope_in_meta else "extension")
    holder["extension"] = [*(exts or ()), *sealed, envelope]
    tags = meta.get("tag")
    ours = [{"system": mk.TAG_SYSTEM, "code": mk.TAG_CODE}]
    if strays:  # tells readers to look for them; removing it fails the MAC, which covers them
        ours.append({"system": mk.TAG_SYSTEM, "code": mk.STRAY_CODE})
    meta["tag"] = [*(tags if type(tags) is list else ()), *ours]


# --------------------------------------------------------------------------- reading


def _find_primitive(
    parent: JSON, path: str, key: str, repeating: bool, el: CompiledElement, out: list[Slot], grouped: bool
) -> None:
    ukey = "_" + key
    if not repeating:
        under = parent.get(ukey)
        ct, plain = (_ct_of(under, grouped) if under is not None else None), key in parent
        if ct is not None or plain:
            out.append(PrimitiveSlot(el, f"{path}.{key}" if path else key, ct, plain, parent, key))
        return
    values, unders = parent.get(key), parent.get(ukey)
    values = values if type(values) is list else []
    unders = unders if type(unders) is list else []
    n = max(len(values), len(unders))
    if not n:
        return
    values.extend([None] * (n - len(values)))
    unders.extend([None] * (n - len(unders)))
    parent[key], parent[ukey] = values, unders
    p = _join(path, key)
    for i in range(n):
        ct, plain = _ct_of(unders[i], grouped), values[i] is not None
        if ct is not None or plain:
            out.append(PrimitiveItemSlot(el, f"{p}[{i}]", ct, plain, parent, key, i, values, unders))


def _find_complex(
    container: Container,
    index: str | int,
    path: str,
    keep: tuple[str, ...],
    el: CompiledElement,
    out: list[Slot],
    grouped: bool,
) -> None:
    item = container[index]
    if type(item) is not dict:
        container[index] = None
        out.append(GoneSlot(el, path, None, True))
        return
    ct = _ct_of(item, grouped)
    holder = mk.held_markers(item, keep) if ct is None and el.terminal.key == "extension" else None
    if holder is not None:
        ct = _ct_of(item[holder], grouped)
    out.append(ComplexSlot(el, path, ct, ct is None, container, index, keep, holder))


def _find(resource: JSON, el: CompiledElement, out: list[Slot], grouped: bool) -> None:
    if el.refuses:
        return  # nothing was sealed under refuse
    kind = el.kind
    key = el.terminal.key
    for parent, path in _parents(resource, el.nav, strict=False) if el.nav else ((resource, ""),):
        if kind is Kind.PRIMITIVE:
            _find_primitive(parent, path, key, el.repeating, el, out, grouped)
        elif kind is Kind.COMPLEX:
            value = parent.get(key)
            if value is None:
                continue
            p = f"{path}.{key}" if path else key
            if not el.repeating:
                _find_complex(parent, key, p, el.keep, el, out, grouped)
            elif type(value) is list:
                for i, item in enumerate(value):
                    if item is not None and (type(item) is not dict or _admits(item, el.terminal)):
                        _find_complex(value, i, f"{p}[{i}]", el.keep, el, out, grouped)
            else:
                del parent[key]
                out.append(GoneSlot(el, p, None, True))
        elif kind is Kind.CHOICE:
            for name, primitive in el.choices:
                if primitive:
                    _find_primitive(parent, path, name, False, el, out, grouped)
                elif name in parent:
                    _find_complex(parent, name, _join(path, name), (), el, out, grouped)
        elif kind is Kind.CHOICE_MASKED:
            _find_choice_masked(parent, path, el, out, grouped)
        else:
            _find_narrative(parent, path, el, out, grouped)


def covered_locations(resource: JSON, rp: ResourcePolicy) -> set[str]:
    """Concrete paths (``identifier[1].value``, ``name[0]``, ``valueQuantity``) of every occurrence in
    ``resource`` that the policy covers, sealed or still in the clear, found by the same walk as reads.

    For ``fhircrypt coverage``: a clear value under one of these paths is covered by the policy (the
    proxy would encrypt or refuse it); any other is left clear by the policy. Works on a copy, since the
    read walk normalises what it finds. Catch-alls under ``refuse`` count as covered (the proxy refuses
    what they match), so they are walked as if they sealed.
    """
    work = copy.deepcopy(resource)
    out: list[Slot] = []
    for el in rp.elements:
        if _may_hold(work, el):
            _find(work, _sealing(el) if el.refuses else el, out, grouped=True)
    found: set[str] = set()
    for slot in out:
        if isinstance(slot, ChoiceMaskedSlot):  # "value[x]": the choice names actually present
            stem = slot.path[: -len(slot.el.terminal.key) - 3]
            found.update(stem + name for name in slot.names)
        found.add(slot.path)
    return found


def _sealing(el: CompiledElement) -> CompiledElement:
    """``el``, a catch-all under ``refuse``, as the same catch-all under ``encrypt``."""
    unlisted = el.closing
    assert unlisted is not None
    sealing = dataclasses.replace(unlisted, action="encrypt")
    if el.terminal.unlisted is unlisted:
        return dataclasses.replace(el, terminal=dataclasses.replace(el.terminal, unlisted=sealing))
    return dataclasses.replace(el, nav=(*el.nav[:-1], dataclasses.replace(el.nav[-1], unlisted=sealing)))


def _find_choice_masked(parent: JSON, path: str, el: CompiledElement, out: list[Slot], grouped: bool) -> None:
    names = [n for n, _ in el.choices for k in (n, "_" + n) if k in parent]
    exts = parent.get("extension")
    idx, ct = None, None
    if type(exts) is list:
        idx = next((i for i, e in enumerate(exts) if type(e) is dict and e.get("url") == mk.CIPHERTEXT_URL), None)
        if idx is not None:
            ct = _ct_of({"extension": [exts[idx]]})
    if idx is None and grouped and mk.is_masked_concept(parent.get("dataAbsentReason")):
        ct = IN_GROUP  # v2: the masked reason alone marks the place
    if ct is None and not names:
        return
    path = _join(path, el.terminal.key + "[x]")
    out.append(ChoiceMaskedSlot(el, path, ct, bool(names), parent, exts, idx, names))


def _find_narrative(parent: JSON, path: str, el: CompiledElement, out: list[Slot], grouped: bool) -> None:
    key = el.terminal.key
    text = parent.get(key)
    if text is None:
        return
    ct = _ct_of(text)
    neutral = type(text) is dict and text.get("div") == mk.NEUTRAL_DIV
    bare = neutral and set(text) <= {"status", "div"}
    if ct is None and grouped and bare and not el.replace:
        ct = IN_GROUP  # v2: the neutral narrative alone marks the place
    tampered = ct is None and not (bare and el.replace)
    if ct is None and not tampered:
        return
    out.append(NarrativeSlot(el, _join(path, key), ct, tampered or not neutral, parent, key))


def _find_strays(resource: JSON, el: CompiledElement, out: list[Slot]) -> None:
    """The values the sentinel sealed (the record's tag says there are some): every primitive's ``_twin``
    holding a ciphertext that no slot of the policy's elements holds, nested resources left out (they
    have their own envelopes). Their paths are rendered like the writer's, so the record MAC and each
    ciphertext's bound location check that none was added, removed or moved."""
    known = {s.ct for s in out if s.ct is not None}
    stack: list[tuple[object, str]] = [(resource, "")]
    while stack:
        node, path = stack.pop()
        if type(node) is list:
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node) if type(item) in (dict, list))
            continue
        if type(node) is not dict or (path and "resourceType" in node):
            continue
        for key, value in list(node.items()):
            if key[:1] == "_" and len(key) > 1:
                _stray_slots(node, _join(path, key[1:]), key[1:], value, known, el, out)
            if type(value) in (dict, list):
                stack.append((value, _join(path, key)))


def _stray_slots(
    parent: JSON, path: str, key: str, under: object, known: set[str], el: CompiledElement, out: list[Slot]
) -> None:
    if type(under) is dict:
        ct = _ct_of(under)
        if ct is not None and ct not in known:
            out.append(PrimitiveSlot(el, path, ct, key in parent, parent, key))
        return
    if type(under) is not list:
        return
    found = [(i, ct) for i, u in enumerate(under) if (ct := _ct_of(u)) is not None and ct not in known]
    if not found:
        return
    values = parent.get(key)
    if type(values) is not list:
        values = parent[key] = []
    values.extend([None] * (len(under) - len(values)))
    for i, ct in found:
        out.append(PrimitiveItemSlot(el, f"{path}[{i}]", ct, values[i] is not None, parent, key, i, values, under))


def _take_markers(resource: JSON, in_meta: bool) -> tuple[list[str], list[object], set[object]]:
    """Remove our envelope extension(s), group ciphertexts and tags; returns the envelopes, the group
    ciphertexts and the codes of our tags."""
    envelopes: list[str] = []
    sealed: list[object] = []
    meta = resource.get("meta")
    holder = meta if in_meta else resource
    exts = holder.get("extension") if type(holder) is dict else None
    if type(exts) is list:
        kept = []
        for ext in exts:
            url = ext.get("url") if type(ext) is dict else None
            if url == mk.ENVELOPE_URL:
                envelopes.append(ext.get("valueString"))
            elif url == mk.GROUP_URL:
                sealed.append(ext.get("valueString"))
            else:
                kept.append(ext)
        if kept:
            holder["extension"] = kept  # type: ignore[index]
        else:
            del holder["extension"]  # type: ignore[union-attr]
    codes: set[object] = set()
    if type(meta) is dict and type(meta.get("tag")) is list:
        tags = []
        for tag in meta["tag"]:
            if type(tag) is dict and tag.get("system") == mk.TAG_SYSTEM:
                codes.add(tag.get("code"))
            else:
                tags.append(tag)
        if tags:
            meta["tag"] = tags
        else:
            del meta["tag"]
            if not meta:
                del resource["meta"]
    return envelopes, sealed, codes


def strip_index_identifiers(resource: JSON) -> None:
    """Remove index identifiers (any fhircrypt blind-index system) from a resource read back."""
    ids = resource.get("identifier")
    if type(ids) is not list:
        return
    base = mk.INDEX_BASES  # one pass, one lookup per item: a Patient carries dozens of index identifiers
    kept = [i for i in ids if type(i) is not dict or type(s := i.get("system")) is not str or not s.startswith(base)]
    if len(kept) != len(ids):
        if kept:
            resource["identifier"] = kept
        else:
            del resource["identifier"]


class _GroupOpener:
    """The group ciphertexts of one record (format v2), each decrypted once, when a slot of its group is
    first restored (a caller without the group never has it decrypted)."""

    __slots__ = ("_cts", "_opened", "_paths", "_slots", "items")

    def __init__(self, sealed: list[object], slots: list[Slot]) -> None:
        self._cts: dict[str, str] = {}
        self._slots = slots
        self._paths: dict[str, list[str]] | None = None  # each group's marked locations, on first use
        self._opened: dict[str, dict[str, object] | None] = {}
        self.items: list[tuple[str, str]] = []  # ("@" + group, ciphertext): items of the record MAC
        for ct in sealed:
            group = ct.split(".", 2)[1] if type(ct) is str and ct.count(".") >= 2 else "?"
            self.items.append(("@" + group, ct if type(ct) is str else ""))
            self._cts.setdefault(group, ct)  # type: ignore[arg-type]  # a second one already failed the MAC

    def entry(self, cipher: RecordCipher, el: CompiledElement, path: str) -> object:
        """What the element's group holds for ``path``; IntegrityError unless the group verifies."""
        key = el.group_key
        if key not in self._opened:
            self._opened[key] = self._open(cipher, key)
        entries = self._opened[key]
        if entries is None:
            raise IntegrityError("group ciphertext does not verify")
        return entries[path]

    def _open(self, cipher: RecordCipher, key: str) -> dict[str, object] | None:
        """The group's plaintexts by location: the list it holds, in the sorted order of the group's marks."""
        ct = self._cts.get(key)
        if ct is None:
            return None
        try:
            group, pt = cipher.open_group(ct)
            values = jsonnum.loads(pt)
        except (IntegrityError, ValueError):
            return None
        if self._paths is None:
            self._paths = {}
            for s in self._slots:
                if s.ct == IN_GROUP:
                    self._paths.setdefault(s.el.group_key, []).append(s.path)
        paths = sorted(self._paths.get(key, ()))
        if group != key or type(values) is not list or len(values) != len(paths):
            return None
        return dict(zip(paths, values, strict=True))


def _mark_masked(resource: JSON) -> None:
    meta = resource.get("meta")
    if type(meta) is not dict:
        meta = resource["meta"] = {}
    security = meta.get("security")
    security = security if type(security) is list else []
    if not any(
        type(s) is dict and s.get("code") == "MASKED" and s.get("system") == mk.MASKED_SECURITY_SYSTEM for s in security
    ):
        security.append({"system": mk.MASKED_SECURITY_SYSTEM, "code": "MASKED", "display": "masked"})
    meta["security"] = security


def decrypt_resource(
    resource: JSON, rp: ResourcePolicy, keyring: KeyLookup, grants: Grants, unenveloped: str, report: ReadReport
) -> None:
    """Restore what the caller may see, mask the rest, drop our markers (in place).

    Nothing that fails verification is returned as data: a bad envelope or record MAC
    masks every covered element of the record; a bad element ciphertext masks that
    element; plaintext found where only ciphertext can be is removed.
    ``grants`` is required: a frozenset of groups, or ``ALL_GROUPS``; anything else is a ``TypeError``.
    """
    if not isinstance(grants, frozenset) and grants is not ALL_GROUPS:
        raise TypeError("decrypt_resource needs the reader's grants (a frozenset of groups or ALL_GROUPS)")
    where = f"{rp.type}/{resource.get('id', '?')}"
    envelopes, sealed, codes = _take_markers(resource, rp.envelope_in_meta)
    tagged = bool(codes)
    strip_index_identifiers(resource)
    if not envelopes and not tagged and unenveloped == "allow":
        return
    # the envelope's version says how elements are marked; a forged one fails the MAC, which names it
    grouped = len(envelopes) == 1 and grouped_envelope(envelopes[0])
    slots: list[Slot] = []
    for el, item, path in _planned(resource, rp, strict=False):
        if item is None:
            _find(resource, el, slots, grouped)
        else:
            _find_primitive(item, path, el.terminal.key, el.repeating, el, slots, grouped)
    if mk.STRAY_CODE in codes:
        _find_strays(resource, rp.stray, slots)
    groups = _GroupOpener(sealed, slots if grouped else [])
    cipher, shredded = None, False
    try:
        if len(envelopes) != 1:
            raise IntegrityError("not written by fhircrypt (no envelope)" if not envelopes else "two envelopes")
        cipher, mac = RecordCipher.open_envelope(keyring, rp.type, envelopes[0])
        items = [
            (s.path, s.el.group_member if grouped and s.ct == IN_GROUP else s.ct) for s in slots if s.ct is not None
        ]
        cipher.verify(sorted([*items, *groups.items]), mac)
    except KeyShredded:
        shredded = True  # destroyed on purpose: masked and labelled, not an integrity failure
    except IntegrityError as exc:
        if slots or envelopes or tagged:
            report.fail(where, str(exc))
        cipher = None
    masked = 0
    for slot in slots:
        if cipher is None or slot.tampered or slot.ct is None:
            if cipher is not None or (shredded and slot.tampered):
                report.fail(f"{where} {slot.path}", "plaintext where ciphertext was expected")
            slot.mask()
            masked += 1
            continue
        if grants is not ALL_GROUPS and not slot.el.groups <= grants:  # type: ignore[operator]
            slot.mask()
            masked += 1
            report.masked_groups |= slot.el.groups - grants  # type: ignore[operator]
            continue
        try:
            if slot.ct == IN_GROUP and cipher.grouped:
                slot.put(groups.entry(cipher, slot.el, slot.path))
            else:
                slot.restore(cipher.open(slot.el.field_id, slot.path, slot.ct))
            report.decrypted += 1
            report.decrypted_groups |= slot.el.groups
        except (IntegrityError, ValueError, TypeError):
            report.fail(f"{where} {slot.path}", "ciphertext does not verify")
            slot.mask()
            masked += 1
    if masked:
        report.masked += masked
        _mark_masked(resource)
    if shredded:
        report.shredded += 1
        mk.add_tag(resource, mk.shredded_tag())


_MARKER_URLS = frozenset({mk.CIPHERTEXT_URL, mk.ENVELOPE_URL, mk.GROUP_URL})


def scrub_markers(value: object) -> int:
    """Remove every fhircrypt extension left anywhere in ``value``; returns how many.

    Only needed when a stored resource holds ciphertext the policy no longer points at
    (an element removed from the policy, or placed by someone else): it is not data
    for the client. Walks the whole tree, so callers run it only when the serialised
    response still contains a marker URL.
    """
    removed = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            exts = item.get("extension")
            if type(exts) is list:
                kept = [e for e in exts if not (type(e) is dict and e.get("url") in _MARKER_URLS)]
                if len(kept) != len(exts):
                    removed += len(exts) - len(kept)
                    if kept:
                        item["extension"] = kept
                    else:
                        del item["extension"]
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return removed
