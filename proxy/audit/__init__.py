"""Audit: one IHE BALP AuditEvent per interaction, written to a tamper-evident, forward-secure
HMAC-chained JSON-lines trail and optionally posted to a FHIR server.

Audit records hold ids, references, group names, codes and counts - never values - so the trail
can be handed to an auditor without handing over PHI.
"""

from proxy.audit.events import Agent, audit_event
from proxy.audit.trail import (
    AsyncAuditSink,
    AuditTrail,
    AuditTrailError,
    AuditUnavailable,
    AuditWriteError,
    BatchWriter,
    TrailCorrupt,
    TrailLocked,
    VerifyResult,
    verify,
)

__all__ = [
    "Agent",
    "AsyncAuditSink",
    "AuditTrail",
    "AuditTrailError",
    "AuditUnavailable",
    "AuditWriteError",
    "BatchWriter",
    "TrailCorrupt",
    "TrailLocked",
    "VerifyResult",
    "audit_event",
    "verify",
]
