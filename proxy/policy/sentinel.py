"""The policy's ``sentinel`` block, compiled once at load: what the PHI sentinel does per detector.

The detectors themselves live in ``proxy.transform.sentinel``; this module only validates
the block and works out, per covered type, which of its ``HumanName`` elements the policy
encrypts (the names a request carries there must not travel in clear elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from proxy.policy import definitions as defs

DETECTORS = ("nik", "bpjs", "ihs", "phone", "email", "name")
MODES = ("refuse", "report", "off")
DEFAULT_MODE = "report"  # without the block (or for a detector it does not list): seen, counted, forwarded


@dataclass(frozen=True)
class SentinelSettings:
    actions: Mapping[str, str] = field(default_factory=lambda: dict.fromkeys(DETECTORS, DEFAULT_MODE))
    name_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # type -> HumanName keys it encrypts

    @property
    def active(self) -> bool:
        return any(a != "off" for a in self.actions.values())

    def action(self, detector: str) -> str:
        return self.actions.get(detector, "off")

    @cached_property
    def order(self) -> tuple[str, ...]:
        """The detectors to run, those that refuse first: a value that is both a phone number
        (report) and holds a NIK (refuse) is refused; detectors that are off never run."""
        return tuple(d for mode in ("refuse", "report") for d in DETECTORS if self.action(d) == mode)


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


def explain_encrypt() -> str:
    return (
        "encrypt is not available for the sentinel: the reader finds ciphertext only where the policy "
        "names an element, so a value sealed where the policy names none could never be read back; use "
        "refuse (and name the element in the policy), or report"
    )
