"""Bulk Data export (FHIR Bulk Data Access IG): kick-off checks, manifests and NDJSON lines.

Export files are the largest responses a FHIR server gives (a whole hospital's records),
so they are never read whole: the proxy splits the upstream's byte stream into lines,
decrypts each resource by its own type and writes it on, holding one chunk and at most
one line in memory. The manifest's file URLs are replaced by signed proxy links, so
clients fetch every file through the proxy; files the upstream serves without a token
(pre-signed links) would bypass it and are refused unless the policy says to proxy them.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.outcome import FhirError
from proxy.policy.definitions import resource_types
from proxy.transform.guard import check_control_value
from proxy.transform.jsontypes import JSON

NDJSON_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
NDJSON_TYPES = frozenset({"application/fhir+ndjson", "application/ndjson", "application/x-ndjson"})
_UNSUPPORTED = {
    "_typeFilter": "its searches could carry plaintext of encrypted elements",
    "_elements": "the server would drop the records' envelopes",
    "patient": "patient references are sent in a POST body, which is not supported",
    "includeAssociatedData": "not supported through the proxy",
}


def check_kickoff(params: list[tuple[str, str]]) -> None:
    """Export parameters: only those that carry no element values and keep envelopes intact."""
    for name, value in params:
        if name == "_outputFormat":
            if value not in NDJSON_FORMATS:
                raise FhirError(400, "not-supported", "$export: _outputFormat must be NDJSON", ["_outputFormat"])
        elif name == "_type":
            unknown = [t for t in value.split(",") if t not in resource_types()]
            if unknown:
                raise FhirError(
                    400, "invalid", "$export: _type names a type that is not an R4 resource type", ["_type"]
                )
        elif name in _UNSUPPORTED:
            raise FhirError(501, "not-supported", f"$export: '{name}' is refused: {_UNSUPPORTED[name]}", [name])
        elif name == "_since":
            check_control_value(name, value, "$export")  # a date, or it could carry a record's value
        else:
            raise FhirError(400, "not-supported", f"$export: parameter '{name}' is not supported", [name])


def rewrite_manifest(manifest: object, link: Callable[[str, bool], str], presigned: str) -> JSON:
    """Point every file of a completion manifest at the proxy; ``link(url, with_token)`` makes a proxy link."""
    if type(manifest) is not dict or type(manifest.get("output")) is not list:
        raise FhirError(502, "structure", "the upstream's export manifest is not a Bulk Data manifest")
    with_token = manifest.get("requiresAccessToken") is not False
    if not with_token and presigned == "refuse":
        raise FhirError(
            502,
            "security",
            "the export's files are served without an access token (pre-signed links) and would "
            "bypass the proxy; the policy refuses them (bulk.presigned: refuse)",
        )
    for key in ("output", "error", "deleted"):
        items = manifest.get(key)
        for item in items if type(items) is list else ():
            if type(item) is not dict or type(item.get("url")) is not str:
                raise FhirError(502, "structure", f"the upstream's export manifest has a {key} entry without url")
            item["url"] = link(item["url"], with_token)
    manifest["requiresAccessToken"] = True  # the proxy links need the client's token
    return manifest


class LineSplitter:
    """Cuts a byte stream into lines, refusing any line longer than ``max_line`` (bounded memory).

    The unfinished line is kept as the chunks that hold it and joined once, when its newline
    arrives: each byte is copied once, so a long line costs time in proportion to its length
    (re-joining it on every chunk cost the square: 0.8 s for a 16 MiB line in 64 KiB chunks)."""

    def __init__(self, max_line: int) -> None:
        self._pending: list[bytes] = []  # the chunks of the line not yet ended
        self._size = 0
        self._max = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            self._hold(chunk)
            return []
        lines = chunk.split(b"\n")
        lines[0] = b"".join([*self._pending, lines[0]])
        self._pending, self._size = [], 0
        self._hold(lines.pop())
        return [line for line in lines if line.strip()]

    def _hold(self, part: bytes) -> None:
        self._pending.append(part)
        self._size += len(part)
        if self._size > self._max:
            raise FhirError(502, "too-costly", "an export file line exceeds the proxy's size limit")

    def close(self) -> list[bytes]:
        rest = b"".join(self._pending)
        self._pending, self._size = [], 0
        return [rest] if rest.strip() else []
