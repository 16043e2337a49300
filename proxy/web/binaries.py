"""Binary resources in their own content type: raw uploads wrapped, raw downloads unwrapped.

FHIR lets clients ``POST``/``PUT`` a Binary as its raw bytes (a lab PDF with
``Content-Type: application/pdf``) and read it back the same way (``Accept:
application/pdf``). The upstream only ever sees the FHIR JSON form, so the policy's
encryption of ``Binary.data`` applies to raw uploads too; a raw download is answered by
the proxy from the decrypted JSON, and only when the caller may read the data.
"""

from __future__ import annotations

import base64
import binascii

from proxy.outcome import FhirError
from proxy.transform.interactions import Interaction
from proxy.transform.records import ReadReport

FHIR_XML = frozenset({"application/fhir+xml", "application/xml+fhir"})


def binary_resource(it: Interaction, content_type: str, body: bytes) -> dict:
    """The Binary resource for a raw upload (bounded by the proxy's body limit)."""
    resource = {"resourceType": "Binary", "contentType": content_type, "data": base64.b64encode(body).decode()}
    if it.kind == "update" and it.id:
        resource["id"] = it.id
    return resource


def binary_content(payload: dict, report: ReadReport) -> tuple[str, bytes]:
    """The content type and bytes of a decrypted Binary; refused when its data is masked or failed."""
    if payload.get("resourceType") != "Binary":
        raise FhirError(502, "structure", "the upstream did not answer a Binary read with a Binary")
    if report.masked or report.failures:
        raise FhirError(
            403, "forbidden", "Binary.data is not readable for this caller (masked); ask for FHIR JSON to see why"
        )
    content_type = payload.get("contentType")
    if type(content_type) is not str or not content_type:
        raise FhirError(502, "structure", "the stored Binary has no contentType")
    try:
        return content_type, base64.b64decode(payload.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise FhirError(502, "structure", "the stored Binary.data is not base64") from None
