"""Type names for the parsed JSON the core walks, so signatures say what they carry.

A FHIR resource, element or Bundle entry parsed by :mod:`proxy.transform.jsonnum` is a
``JSON`` object: string keys, values of any JSON type (``Any``, because each step checks the
type it needs at runtime, as untrusted input requires).
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]
