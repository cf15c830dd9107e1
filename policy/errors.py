"""Config problems read like a compiler's: `rules.yaml:12:5: groups.cm2-a.networks[1]: what is wrong (example)`."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from blocklists.errors import VigieError


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    column: int
    path: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        label = "" if self.severity is Severity.ERROR else "warning: "
        path = f"{self.path}: " if self.path else ""
        return f"{where}: {label}{path}{self.message}"


class ConfigError(VigieError):
    """rules.yaml (or what it names) cannot be used; carries every problem found, not only the first."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> tuple[ConfigProblem, ...]:
        return tuple(p for p in self.problems if p.severity is Severity.ERROR)
