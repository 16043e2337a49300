"""The policy's ``sentinel`` block, compiled once at load: what the PHI sentinel does per detector.

The detectors themselves live in ``proxy.transform.sentinel``; this module only validates
the block and works out, per covered type, which of its ``HumanName`` elements the policy
encrypts (the names a request carries there must not travel in clear elsewhere).

Under ``encrypt`` a detector's hits in a written resource of a covered type are sealed where
they are, as primitive ciphertexts bound to their location and covered by the record MAC, and
read back by callers holding ``group`` (``docs/at-rest-format.md``, "Values the sentinel sealed").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from proxy.policy import definitions as defs

DETECTORS = ("nik", "bpjs", "ihs", "phone", "email", "name")
MODES = ("refuse", "encrypt", "report", "off")
STRAY_FIELD = "~sentinel"  # the field id bound into a sealed hit's ciphertext (policy ids cannot start with ~)
# The group of sealed hits when the policy names none (it stopped encrypting after they were written): no
# role can hold it, so only the operator's tools (every group) read them back.
NO_GROUP = "~sentinel"
DEFAULT_MODE = "report"  # without the block (or for a detector it does not list): seen, counted, forwarded


@dataclass(frozen=True)
class SentinelSettings:
    actions: Mapping[str, str] = field(default_factory=lambda: dict.fromkeys(DETECTORS, DEFAULT_MODE))
    name_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # type -> HumanName keys it encrypts
    group: str | None = None  # who may read the values the encrypt detectors sealed

    @property
    def active(self) -> bool:
        return any(a != "off" for a in self.actions.values())

    def action(self, detector: str) -> str:
        return self.actions.get(detector, "off")

    @cached_property
    def order(self) -> tuple[str, ...]:
        """The detectors to run on what is forwarded in the clear, those that refuse first: a value
        that is both a phone number (report) and holds a NIK (refuse) is refused. A hit of an encrypt
        detector that is still in the clear here could not be sealed, and is refused too. Detectors
        that are off never run."""
        return tuple(d for mode in ("refuse", "encrypt", "report") for d in DETECTORS if self.action(d) == mode)

    @cached_property
    def sealing(self) -> tuple[str, ...]:
        """The detectors whose hits are sealed in a written resource (empty: nothing is)."""
        return tuple(d for d in DETECTORS if self.action(d) == "encrypt")


OFF = SentinelSettings(actions=dict.fromkeys(DETECTORS, "off"))


def name_keys(rtype: str, sources: Iterable[str]) -> tuple[str, ...]:
    """The top-level HumanName elements of ``rtype`` that some encrypted element path starts in."""
    keys = []
    for source in sources:
        key = source.split(".", 1)[0].split("(", 1)[0]
        row = defs.element(rtype, key)
        if row is not None and "HumanName" in row.types and key not in keys:
            keys.append(key)
    return tuple(keys)
