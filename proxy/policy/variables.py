"""``${FHIRCRYPT_…}`` variables in a policy: values that differ per deployment (the hospital's
SATUSEHAT organisation id, the identifier system its EMR writes BPJS numbers under).

A shipped policy cannot know them, and a placeholder an operator forgets to replace makes an
element match nothing, so its values stay in the clear. They are therefore configuration:
resolved at policy load from the environment (or the values given to the compiler), and a
variable left unset is a finding with code ``variable-unset`` that ``fhircrypt serve`` and
``policy check --strict`` refuse, naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from proxy.policy.lint import Finding
from proxy.policy.loader import Node, NodeList

UNSET = "variable-unset"
_VARIABLE = re.compile(r"\$\{(FHIRCRYPT_[A-Z0-9_]+)\}")


def resolve(doc: Node, values: Mapping[str, str]) -> list[Finding]:
    """Replace every set variable in the document's strings (in place); one finding per unset one."""
    findings: list[tuple[int, Finding]] = []
    stack: list[tuple[object, str, int]] = [(doc, "", doc.line)]
    while stack:
        node, where, line = stack.pop()
        items = node.items() if isinstance(node, Node) else enumerate(node) if isinstance(node, NodeList) else ()
        for key, value in items:
            if isinstance(node, Node):
                here, at = (f"{where}.{key}" if where else str(key)), node.key_lines.get(key, node.line)
            else:
                here, at = f"{where}[{key}]", node.line or line
            if isinstance(value, (Node, NodeList)):
                stack.append((value, here, at))
            elif isinstance(value, str) and "${" in value:
                node[key] = _substitute(value, here, at, values, findings)
    return [finding for _, finding in sorted(findings, key=lambda pair: pair[0])]  # in file order


def _substitute(
    text: str, where: str, line: int, values: Mapping[str, str], findings: list[tuple[int, Finding]]
) -> str:
    def one(m: re.Match) -> str:
        value = values.get(m.group(1))
        if value:
            return value
        message = (
            f"line {line}: {where}: ${{{m.group(1)}}} is not set - set the environment variable "
            f"{m.group(1)} (fhircrypt serve refuses to start without it)"
        )
        findings.append((line, Finding("warning", UNSET, message)))
        return m.group(0)

    return _VARIABLE.sub(one, text)
