"""Errors for bad user input, and the record of what a build skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


class InputError(ValueError):
    """A user mistake in input files or options; the CLI prints it without a traceback.

    The message names the file, the line (1-based) and the field when they are known.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        if field:
            prefix += f"field {field!r}: "
        super().__init__(prefix + message)
        self.file, self.line, self.field = file, line, field


@dataclass(frozen=True)
class Skip:
    """One input record (or part of one) that a build left out, and why."""

    file: str
    line: int | None
    field: str | None
    reason: str


@dataclass
class Skips:
    """Collects skipped records; every one lands in the manifest with its reason."""

    records: list[Skip] = field(default_factory=list)

    def add(self, file: str, line: int | None, field: str | None, reason: str) -> None:
        self.records.append(Skip(file, line, field, reason))

    def counts(self) -> dict[str, int]:
        """Skips per reason kind (the text before the first ':' of the reason)."""
        return dict(sorted(Counter(r.reason.split(":")[0] for r in self.records).items()))

    def as_json(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)
