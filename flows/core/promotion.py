"""The promotion gate: may a candidate model replace prod? A pure decision on figures both models
earned on the same test split (the candidate's), so a changed split never flatters either side.

Its verdict is one of three: promoted, rejected, or could not compare (prod's model could not be
scored, e.g. it is in neither the DVC cache nor the remote): the last never promotes, and says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PROMOTED, REJECTED, NOT_COMPARED = "promoted", "rejected", "could not compare"


@dataclass(frozen=True)
class Figures:
    """What the gate compares: one model's test accuracy and per-class recall on one split."""

    accuracy: float
    recall: dict[str, float]
    n_test: int

    @classmethod
    def of(cls, labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> Figures:
        """The figures of predictions pred against labels."""
        recall = {}
        for i, name in enumerate(classes):
            actual = labels == i
            recall[name] = float((pred[actual] == i).mean()) if actual.any() else 0.0
        accuracy = float((pred == labels).mean()) if len(labels) else 0.0
        return cls(accuracy=accuracy, recall=recall, n_test=int(len(labels)))


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: promote or not, every reason against, and both sides' figures."""

    promote: bool
    reasons: list[str]
    candidate: Figures
    prod: Figures | None
    tolerance: float
    max_class_drop: float
    notes: list[str] = field(default_factory=list)
    compared: bool = True  # False: there is a prod model, but its figures could not be had
    groups: list[dict] = field(default_factory=list)  # with data.groups: each attribute's worst group, gap, change

    @property
    def verdict(self) -> str:
        """promoted, rejected or could not compare: what a person reads first."""
        if self.promote:
            return PROMOTED
        return REJECTED if self.compared else NOT_COMPARED

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def summary(self) -> str:
        """One sentence: what happened and why."""
        if not self.promote:
            return f"{self.verdict}: " + "; ".join(self.reasons) + "."
        if not self.compared:  # forced past a prod model that could not be scored
            return "promoted without a comparison: " + "; ".join(self.notes) + "."
        if self.prod is None:
            return "promoted: there is no prod model yet."
        return (f"promoted: test accuracy {self.candidate.accuracy:.4f} against prod's {self.prod.accuracy:.4f} "
                f"(tolerance {self.tolerance}), no class's recall dropped more than {self.max_class_drop}.")


def decide(candidate: Figures, prod: Figures | None, tolerance: float, max_class_drop: float,
           groups: list[dict] | None = None, group_reasons: list[str] | tuple[str, ...] = ()) -> Decision:
    """Promote when there is no prod, or when the candidate's accuracy is at least prod's minus
    tolerance and no class's recall is lower than prod's by more than max_class_drop; and, with groups,
    when the group check (flows.core.groups.compare: its figures and reasons) found nothing certain against it."""
    reasons: list[str] = []
    if prod is not None:
        floor = prod.accuracy - tolerance
        if candidate.accuracy < floor - 1e-12:
            reasons.append(f"test accuracy {candidate.accuracy:.4f} is below prod's {prod.accuracy:.4f} "
                           f"minus the tolerance {tolerance} ({floor:.4f})")
        for name, before in prod.recall.items():
            after = candidate.recall.get(name, 0.0)
            if before - after > max_class_drop + 1e-12:
                reasons.append(f"class '{name}' recall drops {before - after:.4f} ({before:.4f} -> {after:.4f}), "
                               f"more than promote.max_class_drop {max_class_drop}")
    reasons += group_reasons
    return Decision(promote=not reasons, reasons=reasons, candidate=candidate, prod=prod,
                    tolerance=tolerance, max_class_drop=max_class_drop, groups=list(groups or []))


def not_compared(candidate: Figures, why: str, tolerance: float, max_class_drop: float) -> Decision:
    """The verdict when prod exists but its model cannot be scored: no promotion, and why, so that
    a candidate never replaces a prod model nobody could compare it with."""
    return Decision(promote=False, reasons=[why], candidate=candidate, prod=None, tolerance=tolerance,
                    max_class_drop=max_class_drop, compared=False)
