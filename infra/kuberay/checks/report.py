"""What the checks found on one rendered kustomization."""

from __future__ import annotations

from dataclasses import dataclass, field

ErrorsAndNotes = tuple[list[str], list[str]]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_secrets: set[str] = field(default_factory=set)  # referenced, not rendered

    def extend(self, result: ErrorsAndNotes) -> None:
        self.errors += result[0]
        self.notes += result[1]
