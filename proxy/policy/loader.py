"""Load policy YAML keeping source lines, so every error names file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class PolicyError(ValueError):
    """A policy that cannot be used; ``str()`` reads ``file:line: field: problem``."""

    def __init__(self, source: str, line: int | None, field: str, message: str) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {field}: {message}")
        self.source, self.line, self.field, self.message = source, line, field, message


class Node(dict[str, Any]):
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int = 0
    key_lines: dict[str, int]


class NodeList(list[Any]):
    line: int = 0


class _LineLoader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) that records 1-based line numbers."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Node:  # type: ignore[override]
        mapping = Node()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise PolicyError(self.name, key_node.start_mark.line + 1, str(key), "keys must be strings")
            if key in mapping:
                raise PolicyError(self.name, key_node.start_mark.line + 1, key, "duplicate key")
            mapping[key] = self.construct_object(value_node, deep=True)
            mapping.key_lines[key] = key_node.start_mark.line + 1
        return mapping

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> NodeList:
        seq = NodeList(self.construct_object(child, deep=True) for child in node.value)
        seq.line = node.start_mark.line + 1
        return seq


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence)


def load_yaml(text: str, source: str) -> Any:
    loader = _LineLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise PolicyError(source, line, "yaml", exc.problem or "syntax error") from None
    finally:
        loader.dispose()


def load_policy(path: str | Path) -> tuple[Node, str]:
    """Read a policy file; returns the located document and its source name."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(source, None, "file", exc.strerror or "cannot read") from None
    doc = load_yaml(text, source)
    if not isinstance(doc, Node):
        raise PolicyError(source, 1, "policy", "the document must be a mapping")
    return doc, source
