"""Embeddings computed once per distinct text, in batches, handed to ragas.

ragas' SemanticSimilarity (and AnswerCorrectness' similarity half, and
AnswerRelevancy's question) asks the embedding model for one text at a time:
143 samples are 286 forward passes of batch 1, and that was 95% of scoring.

`precomputed_embeddings()` embeds, before ragas runs, every text those metrics
will ask for, and gives ragas an embeddings object that answers each one-text
call from those vectors. The scores must stay the numbers ragas computes from
the vectors `encode([text])` gives, to the last bit, so:

- texts are batched only with texts of the same token count: no batch holds
  padding (a padded batch changes the embeddings by up to 1e-7, and the scores
  with them);
- the encoder's result for a row must not depend on how many unpadded rows
  share its batch. On CPU that holds for most shapes, not all: MKL takes another
  matrix-multiply path for a few small row counts (measured here: texts of
  1-3, 5-7 or 9-11 tokens batched give other bits than alone). So each batch
  shape (token count, batch size, torch threads) is checked the first time a
  process meets it: the batch's first text is embedded alone too and compared
  bit for bit. A shape that differs is remembered, and its texts are embedded
  one at a time, as ragas would.

Anything not prepared (several texts in one call, a text not seen before: the
questions AnswerRelevancy generates) goes to the wrapped embeddings unchanged,
exactly as it would without this layer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ragas.embeddings.base import BaseRagasEmbeddings
from ragas.run_config import RunConfig

log = logging.getLogger(__name__)

# The sample fields (ragas names) each metric embeds one at a time, and whether
# ragas replaces an empty text by " " first (ragas.metrics._answer_similarity).
EMBEDDED_FIELDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "semantic_similarity": (("reference", True), ("response", True)),
    "answer_correctness": (("reference", True), ("response", True)),
    "answer_relevancy": (("user_input", False),),
}


def texts_to_embed(rows: Iterable[dict[str, Any]], metric_names: Iterable[str]) -> list[str]:
    """The distinct texts, first-seen order, that these metrics will embed one by one for these ragas rows."""
    fields = {f for name in metric_names for f in EMBEDDED_FIELDS.get(name, ())}
    seen: dict[str, None] = {}
    for row in rows:
        for key, blank_to_space in sorted(fields):
            text = row.get(key)
            if text is None:
                continue
            seen.setdefault((text or " ") if blank_to_space else text, None)
    return list(seen)


class PrecomputedEmbeddings(BaseRagasEmbeddings):
    """ragas embeddings answering one-text calls from prepared vectors; the rest go to `inner`."""

    def __init__(self, inner: BaseRagasEmbeddings, vectors: dict[str, list[float]]) -> None:
        super().__init__()
        self.inner = inner
        self.vectors = vectors
        self.run_config = getattr(inner, "run_config", None) or RunConfig()
        self.hits = 0
        self.passed_through = 0

    def set_run_config(self, run_config: RunConfig) -> None:
        self.run_config = run_config
        if hasattr(self.inner, "set_run_config"):
            self.inner.set_run_config(run_config)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        texts = list(texts)
        if len(texts) == 1 and texts[0] in self.vectors:
            self.hits += 1
            return [list(self.vectors[texts[0]])]
        self.passed_through += 1
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed_documents(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return self.embed_query(text)


def token_counts(inner: Any, texts: list[str]) -> list[int]:
    """How many tokens the encoder sees for each text (after its own truncation), from its own preprocessing."""
    features = inner.model.preprocess(texts)
    return [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]


# (token count, batch size, torch threads) -> whether a batch of that shape gives each row the bits it gets alone.
BATCH_INVARIANT: dict[tuple[int, int, int], bool] = {}
BATCH_SIZE = 32  # sentence-transformers' own default: a larger list would be cut into batches of 32 anyway


def embed_unpadded(inner: Any, texts: list[str]) -> dict[str, list[float]]:
    """Each text's embedding, bit for bit what `inner.embed_documents([text])` gives, batched where that is exact."""
    import torch

    by_count: dict[int, list[str]] = defaultdict(list)
    for text, count in zip(texts, token_counts(inner, texts), strict=True):
        by_count[count].append(text)
    vectors: dict[str, list[float]] = {}
    for count, group in by_count.items():
        for start in range(0, len(group), BATCH_SIZE):
            batch = group[start : start + BATCH_SIZE]
            shape = (count, len(batch), torch.get_num_threads())
            if len(batch) > 1 and BATCH_INVARIANT.get(shape, True):
                batched = inner.embed_documents(batch)
                if shape not in BATCH_INVARIANT:
                    alone = inner.embed_documents(batch[:1])[0]
                    BATCH_INVARIANT[shape] = alone == batched[0]
                    if not BATCH_INVARIANT[shape]:
                        log.info("embedding batches of %d x %d tokens differ from one text alone here: one at a time", len(batch), count)
                        vectors[batch[0]] = alone
                        batch = batch[1:]
                if BATCH_INVARIANT[shape]:
                    vectors.update(zip(batch, batched, strict=True))
                    continue
            for text in batch:
                vectors[text] = inner.embed_documents([text])[0]
    return vectors


def precomputed_embeddings(inner: Any, texts: list[str]) -> Any:
    """`inner` behind a PrecomputedEmbeddings holding the vectors of `texts` (each distinct text embedded once).

    `inner` is a sentence-transformers based ragas embeddings object (evaluation.metrics.packaged_embeddings);
    anything else is returned as it is.
    """
    texts = list(dict.fromkeys(texts))
    if not texts or not hasattr(inner, "model"):
        return inner
    return PrecomputedEmbeddings(inner, embed_unpadded(inner, texts))
