"""The six bundled datasets, registered on migrate and by `manage.py seed_datasets`."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from .models import Dataset
from .services import dataset_import_path


@dataclass(frozen=True)
class BundledDataset:
    name: str
    kind: str
    relative_path: str
    description: str


BUNDLED = [
    BundledDataset("rag_qa_train", "train", "train/rag_qa_train.jsonl", "General-knowledge RAG QA: science, computing, history, geography."),
    BundledDataset("medical_qa_train", "train", "train/medical_qa_train.jsonl", "Medical and health QA grounded in reference passages."),
    BundledDataset("legal_qa_train", "train", "train/legal_qa_train.jsonl", "Legal QA: contracts, torts, constitutional law, IP, EU law."),
    BundledDataset("ragas_eval", "eval", "eval/ragas_eval.jsonl", "Evaluation set for rag_qa_train's topics, with distractor contexts."),
    BundledDataset("medical_ragas_eval", "eval", "eval/medical_ragas_eval.jsonl", "Evaluation set for medical_qa_train's topics."),
    BundledDataset("legal_ragas_eval", "eval", "eval/legal_ragas_eval.jsonl", "Evaluation set for legal_qa_train's topics."),
]


def seed_datasets(*, dry_run: bool = False) -> list[tuple[str, str]]:
    """Register every bundled dataset that is not registered yet. Idempotent.

    Returns (name, action) pairs; action is "created", "exists" or "would create".
    """
    outcome = []
    for bundled in BUNDLED:
        if Dataset.objects.filter(name=bundled.name).exists():
            outcome.append((bundled.name, "exists"))
            continue
        if dry_run:
            outcome.append((bundled.name, "would create"))
            continue
        dataset_import_path(
            path=settings.BUNDLED_DATA_DIR / bundled.relative_path,
            name=bundled.name,
            kind=bundled.kind,
            description=bundled.description,
        )
        outcome.append((bundled.name, "created"))
    return outcome
