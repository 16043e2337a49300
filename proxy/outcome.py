"""FHIR OperationOutcome refusals.

Every refusal the proxy makes is a :class:`FhirError` carrying an HTTP status and
FHIR issue fields. Messages name paths, parameters and codes - never values - so an
error can be logged, audited and returned without leaking PHI.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Issue:
    """One ``OperationOutcome.issue``; ``expression`` holds FHIRPath locations."""

    code: str
    diagnostics: str
    severity: str = "error"
    expression: list[str] = field(default_factory=list)

    def as_fhir(self) -> dict:
        issue: dict = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


class FhirError(Exception):
    """A refusal that becomes an OperationOutcome response with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        expression: list[str] | None = None,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issues = issues or [Issue(code, diagnostics, expression=expression or [])]
        self.headers = headers or {}

    @property
    def reason(self) -> str:
        """Short machine-readable reason (the first issue's code) for logs and metrics."""
        return self.issues[0].code

    def outcome(self) -> dict:
        return operation_outcome(self.issues)

    def located(self, where: str) -> FhirError:
        """The same refusal, its message prefixed with where it arose (a Bundle entry, a reference)."""
        first = self.issues[0]
        return FhirError(
            self.status, first.code, f"{where}: {first.diagnostics}", first.expression or [where], headers=self.headers
        )


def operation_outcome(issues: list[Issue]) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [i.as_fhir() for i in issues]}
