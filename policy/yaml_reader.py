"""Typed reading of a composed YAML tree that remembers where every value was written.

PyYAML's `compose` keeps node marks (line, column); reading through `Field` turns each value into a typed one or
records a problem at its position, and goes on, so that `vigie check` reports every problem at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import TypeVar

import yaml

from policy.errors import ConfigProblem, Severity
from policy.model import Origin

T = TypeVar("T")


class Problems:
    """The problems found so far, in the order found."""

    def __init__(self) -> None:
        self.items: list[ConfigProblem] = []

    def add(self, file: str, line: int, column: int, path: str, message: str,
            severity: Severity = Severity.ERROR) -> None:
        self.items.append(ConfigProblem(file, line, column, path, message, severity))

    @property
    def has_errors(self) -> bool:
        return any(p.severity is Severity.ERROR for p in self.items)


class Field:
    """A YAML node with its dotted path (`groups.cm2-a.networks[1]`) and the file it came from."""

    def __init__(self, node: yaml.Node, path: str, file: str, problems: Problems,
                 key_node: yaml.Node | None = None) -> None:
        self.node = node
        self.key_node = key_node  # where the key of this value was written, for "unknown key" errors
        self.path = path
        self.file = file
        self.problems = problems

    @property
    def origin(self) -> Origin:
        mark = self.node.start_mark
        return Origin(self.file, mark.line + 1, mark.column + 1, self.path)

    def error(self, message: str, severity: Severity = Severity.ERROR) -> None:
        mark = self.node.start_mark
        self.problems.add(self.file, mark.line + 1, mark.column + 1, self.path, message, severity)

    def warn(self, message: str) -> None:
        self.error(message, Severity.WARNING)

    def child(self, node: yaml.Node, suffix: str) -> Field:
        joiner = "" if suffix.startswith("[") or not self.path else "."
        return Field(node, f"{self.path}{joiner}{suffix}", self.file, self.problems)

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:null"

    def entries(self, what: str = "a mapping") -> Iterator[tuple[str, Field]]:
        """The key/value pairs of a mapping whose keys are names chosen by the admin (groups, profiles…)."""
        if self.is_null:
            return
        if not isinstance(self.node, yaml.MappingNode):
            self.error(f"expected {what} of `name: value` lines, found {_kind(self.node)}")
            return
        seen: set[str] = set()
        for key_node, value_node in self.node.value:
            key_field = self.child(key_node, str(key_node.value))
            if not isinstance(key_node, yaml.ScalarNode) or not str(key_node.value).strip():
                key_field.error("a key must be a plain name")
                continue
            key = str(key_node.value)
            if key in seen:
                key_field.error(f"{key!r} is written twice; the second would silently replace the first")
                continue
            seen.add(key)
            value = self.child(value_node, key)
            value.key_node = key_node
            yield key, value

    def mapping(self, known: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Field]:
        """The keys of a fixed-shape mapping; unknown keys are errors (with the nearest known key suggested)."""
        found: dict[str, Field] = {}
        for key, value in self.entries():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                mark = (value.key_node or value.node).start_mark
                self.problems.add(self.file, mark.line + 1, mark.column + 1, value.path,
                                  f"unknown key {key!r} ({hint})")
                continue
            found[key] = value
        if isinstance(self.node, yaml.MappingNode):
            for key in required:
                if key not in found:
                    self.error(f"missing key {key!r}")
        return found

    def items(self, *, single_allowed: bool = True) -> list[Field]:
        """A sequence's items; a lone scalar counts as a list of one when `single_allowed`."""
        if self.is_null:
            return []
        if isinstance(self.node, yaml.SequenceNode):
            return [self.child(item, f"[{index}]") for index, item in enumerate(self.node.value)]
        if single_allowed and isinstance(self.node, yaml.ScalarNode):
            return [self]
        self.error(f"expected a list (example: [a, b]), found {_kind(self.node)}")
        return []

    def converted_items(self, convert: Callable[[str], T], example: str) -> tuple[T, ...]:
        """Each item of a list, converted; a bad one is recorded at its position and left out."""
        return tuple(value for item in self.items() if (value := item.converted(convert, example)) is not None)

    def text(self, example: str = "") -> str | None:
        if isinstance(self.node, yaml.ScalarNode) and not self.is_null:
            return str(self.node.value)
        hint = f" (example: {example})" if example else ""
        self.error(f"expected a single value{hint}, found {_kind(self.node)}")
        return None

    def choice(self, choices: tuple[str, ...]) -> str | None:
        value = self.text(choices[0])
        if value is None:
            return None
        if value not in choices:
            self.error(f"{value!r} is not one of: {', '.join(choices)}")
            return None
        return value

    def boolean(self) -> bool | None:
        value = self.text("true")
        if value is None:
            return None
        lowered = value.lower()
        if lowered in ("true", "yes", "on", "oui"):
            return True
        if lowered in ("false", "no", "off", "non"):
            return False
        self.error(f"{value!r} is not true or false")
        return None

    def converted(self, convert: Callable[[str], T], example: str) -> T | None:
        """Apply `convert` (which raises ValueError with a reason) to the scalar; record the reason if it fails."""
        value = self.text(example)
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError as exc:
            reason = str(exc) or "invalid"
            self.error(f"{value!r}: {reason} (example: {example})")
            return None


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "nothing"
    return f"{node.value!r}"
