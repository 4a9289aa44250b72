"""A sample to score, as the engines pass it around (no heavy imports: the web process reads it too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Sample:
    question: str
    contexts: list[str]
    ground_truth: str
    answer: str
    reference_contexts: list[str] | None = None

    def to_ragas(self) -> dict[str, Any]:
        return {
            "user_input": self.question,
            "retrieved_contexts": list(self.contexts),
            # Without annotated reference passages, the ground truth is the reference context.
            "reference_contexts": list(self.reference_contexts or [self.ground_truth]),
            "response": self.answer,
            "reference": self.ground_truth,
        }
