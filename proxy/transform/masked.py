"""Writing back a resource that was read with masked elements.

A caller without a group reads its elements masked and may write the resource back
(to change something it can see). Encrypting the masks as if they were values would
erase the stored data, so each masked occurrence is replaced by the stored plaintext
at the same place before the resource is encrypted again. The proxy reads the stored
version itself and the update carries ``If-Match`` on that version, so a concurrent
writer gets a conflict instead of a lost update.
"""

from __future__ import annotations

from typing import Any

from proxy.policy.compiler import CompiledElement, Kind, ResourcePolicy
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON
from proxy.transform.records import _admits, _join, _parents

_DAR = [mk.dar_masked()]


def _masked(value: object, keep: tuple[str, ...] = ()) -> bool:
    if type(value) is not dict:
        return False
    if value.get("extension") == _DAR and set(value) <= {"extension", *keep}:
        return True
    holder = mk.held_markers(value, keep) if keep else None  # a simple extension masked inside its value[x]
    return holder is not None and _masked(value[holder])


def has_masked_label(resource: JSON) -> bool:
    meta = resource.get("meta")
    security = meta.get("security") if type(meta) is dict else None
    return type(security) is list and any(
        type(s) is dict and s.get("code") == "MASKED" and s.get("system") == mk.MASKED_SECURITY_SYSTEM for s in security
    )


def drop_masked_label(resource: JSON) -> None:
    meta = resource.get("meta")
    if type(meta) is dict and type(meta.get("security")) is list:
        kept = [
            s
            for s in meta["security"]
            if not (type(s) is dict and s.get("code") == "MASKED" and s.get("system") == mk.MASKED_SECURITY_SYSTEM)
        ]
        if kept:
            meta["security"] = kept
        else:
            del meta["security"]


class _Merge:
    def __init__(self) -> None:
        self.restored = 0
        self.missing: list[str] = []

    def primitive(self, parent: JSON, other: JSON | None, path: str, key: str, repeating: bool) -> None:
        ukey = "_" + key
        if not repeating:
            if _masked(parent.get(ukey)) and parent.get(key) is None:
                self._copy(parent, other, path, (key, ukey))
            return
        unders = parent.get(ukey)
        if type(unders) is not list:
            return
        values: list[Any] = parent[key] if type(parent.get(key)) is list else [None] * len(unders)
        theirs_v: list[Any] = other[key] if other and type(other.get(key)) is list else []
        theirs_u: list[Any] = other[ukey] if other and type(other.get(ukey)) is list else []
        changed = False
        for i, under in enumerate(unders):
            if _masked(under) and (i >= len(values) or values[i] is None):
                if i >= max(len(theirs_v), len(theirs_u)):
                    self.missing.append(f"{_join(path, key)}[{i}]")
                    continue
                values.extend([None] * (i + 1 - len(values)))
                values[i] = theirs_v[i] if i < len(theirs_v) else None
                unders[i] = theirs_u[i] if i < len(theirs_u) else None
                self.restored += 1
                changed = True
        if changed:
            parent[key] = values
            for k in (key, ukey):
                if all(v is None for v in parent[k]):
                    del parent[k]

    def _copy(self, parent: JSON, other: JSON | None, path: str, keys: tuple[str, ...]) -> None:
        if other is None or not any(k in other for k in keys):
            self.missing.append(_join(path, keys[0]))
            return
        for k in keys:
            if k in other:
                parent[k] = other[k]
            else:
                parent.pop(k, None)
        self.restored += 1

    def complex(self, parent: JSON, other: JSON | None, path: str, el: CompiledElement) -> None:
        key = el.terminal.key
        value = parent.get(key)
        if not el.repeating:
            if _masked(value, el.keep):
                self._copy(parent, other, path, (key,))
            return
        if type(value) is not list:
            return
        theirs: list[Any] = other[key] if other and type(other.get(key)) is list else []
        for i, item in enumerate(value):
            if _masked(item, el.keep) and _admits(item, el.terminal):
                if i < len(theirs) and type(theirs[i]) is dict and _admits(theirs[i], el.terminal):
                    value[i] = theirs[i]
                    self.restored += 1
                else:
                    self.missing.append(f"{_join(path, key)}[{i}]")

    def element(self, incoming: JSON, stored: JSON, el: CompiledElement) -> None:
        theirs = {path: parent for parent, path in _parents(stored, el.nav, strict=False)}
        for parent, path in _parents(incoming, el.nav, strict=True):
            other = theirs.get(path)
            if el.kind is Kind.PRIMITIVE:
                self.primitive(parent, other, path, el.terminal.key, el.repeating)
            elif el.kind is Kind.COMPLEX:
                self.complex(parent, other, path, el)
            elif el.kind is Kind.CHOICE:
                for name, primitive in el.choices:
                    if primitive:
                        self.primitive(parent, other, path, name, False)
                    elif _masked(parent.get(name)):
                        self._copy(parent, other, path, (name,))
            elif el.kind is Kind.CHOICE_MASKED:
                names = [n for n, _ in el.choices for k in (n, "_" + n) if k in parent]
                if not names and parent.get("dataAbsentReason") == mk.masked_concept():
                    keys = ("dataAbsentReason", *(k for n, _ in el.choices for k in (n, "_" + n)))
                    self._copy(parent, other, path, keys)
            elif parent.get(el.terminal.key) == mk.neutral_narrative() and other and el.terminal.key in other:
                parent[el.terminal.key] = other[el.terminal.key]  # the narrative came back neutral


def has_masked(resource: JSON, rp: ResourcePolicy) -> bool:
    """Whether the resource holds masked covered elements (or carries the MASKED label)."""
    if has_masked_label(resource):
        return True
    if rp.narrative_mode == "encrypt" and resource.get("text") == mk.neutral_narrative():
        return True  # what a reader without every group got back (in replace mode it is the stored form)
    probe = _Merge()
    for el in rp.content_elements:
        probe.element(resource, {}, el)  # nothing to restore from: every masked place is reported
    return bool(probe.missing)


def merge_masked(incoming: JSON, stored_plain: JSON, rp: ResourcePolicy) -> list[str]:
    """Restore masked occurrences from the stored (decrypted) version, in place; returns the
    paths that could not be restored (the stored version has nothing there)."""
    merge = _Merge()
    for el in rp.elements:
        merge.element(incoming, stored_plain, el)
    _restore_strays(incoming, stored_plain)
    drop_masked_label(incoming)
    return merge.missing


def _restore_strays(incoming: JSON, stored_plain: JSON) -> None:
    """Masks left once the policy's elements are restored are values the PHI sentinel sealed in clear
    elements (read masked by a caller without the sentinel's group): each goes back from the stored
    version at the same place. One the stored version has nothing for stays as sent (a client may write a
    data-absent-reason of its own). Nested resources are paired and restored on their own."""
    merge = _Merge()
    stack: list[tuple[object, object, str]] = [(incoming, stored_plain, "")]
    while stack:
        mine, theirs, path = stack.pop()
        if type(mine) is list:
            other = theirs if type(theirs) is list else []
            stack.extend((item, other[i] if i < len(other) else None, f"{path}[{i}]") for i, item in enumerate(mine))
            continue
        if type(mine) is not dict or (path and "resourceType" in mine):
            continue
        other_dict = theirs if type(theirs) is dict else None
        for key, value in list(mine.items()):
            if key[:1] == "_" and len(key) > 1:
                merge.primitive(mine, other_dict, path, key[1:], type(value) is list)
                value = mine.get(key)
            if type(value) in (dict, list):
                stack.append((value, other_dict.get(key) if other_dict else None, _join(path, key)))
