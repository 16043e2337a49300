"""Operation requests with a body: what may be forwarded, what is encrypted, what is refused.

A ``Parameters`` body is checked parameter by parameter: a primitive or ``part``
parameter must be one the policy lists for the operation (``operations`` block) or a
control parameter, since its value could be plaintext of an encrypted element; a
resource parameter is fine when no resource of an encrypted type is in it, and is
encrypted like a create when the policy says ``body: encrypt``. A body that is a
resource itself (``$process-message`` posts a message Bundle) is treated like one
resource parameter.
"""

from __future__ import annotations

from collections.abc import Iterator

from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.policy.operations import OperationRule
from proxy.transform.bodies import nested_resources
from proxy.transform.guard import check_operation_date, operation_parameter_allowed, operation_rule
from proxy.transform.interactions import Interaction
from proxy.transform.jsontypes import JSON


def resources_to_encrypt(it: Interaction, body: JSON, policy: CompiledPolicy) -> list[tuple[JSON, str]]:
    """Check an operation's request body; returns the resources (with locations) the proxy must encrypt."""
    rule = operation_rule(it, policy.operations)
    rtype = str(body.get("resourceType"))
    if rtype == "Parameters":
        candidates = list(_resource_parameters(rule, body))
        everything = list(nested_resources(body, rtype))
    else:
        candidates = [(body, rtype)]
        everything = [(body, rtype), *nested_resources(body, rtype)]
    covered = [where for resource, where in everything if resource.get("resourceType") in policy.resources]
    if not covered:
        return []
    if rule.body != "encrypt":
        raise FhirError(
            501,
            "not-supported",
            f"${rule.name}: {covered[0]} is a resource of an encrypted type; the policy's operations "
            "block does not allow this operation to carry it (body: encrypt)",
            covered[:5],
        )
    roots = [where for _, where in candidates]
    outside = [w for w in covered if not any(w == r or w.startswith(r + ".") for r in roots)]
    if outside:
        raise FhirError(
            501,
            "not-supported",
            f"${rule.name}: {outside[0]} is a resource of an encrypted type inside a parameter part; "
            "only resource parameters can be encrypted",
            outside[:5],
        )
    return candidates


def _resource_parameters(rule: OperationRule, body: JSON) -> Iterator[tuple[JSON, str]]:
    params = body.get("parameter", [])
    if type(params) is not list:
        raise FhirError(400, "structure", "Parameters.parameter must be a list", ["Parameters.parameter"])
    for i, param in enumerate(params):
        where = f"Parameters.parameter[{i}]"
        if type(param) is not dict or type(param.get("name")) is not str:
            raise FhirError(400, "structure", f"{where} needs a name", [where])
        name = param["name"]
        carries_values = "part" in param or any(k.startswith("value") for k in param)
        for key, value in param.items():
            if key.startswith("value") or key == "part":
                check_operation_date(rule, name, value)
        if carries_values and not operation_parameter_allowed(rule, name):
            raise FhirError(
                501,
                "not-supported",
                f"${rule.name}: parameter '{name}' is not allowed by the policy's operations block "
                "(it could carry plaintext of encrypted elements)",
                [where],
            )
        resource = param.get("resource")
        if type(resource) is dict:
            yield resource, f"{where}.resource"
        elif resource is not None:
            raise FhirError(400, "structure", f"{where}.resource must be a resource", [where])
