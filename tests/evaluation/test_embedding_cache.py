"""Embeddings computed beforehand, once per text, give the scores ragas computes one text at a time."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

from evaluation import embedding_cache
from evaluation.embedding_cache import PrecomputedEmbeddings, precomputed_embeddings, texts_to_embed
from evaluation.metrics import build_metrics, packaged_embeddings, result_key
from evaluation.scoring import Sample, score_samples

# Answers and ground truths of equal token counts (so batches of several form), one repeated
# ground truth, one empty answer (ragas embeds " " for it) and one much longer text.
SAMPLES = [
    Sample(question="What do mitochondria produce?", contexts=["Mitochondria produce ATP."],
           ground_truth="Mitochondria produce ATP.", answer="They produce ATP."),
    Sample(question="What do chloroplasts produce?", contexts=["Chloroplasts produce glucose."],
           ground_truth="Chloroplasts produce glucose.", answer="They produce sugar."),
    Sample(question="What do ribosomes make?", contexts=["Ribosomes make proteins."],
           ground_truth="Mitochondria produce ATP.", answer="Proteins."),
    Sample(question="Who wrote the Federalist Papers?", contexts=["Hamilton, Madison and Jay wrote them."],
           ground_truth="Alexander Hamilton, James Madison and John Jay.", answer=""),
    Sample(question="Why is the sky blue?", contexts=["Rayleigh scattering."],
           ground_truth="Sunlight is scattered by the molecules of the air, and blue light, with its shorter "
                        "wavelength, is scattered far more than red light, so the sky looks blue from every direction.",
           answer="Because of Rayleigh scattering of sunlight."),
]
METRICS = ["semantic_similarity", "rouge_score"]


def uncached_scores(samples: list[Sample]) -> list[dict[str, float]]:
    """ragas.evaluate with the plain embeddings: every text embedded alone, when ragas asks."""
    from ragas import evaluate
    from ragas.dataset_schema import EvaluationDataset

    metrics = build_metrics(METRICS, embeddings=packaged_embeddings())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = evaluate(EvaluationDataset.from_list([s.to_ragas() for s in samples]), metrics=metrics, show_progress=False)
    return [{name: row[result_key(m)] for name, m in zip(METRICS, metrics, strict=True)} for row in result.scores]


@pytest.fixture
def encoded(monkeypatch) -> list[list[str]]:
    """Every list of texts the sentence-transformers model is asked to encode, in order; no batch shape known yet."""
    monkeypatch.setattr(embedding_cache, "BATCH_INVARIANT", {})
    model = packaged_embeddings().model
    calls: list[list[str]] = []
    original = model.encode

    def recording_encode(sentences, *args, **kwargs):
        calls.append(list(sentences))
        return original(sentences, *args, **kwargs)

    monkeypatch.setattr(model, "encode", recording_encode)
    return calls


def test_the_cached_path_gives_the_scores_of_the_uncached_one(encoded):
    expected = uncached_scores(SAMPLES)
    for _ in range(2):  # shapes unknown, then known
        scored = score_samples(SAMPLES, METRICS)
        for ours, theirs in zip(scored.scores, expected, strict=True):
            for name in METRICS:
                assert ours[name] == pytest.approx(theirs[name], abs=1e-9, rel=0), (name, ours, theirs)
        # Not merely close: the vectors are the same to the last bit, so are the scores.
        assert [s["semantic_similarity"] for s in scored.scores] == [e["semantic_similarity"] for e in expected]


def test_each_distinct_text_is_embedded_once_in_unpadded_batches(encoded):
    distinct = texts_to_embed([s.to_ragas() for s in SAMPLES], METRICS)
    assert len(distinct) == 9  # 10 texts, one ground truth twice; the empty answer is " "
    assert " " in distinct
    tokens = packaged_embeddings().model.preprocess

    score_samples(SAMPLES, METRICS)  # meets each batch shape for the first time: checks it
    first = Counter(text for call in encoded for text in call)
    assert set(first) == set(distinct)
    checked = list(embedding_cache.BATCH_INVARIANT)
    assert checked and all(batch > 1 for _, batch, _ in checked)
    # Each text once, plus for each newly met shape one batch and one text of it alone.
    assert sum(first.values()) == len(distinct) + sum(1 if ok else batch for (_, batch, _), ok in embedding_cache.BATCH_INVARIANT.items())

    encoded.clear()
    score_samples(SAMPLES, METRICS)  # shapes known: each distinct text embedded exactly once
    again = Counter(text for call in encoded for text in call)
    assert again == Counter(distinct)
    for call in encoded:
        assert len({int(tokens([text])["attention_mask"].sum()) for text in call}) == 1  # no padding in any batch
    invariant = {count for (count, _, _), ok in embedding_cache.BATCH_INVARIANT.items() if ok}
    assert any(len(call) > 1 for call in encoded) == bool(invariant)


def test_ragas_asks_nothing_of_the_model_once_the_texts_are_prepared(encoded):
    embeddings = precomputed_embeddings(packaged_embeddings(), texts_to_embed([s.to_ragas() for s in SAMPLES], METRICS))
    assert isinstance(embeddings, PrecomputedEmbeddings)
    before = len(encoded)
    metrics = build_metrics(METRICS, embeddings=embeddings)
    from ragas import evaluate
    from ragas.dataset_schema import EvaluationDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        evaluate(EvaluationDataset.from_list([s.to_ragas() for s in SAMPLES]), metrics=metrics, show_progress=False)
    assert len(encoded) == before
    assert embeddings.hits == 2 * len(SAMPLES) and embeddings.passed_through == 0


class FakeInner:
    """Embeddings whose batched vectors differ (or not) from their one-text vectors; every text is 3 tokens."""

    def __init__(self, batch_invariant: bool) -> None:
        self.model = self
        self.batch_invariant = batch_invariant
        self.calls: list[list[str]] = []

    def preprocess(self, texts):
        import torch

        return {"attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}

    def embed_documents(self, texts):
        self.calls.append(list(texts))
        off = 0.0 if self.batch_invariant or len(texts) == 1 else 1e-7
        return [[float(len(t)), 1.0 + off] for t in texts]


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_a_batch_shape_is_used_only_where_it_gives_the_bits_of_one_text_alone(monkeypatch, batch_invariant):
    monkeypatch.setattr(embedding_cache, "BATCH_INVARIANT", {})
    for _ in range(2):
        inner = FakeInner(batch_invariant)
        cached = precomputed_embeddings(inner, ["ab", "cde", "f", "ab"])
        assert cached.vectors == {"ab": [2.0, 1.0], "cde": [3.0, 1.0], "f": [1.0, 1.0]}  # what each gives alone
        if batch_invariant:
            assert inner.calls in ([["ab", "cde", "f"], ["ab"]], [["ab", "cde", "f"]])  # checked the first time only
        else:
            assert inner.calls in ([["ab", "cde", "f"], ["ab"], ["cde"], ["f"]], [["ab"], ["cde"], ["f"]])
    assert list(embedding_cache.BATCH_INVARIANT.values()) == [batch_invariant]


def test_calls_for_several_texts_or_unknown_ones_go_to_the_wrapped_embeddings_unchanged():
    inner = FakeInner(batch_invariant=False)
    cached = PrecomputedEmbeddings(inner, {"ab": [9.0, 9.0]})
    assert cached.embed_query("ab") == [9.0, 9.0]
    assert cached.embed_documents(["ab", "cd"]) == [[2.0, 1.0 + 1e-7], [2.0, 1.0 + 1e-7]]  # as inner answers two texts
    assert cached.embed_documents(["xyz"]) == [[3.0, 1.0]]
    assert inner.calls == [["ab", "cd"], ["xyz"]]
    assert (cached.hits, cached.passed_through) == (1, 2)
