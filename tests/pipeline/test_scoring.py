"""Scores are what ragas computes; failures are 'not measured' with a reason."""

import asyncio
import math

import pytest

from evaluation.metric_names import NON_JUDGE_METRICS
from evaluation.scoring import Sample, score_samples
from tests.judge_server import JudgeServer

SAMPLES = [
    Sample(
        question="What does mitochondria produce?",
        contexts=["Mitochondria produce most of the cell's ATP through oxidative phosphorylation.", "The nucleus stores DNA."],
        reference_contexts=["Mitochondria produce most of the cell's ATP through oxidative phosphorylation."],
        ground_truth="Mitochondria produce ATP, the cell's energy currency.",
        answer="They produce ATP through oxidative phosphorylation.",
    ),
    Sample(
        question="Who wrote the Federalist Papers?",
        contexts=["The Federalist Papers were written by Alexander Hamilton, James Madison and John Jay."],
        ground_truth="Alexander Hamilton, James Madison and John Jay.",
        answer="Alexander Hamilton, James Madison and John Jay.",
    ),
    Sample(
        question="What is the boiling point of water at sea level?",
        contexts=["At sea level water boils at 100 degrees Celsius."],
        ground_truth="100 degrees Celsius.",
        answer="It boils at 90 degrees.",
    ),
]


# The metric names -> the ragas 0.4 class of that meaning, by ragas' own
# public name: written out here, not read from evaluation/metrics.py under test.
RAGAS_CLASS_OF = {
    "semantic_similarity": "SemanticSimilarity",
    "rouge_score": "RougeScore",
    "bleu_score": "BleuScore",
    "non_llm_context_precision": "NonLLMContextPrecisionWithReference",
    "non_llm_context_recall": "NonLLMContextRecall",
    "exact_match": "ExactMatch",
    "string_presence": "StringPresence",
}
# The same three samples as ragas samples, built by hand (not by Sample.to_ragas()):
# a row without reference_contexts uses its ground truth as the reference passage (README).
RAGAS_SAMPLES = [
    {
        "user_input": "What does mitochondria produce?",
        "retrieved_contexts": ["Mitochondria produce most of the cell's ATP through oxidative phosphorylation.", "The nucleus stores DNA."],
        "reference_contexts": ["Mitochondria produce most of the cell's ATP through oxidative phosphorylation."],
        "response": "They produce ATP through oxidative phosphorylation.",
        "reference": "Mitochondria produce ATP, the cell's energy currency.",
    },
    {
        "user_input": "Who wrote the Federalist Papers?",
        "retrieved_contexts": ["The Federalist Papers were written by Alexander Hamilton, James Madison and John Jay."],
        "reference_contexts": ["Alexander Hamilton, James Madison and John Jay."],
        "response": "Alexander Hamilton, James Madison and John Jay.",
        "reference": "Alexander Hamilton, James Madison and John Jay.",
    },
    {
        "user_input": "What is the boiling point of water at sea level?",
        "retrieved_contexts": ["At sea level water boils at 100 degrees Celsius."],
        "reference_contexts": ["100 degrees Celsius."],
        "response": "It boils at 90 degrees.",
        "reference": "100 degrees Celsius.",
    },
    {  # one of two reference passages retrieved: context precision and recall part ways
        "user_input": "Which planets are gas giants?",
        "retrieved_contexts": ["Jupiter is a gas giant.", "Mars is a rocky planet."],
        "reference_contexts": ["Jupiter is a gas giant.", "Saturn, the ringed sixth planet, is mostly hydrogen and helium too."],
        "response": "Jupiter and Saturn. Both are mostly hydrogen.",  # holds the reference, is not it
        "reference": "Jupiter and Saturn.",
    },
]
DIRECT_SAMPLES = [
    *SAMPLES,
    Sample(
        question="Which planets are gas giants?",
        contexts=["Jupiter is a gas giant.", "Mars is a rocky planet."],
        reference_contexts=["Jupiter is a gas giant.", "Saturn, the ringed sixth planet, is mostly hydrogen and helium too."],
        ground_truth="Jupiter and Saturn.",
        answer="Jupiter and Saturn. Both are mostly hydrogen.",
    ),
]


def direct_ragas_scores() -> dict[str, list[float]]:
    """Each metric's score on each hand-built sample, from ragas' class called directly."""
    import warnings

    import ragas.metrics
    from ragas.dataset_schema import SingleTurnSample
    from ragas.run_config import RunConfig

    from evaluation.metrics import packaged_embeddings  # the shipped embedding model, for SemanticSimilarity

    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, class_name in RAGAS_CLASS_OF.items():
            metric_class = getattr(ragas.metrics, class_name)
            metric = metric_class(embeddings=packaged_embeddings()) if class_name == "SemanticSimilarity" else metric_class()
            metric.init(RunConfig())  # what ragas.evaluate() does first
            scores[name] = [asyncio.run(metric.single_turn_ascore(SingleTurnSample(**sample))) for sample in RAGAS_SAMPLES]
    return scores


def test_each_non_judge_metric_equals_ragas_called_directly():
    assert set(RAGAS_CLASS_OF) == set(NON_JUDGE_METRICS)
    direct = direct_ragas_scores()
    scored = score_samples(DIRECT_SAMPLES, list(NON_JUDGE_METRICS))
    for name, expected in direct.items():
        ours = [row[name] for row in scored.scores]
        assert ours == pytest.approx(expected, abs=1e-9), (name, ours, expected)
    assert all(not reasons for reasons in scored.reasons)
    # The samples tell the metrics apart, so a name mapped to the wrong class fails above.
    for a in direct:
        for b in direct:
            if a < b:
                assert direct[a] != pytest.approx(direct[b], abs=1e-6), (a, b, direct[a])
    assert direct["exact_match"] == [0.0, 1.0, 0.0, 0.0]


def test_aggregates_are_means_over_measured_samples_only():
    scored = score_samples(SAMPLES, ["rouge_score"])
    scored.scores[0]["rouge_score"] = None
    scored.reasons[0]["rouge_score"] = "timeout"
    aggregate = scored.aggregate()["rouge_score"]
    assert aggregate["n_scored"] == 2 and aggregate["n_failed"] == 1
    assert aggregate["value"] == pytest.approx((scored.scores[1]["rouge_score"] + scored.scores[2]["rouge_score"]) / 2)
    assert aggregate["failure_reasons"] == {"timeout": 1}


def judge(base_url: str, timeout: float = 20, retries: int = 0) -> dict:
    return {"base_url": base_url, "model": "test-judge", "api_key_env": "TEST_JUDGE_KEY", "timeout": timeout, "max_retries": retries}


def test_a_local_judge_drives_faithfulness_and_answer_relevancy_through_ragas():
    with JudgeServer() as server:
        scored = score_samples(SAMPLES[:2], ["faithfulness", "answer_relevancy", "rouge_score"], judge=judge(server.base_url), judge_api_key="test-key")
    assert server.requests > 0
    assert [s["faithfulness"] for s in scored.scores] == [1.0, 1.0]
    assert all(s["answer_relevancy"] is not None and 0 <= s["answer_relevancy"] <= 1 for s in scored.scores)


def test_an_unreachable_judge_is_not_measured_with_that_reason():
    from tests.conftest import free_port

    scored = score_samples(SAMPLES[:2], ["faithfulness", "rouge_score"], judge=judge(f"http://127.0.0.1:{free_port()}/v1"))
    assert [s["faithfulness"] for s in scored.scores] == [None, None]
    assert {r["faithfulness"] for r in scored.reasons} == {"judge unreachable"}
    assert all(s["rouge_score"] is not None for s in scored.scores)  # other metrics unaffected
    aggregate = scored.aggregate()["faithfulness"]
    assert aggregate == {"value": None, "n_scored": 0, "n_failed": 2, "failure_reasons": {"judge unreachable": 2}}


def test_a_malformed_judge_answer_is_a_parse_error():
    with JudgeServer(mode="malformed") as server:
        scored = score_samples(SAMPLES[:1], ["faithfulness"], judge=judge(server.base_url))
    assert scored.scores[0]["faithfulness"] is None
    assert scored.reasons[0]["faithfulness"].startswith("parse error")


def test_a_slow_judge_times_out():
    with JudgeServer(mode="slow", delay=4) as server:
        scored = score_samples(SAMPLES[:1], ["faithfulness"], judge=judge(server.base_url, timeout=1))
    assert scored.scores[0]["faithfulness"] is None
    assert scored.reasons[0]["faithfulness"].startswith("timeout")


def test_no_nan_ever_leaves_the_scorer():
    scored = score_samples(SAMPLES, ["non_llm_context_precision", "bleu_score"])
    for row in scored.scores:
        for value in row.values():
            assert value is None or not math.isnan(value)
