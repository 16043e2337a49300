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
    stack: list[tuple[Node | NodeList, str, int]] = [(doc, "", doc.line)]
    while stack:
        node, where, line = stack.pop()
        if isinstance(node, Node):
            for key, value in node.items():
                here, at = (f"{where}.{key}" if where else str(key)), node.key_lines.get(key, node.line)
                node[key] = _visit(value, here, at, values, findings, stack)
        else:
            for i, value in enumerate(node):
                node[i] = _visit(value, f"{where}[{i}]", node.line or line, values, findings, stack)
    return [finding for _, finding in sorted(findings, key=lambda pair: pair[0])]  # in file order


def _visit(
    value: object,
    where: str,
    line: int,
    values: Mapping[str, str],
    findings: list[tuple[int, Finding]],
    stack: list[tuple[Node | NodeList, str, int]],
) -> object:
    """A value with its set variables replaced; containers are queued for later."""
    if isinstance(value, (Node, NodeList)):
        stack.append((value, where, line))
    elif isinstance(value, str) and "${" in value:
        return _substitute(value, where, line, values, findings)
    return value


def _substitute(
    text: str, where: str, line: int, values: Mapping[str, str], findings: list[tuple[int, Finding]]
) -> str:
    def one(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        if value:
            return str(value)
        message = (
            f"line {line}: {where}: ${{{m.group(1)}}} is not set - set the environment variable "
            f"{m.group(1)} (fhircrypt serve refuses to start without it)"
        )
        findings.append((line, Finding("warning", UNSET, message)))
        return m.group(0)

    return _VARIABLE.sub(one, text)
