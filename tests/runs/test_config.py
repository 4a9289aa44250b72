import pytest

from runs.config import ConfigError, parse_yaml, validate_config

from .factories import eval_only_config, finetune_config

KNOWN = {"rag_qa_train": "train", "ragas_eval": "eval"}


def errors_of(config, known=KNOWN):
    with pytest.raises(ConfigError) as caught:
        validate_config(config, known_datasets=known)
    return {e["field"]: e["message"] for e in caught.value.errors}


def test_defaults_are_filled_in():
    config = validate_config({"name": "x", "kind": "finetune", "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]}}, known_datasets=KNOWN)
    assert config["training"]["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
    assert config["evaluation"]["metrics"] == ["semantic_similarity", "rouge_score", "non_llm_context_precision", "non_llm_context_recall"]
    assert config["model"]["base"] == "local:tiny-llama"


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"training": {"epochs": 0}}, "training.epochs", "greater than or equal to 1"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate", "greater than 0"),
        ({"training": {"batch_size": "eight"}}, "training.batch_size", "valid integer"),
        ({"training": {"lora": {"r": 100000}}}, "training.lora.r", "less than or equal to 256"),
        ({"training": {"lora": {"rank": 8}}}, "training.lora.rank", "unknown key"),
        ({"kind": "pretrain"}, "kind", "'finetune' or 'eval_only'"),
        ({"evaluation": {"metrics": ["bleu", "rouge_score"]}}, "evaluation.metrics", "unknown metric(s) bleu"),
        ({"evaluation": {"metrics": ["faithfulness"]}}, "evaluation", "need an LLM judge"),
        ({"evaluation": {"answers": "dataset"}}, "evaluation.answers", "finetune run scores generated answers"),
        ({"datasets": {"train": [], "eval": ["ragas_eval"]}}, "datasets.train", "at least one train dataset"),
        ({"evaluation": {"judge": {"base_url": "ftp://x", "model": "m"}}}, "evaluation.judge.base_url", "http(s) URL"),
        ({"evaluation": {"judge": {"base_url": "http://x/v1", "model": "m", "api_key_env": "sk-123 secret"}}}, "evaluation.judge.api_key_env", "NAME of an environment variable"),
    ],
)
def test_it_names_the_field(change, field, fragment):
    errors = errors_of(finetune_config(**change))
    assert field in errors, errors
    assert fragment in errors[field]


def test_unknown_and_mistyped_datasets_are_refused():
    errors = errors_of(finetune_config(datasets={"train": ["nope"], "eval": ["rag_qa_train"]}))
    assert errors == {"datasets.train[0]": "unknown dataset 'nope'", "datasets.eval[0]": "dataset 'rag_qa_train' is a train dataset, not eval"}


def test_eval_only_refuses_training_settings():
    assert "training" in errors_of(eval_only_config(training={"epochs": 1}))


def test_judge_metrics_are_accepted_with_a_judge():
    config = validate_config(
        eval_only_config(evaluation={"answers": "dataset", "metrics": ["faithfulness"], "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "judge"}}),
        known_datasets=KNOWN,
    )
    assert config["evaluation"]["judge"]["api_key_env"] == "OPENAI_API_KEY"


def test_yaml_errors_name_the_line():
    with pytest.raises(ConfigError, match="line 2"):
        parse_yaml("name: x\n\tkind: finetune\n")


def test_yaml_alias_bombs_are_refused():
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    with pytest.raises(ConfigError, match="aliases"):
        parse_yaml(bomb)


def test_the_shipped_configs_are_valid():
    from pathlib import Path

    from django.conf import settings

    for path in sorted(Path(settings.BASE_DIR, "configs").glob("*.yaml")):
        validate_config(parse_yaml(path.read_text()), known_datasets={
            "rag_qa_train": "train", "medical_qa_train": "train", "legal_qa_train": "train",
            "ragas_eval": "eval", "medical_ragas_eval": "eval", "legal_ragas_eval": "eval",
        })
