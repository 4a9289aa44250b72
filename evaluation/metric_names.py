"""The metric names (docs/ARCHITECTURE.md, "Contracts"), without importing ragas (cheap for validation and pages).

evaluation.metrics maps each name to the ragas 0.4 metric of that meaning.
"""

NON_JUDGE_METRICS: dict[str, str] = {
    "semantic_similarity": "Cosine similarity of answer and ground truth embeddings (all-MiniLM-L6-v2).",
    "rouge_score": "ROUGE-L F1 of answer against ground truth.",
    "bleu_score": "BLEU (sacrebleu) of answer against ground truth.",
    "non_llm_context_precision": "Share of retrieved contexts that match a reference context (string distance).",
    "non_llm_context_recall": "Share of reference contexts found among the retrieved ones (string distance).",
    "exact_match": "1 when the answer equals the ground truth exactly, else 0.",
    "string_presence": "1 when the ground truth appears inside the answer, else 0.",
}

JUDGE_METRICS: dict[str, str] = {
    "faithfulness": "Share of the answer's claims supported by the contexts (LLM judge).",
    "answer_relevancy": "How well the answer addresses the question (LLM judge + embeddings).",
    "context_precision": "Whether relevant contexts are ranked first (LLM judge).",
    "context_recall": "Share of the ground truth supported by the contexts (LLM judge).",
    "answer_correctness": "Factual and semantic agreement with the ground truth (LLM judge + embeddings).",
    "factual_correctness": "Claim-level F1 of answer against ground truth (LLM judge).",
}

ALL_METRICS: dict[str, str] = {**NON_JUDGE_METRICS, **JUDGE_METRICS}

DEFAULT_METRICS = ["semantic_similarity", "rouge_score", "non_llm_context_precision", "non_llm_context_recall"]


def needs_judge(metric: str) -> bool:
    return metric in JUDGE_METRICS

# Metrics of the retrieved contexts, not of the answer: a fine-tune of the generator cannot change them.
RETRIEVAL_METRICS = frozenset({"non_llm_context_precision", "non_llm_context_recall", "context_precision", "context_recall"})
