"""Where a read found each encrypted element, and how to put it back or mask it.

A read makes one slot per stored occurrence of a covered element (2,200 for a 100-Patient
searchset). Each shape of occurrence is its own small class holding exactly the places it
needs, with :meth:`Slot.put` (the decrypted JSON goes back where the ciphertext was) and
:meth:`Slot.mask` (the mask marker goes there instead). Typed classes instead of one object
with an integer shape code and an untyped ``extra``: the checker then knows what each shape
holds, and a method call costs no more than the code's if/elif dispatch did. Slots are plain
``__slots__`` dataclasses, never closures (building closures was most of the cost of finding
the elements), and have no ``repr`` of their places (those hold PHI once decrypted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.policy.compiler import CompiledElement
from proxy.transform import jsonnum
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON


class Container(Protocol):
    """A JSON object or array: a complex element lives under a key of one or at a position of the other."""

    def __getitem__(self, place: Any, /) -> Any: ...
    def __setitem__(self, place: Any, value: Any, /) -> None: ...


@dataclass(slots=True, eq=False, repr=False)
class Slot:
    """One stored occurrence: the policy element, its concrete path and its ciphertext (None: none there)."""

    el: CompiledElement
    path: str
    ct: str | None  # IN_GROUP: sealed in its group's ciphertext (format v2), only the mask marker is here
    tampered: bool  # plaintext where only ciphertext can legitimately be

    def restore(self, pt: bytes) -> None:
        """Put back the element an element ciphertext held (its plaintext, UTF-8 JSON)."""
        self.put(jsonnum.loads(pt))

    def put(self, value: Any) -> None:
        """Put the decrypted JSON back; ValueError/TypeError when it does not fit this shape."""
        raise NotImplementedError

    def mask(self) -> None:
        """Replace the element by the mask marker (what a caller gets instead of data it may not see)."""
        raise NotImplementedError


@dataclass(slots=True, eq=False, repr=False)
class GoneSlot(Slot):
    """An occurrence that was not a JSON object where one must be: already removed, nothing to put back."""

    def put(self, value: Any) -> None:
        return None

    def mask(self) -> None:
        return None


@dataclass(slots=True, eq=False, repr=False)
class PrimitiveSlot(Slot):
    """A single primitive: ``parent[key]`` and its ``_key`` (which holds the ciphertext)."""

    parent: JSON
    key: str

    def put(self, value: Any) -> None:
        value, under = _pair(value)
        ukey = "_" + self.key
        self.parent.pop(ukey, None)
        if value is not None:
            self.parent[self.key] = value
        if under is not None:
            self.parent[ukey] = under

    def mask(self) -> None:
        self.parent.pop(self.key, None)
        self.parent["_" + self.key] = mk.masked_form()


@dataclass(slots=True, eq=False, repr=False)
class PrimitiveItemSlot(Slot):
    """Item ``index`` of a repeating primitive: the parallel ``values`` and ``unders`` arrays of ``parent``."""

    parent: JSON
    key: str
    index: int
    values: list[Any]
    unders: list[Any]

    def put(self, value: Any) -> None:
        self.values[self.index], self.unders[self.index] = _pair(value)
        tidy(self.parent, self.key, "_" + self.key)

    def mask(self) -> None:
        self.values[self.index], self.unders[self.index] = None, mk.masked_form()
        tidy(self.parent, self.key, "_" + self.key)


@dataclass(slots=True, eq=False, repr=False)
class ComplexSlot(Slot):
    """A complex element at ``container[index]``; ``keep`` are the keys a mask leaves, ``holder`` the
    value[x] of a simple extension that holds the markers (None: they sit on the element itself)."""

    container: Container
    index: str | int
    keep: tuple[str, ...]
    holder: str | None

    def put(self, value: Any) -> None:
        self.container[self.index] = _object(value)

    def mask(self) -> None:
        item = self.container[self.index]
        form = {k: item[k] for k in self.keep if k in item}
        if self.holder is not None:  # a simple extension: masked inside its value[x], as it was stored
            holder = self.holder
            if type(item.get(holder)) is not dict:  # a primitive value found in the clear: _valueString
                holder = "_" + holder.lstrip("_")
            form[holder] = mk.masked_form()
        else:
            form.update(mk.masked_form())
        self.container[self.index] = form


@dataclass(slots=True, eq=False, repr=False)
class ChoiceMaskedSlot(Slot):
    """A choice element masked as a whole: the ciphertext extension ``exts[idx]`` and the choice
    ``names`` present in ``parent``."""

    parent: JSON
    exts: list[Any] | None
    idx: int | None
    names: list[str]

    def put(self, value: Any) -> None:
        value = _object(value)
        self._drop_ciphertext()
        self.parent.pop("dataAbsentReason", None)
        self.parent.update(value)

    def mask(self) -> None:
        self._drop_ciphertext()
        for n in self.names:
            self.parent.pop(n, None)
        self.parent["dataAbsentReason"] = mk.masked_concept()

    def _drop_ciphertext(self) -> None:
        if self.exts is not None and self.idx is not None:
            del self.exts[self.idx]
            if not self.exts:
                del self.parent["extension"]


@dataclass(slots=True, eq=False, repr=False)
class NarrativeSlot(Slot):
    """A narrative ``parent[key]`` (``text``): replaced whole, masked by the neutral narrative."""

    parent: JSON
    key: str

    def put(self, value: Any) -> None:
        self.parent[self.key] = _object(value)

    def mask(self) -> None:
        self.parent[self.key] = mk.neutral_narrative()


IN_GROUP = ""  # Slot.ct of an element sealed in its group's ciphertext: its record MAC item is (path, "")


def _pair(value: Any) -> tuple[Any, Any]:
    """A primitive's sealed ``[value, _element]``."""
    if type(value) is not list or len(value) != 2:
        raise ValueError("not a primitive's pair")
    return value[0], value[1]


def _object(value: Any) -> JSON:
    if type(value) is not dict:
        raise ValueError("not an object")
    return value


def tidy(parent: JSON, key: str, ukey: str) -> None:
    """Drop a parallel array that holds only nulls (FHIR JSON omits it then)."""
    for k in (key, ukey):
        if k in parent and all(v is None for v in parent[k]):
            del parent[k]
