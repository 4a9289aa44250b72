"""RAGAS scoring with honest bookkeeping, free of Django so benchmarks can call it.

ragas.evaluate(raise_exceptions=False) turns every failure into NaN and only logs it. We
pass a LangChain callback that records each metric chain's exception, so every
unmeasured sample keeps its reason (timeout, judge unreachable, parse error),
and aggregates count those in n_failed instead of averaging NaN away.

The texts ragas embeds one at a time are embedded beforehand, in batches without
padding (evaluation.embedding_cache): the same vectors, a fraction of the time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from .metric_names import needs_judge
from .metrics import build_metrics, packaged_embeddings, result_key, uses_embeddings
from .samples import Sample

log = logging.getLogger(__name__)


@dataclass
class ScoredSamples:
    scores: list[dict[str, float | None]]
    reasons: list[dict[str, str]]
    metrics: list[str] = field(default_factory=list)

    def aggregate(self) -> dict[str, dict[str, Any]]:
        """Mean over measured samples only; unmeasured ones are counted with their reasons."""
        out = {}
        for name in self.metrics:
            values = [s[name] for s in self.scores if s.get(name) is not None]
            reasons = Counter(r[name] for r in self.reasons if name in r)
            out[name] = {
                "value": (sum(values) / len(values)) if values else None,
                "n_scored": len(values),
                "n_failed": len(self.scores) - len(values),
                "failure_reasons": dict(reasons),
            }
        return out


class _FailureCollector(BaseCallbackHandler):
    """Remembers which (row, metric) chain raised what."""

    raise_error = False
    run_inline = True

    def __init__(self) -> None:
        self.chains: dict[UUID, tuple[str, UUID | None, dict[str, Any]]] = {}
        self.failures: dict[tuple[int, str], BaseException] = {}

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, metadata=None, **kwargs) -> None:
        self.chains[run_id] = ((serialized or {}).get("name", ""), parent_run_id, metadata or {})

    def on_chain_error(self, error, *, run_id, parent_run_id=None, **kwargs) -> None:
        name, parent, _ = self.chains.get(run_id, ("", parent_run_id, {}))
        parent_meta = self.chains.get(parent, ("", None, {}))[2] if parent else {}
        if "row_index" in parent_meta:
            self.failures[(parent_meta["row_index"], name)] = error


def describe_failure(error: BaseException, *, timeout: float | None = None) -> str:
    """A short, user-facing reason a metric could not be computed."""
    try:
        import openai
    except ImportError:  # pragma: no cover - openai ships with langchain-openai
        openai = None
    from ragas.exceptions import RagasOutputParserException

    if isinstance(error, (asyncio.TimeoutError, TimeoutError)) or (openai and isinstance(error, openai.APITimeoutError)):
        return f"timeout{f' after {timeout:g}s' if timeout else ''}"
    if openai and isinstance(error, openai.APIConnectionError):
        return "judge unreachable"
    if openai and isinstance(error, openai.APIStatusError):
        return f"judge answered HTTP {error.status_code}"
    if isinstance(error, RagasOutputParserException) or "parse" in type(error).__name__.lower():
        return "parse error: the judge's answer could not be parsed"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300]


def build_judge(judge: dict[str, Any], api_key: str):
    """A ragas LLM for an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, TGI)."""
    from langchain_openai import ChatOpenAI
    from ragas.llms import LangchainLLMWrapper
    from ragas.run_config import RunConfig

    chat = ChatOpenAI(
        base_url=judge["base_url"], api_key=api_key or "not-set", model=judge["model"], temperature=0,
        timeout=judge["timeout"], max_retries=judge["max_retries"],
    )
    return LangchainLLMWrapper(chat, run_config=RunConfig(timeout=int(math.ceil(judge["timeout"])), max_retries=judge["max_retries"]))


def score_samples(
    samples: list[Sample],
    metric_names: list[str],
    *,
    judge: dict[str, Any] | None = None,
    judge_api_key: str = "",
    show_progress: bool = False,
    max_workers: int = 16,
) -> ScoredSamples:
    """Score every sample with every metric through ragas.evaluate()."""
    from ragas import evaluate
    from ragas.dataset_schema import EvaluationDataset
    from ragas.run_config import RunConfig

    from .embedding_cache import precomputed_embeddings, texts_to_embed

    if not samples:
        return ScoredSamples(scores=[], reasons=[], metrics=list(metric_names))
    llm = build_judge(judge, judge_api_key) if judge and any(needs_judge(m) for m in metric_names) else None
    rows = [s.to_ragas() for s in samples]
    embeddings = None
    if uses_embeddings(metric_names):
        # Every text ragas will embed one at a time, embedded beforehand in unpadded batches (same vectors, bit for bit).
        embeddings = precomputed_embeddings(packaged_embeddings(), texts_to_embed(rows, metric_names))
    metrics = build_metrics(metric_names, llm=llm, embeddings=embeddings)
    timeout = float(judge["timeout"]) if judge else 180.0
    run_config = RunConfig(timeout=int(math.ceil(timeout)), max_retries=judge["max_retries"] if judge else 1, max_workers=max_workers)
    collector = _FailureCollector()
    dataset = EvaluationDataset.from_list(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = evaluate(
            dataset, metrics=metrics, callbacks=[collector], run_config=run_config,
            raise_exceptions=False, show_progress=show_progress, allow_nest_asyncio=False,
        )
    scores: list[dict[str, float | None]] = []
    reasons: list[dict[str, str]] = []
    for index, row in enumerate(result.scores):
        sample_scores: dict[str, float | None] = {}
        sample_reasons: dict[str, str] = {}
        for name, metric in zip(metric_names, metrics, strict=True):
            value = row.get(result_key(metric))
            if value is None or (isinstance(value, float) and math.isnan(value)):
                sample_scores[name] = None
                error = collector.failures.get((index, metric.name))
                sample_reasons[name] = describe_failure(error, timeout=timeout) if error else "ragas returned no score (NaN)"
            else:
                sample_scores[name] = float(value)
        scores.append(sample_scores)
        reasons.append(sample_reasons)
    return ScoredSamples(scores=scores, reasons=reasons, metrics=list(metric_names))
