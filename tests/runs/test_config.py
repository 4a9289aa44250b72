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
        ({"kind": "pretrain"}, "kind", "'finetune', 'eval_only' or 'sweep'"),
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


# --- model.base: a known local build, a hub id, or a folder the operator allows.
def test_local_names_must_be_known_builds_and_the_message_lists_them():
    from runs.config import known_local_models

    known = known_local_models()
    assert {"tiny-llama", "smollm2-135m-instruct"} <= set(known)
    for bad in ["local:../../etc", "local:/etc/passwd", "local:..", "local:", "local:tiny-llama/../x", "local:no-such-build"]:
        errors = errors_of(finetune_config(model={"base": bad}))
        assert set(errors) == {"model.base"}, (bad, errors)
        assert errors["model.base"] == f"unknown local model {bad!r}; known: {', '.join('local:' + n for n in known)}"
    for name in known:
        assert validate_config(finetune_config(model={"base": f"local:{name}"}), known_datasets=KNOWN)["model"]["base"] == f"local:{name}"


def test_the_known_builds_come_from_training_local_models_or_the_tiny_model_specs(monkeypatch):
    import importlib.util
    import sys

    from runs.config import known_local_models
    from training.tiny_model import SPECS

    if importlib.util.find_spec("training.local_models") is not None:
        from training.local_models import KNOWN_LOCAL_MODELS

        assert known_local_models() == tuple(KNOWN_LOCAL_MODELS)
    monkeypatch.setitem(sys.modules, "training.local_models", None)  # as if the module were not there: ImportError
    assert known_local_models() == (*SPECS, "smollm2-135m-instruct")


def test_cached_hub_ids_are_accepted_and_paths_refused_while_no_folder_is_allowed(settings, hf_cache):
    settings.MLOPS_MODEL_PATHS = []
    for hub_id in ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"]:
        hf_cache(hub_id)  # the hub is offline in tests: a hub id must be in the cache (tests/runs/test_model_refs.py)
        assert validate_config(finetune_config(model={"base": hub_id}), known_datasets=KNOWN)["model"]["base"] == hub_id
    # configs/ exists relative to the working directory: hub-shaped, but from_pretrained would read it from disk.
    for path in ["/etc/passwd", "/models/my-llama", "./var/models/tiny-llama", "../x", "..", "~/models", "configs", "a b"]:
        errors = errors_of(finetune_config(model={"base": path}))
        assert set(errors) == {"model.base"}, (path, errors)
        assert "MLOPS_MODEL_PATHS" in errors["model.base"] or "absolute" in errors["model.base"], (path, errors)


def test_paths_are_accepted_only_under_an_allowed_folder_after_resolving_dots_and_symlinks(settings, tmp_path):
    from runs.config import check_model_reference

    allowed, outside = tmp_path / "models", tmp_path / "elsewhere"
    (allowed / "my-llama").mkdir(parents=True)
    outside.mkdir()
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    settings.MLOPS_MODEL_PATHS = [str(allowed)]
    for good in [allowed / "my-llama", allowed, f"{allowed}/my-llama/../my-llama", allowed / "not-built-yet"]:
        assert validate_config(finetune_config(model={"base": str(good)}), known_datasets=KNOWN)["model"]["base"] == str(good)
    for bad in [outside, f"{allowed}/../elsewhere", allowed / "escape", allowed / "escape" / "x", f"{allowed}-sibling/x", "/etc/passwd"]:
        errors = errors_of(finetune_config(model={"base": str(bad)}))
        assert errors == {"model.base": "this path is outside the folders the operator allows for models (MLOPS_MODEL_PATHS)"}, bad
    # The worker's check is the same function, with the worker's own setting.
    with pytest.raises(ValueError, match="MLOPS_MODEL_PATHS"):
        check_model_reference(str(allowed / "my-llama"), allowed_dirs=[])
    check_model_reference(str(allowed / "my-llama"), allowed_dirs=[allowed])
    with pytest.raises(ValueError, match="unknown local model"):
        check_model_reference("local:../../etc")


def test_model_paths_setting_is_read_colon_separated_from_the_environment(monkeypatch):
    import importlib

    import mlops_site.settings as site_settings

    monkeypatch.setenv("MLOPS_MODEL_PATHS", "/models:/srv/llms/ :")
    monkeypatch.setenv("MLOPS_JUDGE_URL_PREFIXES", "http://vllm:8000/v1, https://api.openai.com/v1")
    try:
        reloaded = importlib.reload(site_settings)
        assert reloaded.MLOPS_MODEL_PATHS == ["/models", "/srv/llms/"]
        assert reloaded.MLOPS_JUDGE_URL_PREFIXES == ["http://vllm:8000/v1", "https://api.openai.com/v1"]
    finally:
        monkeypatch.delenv("MLOPS_MODEL_PATHS")
        monkeypatch.delenv("MLOPS_JUDGE_URL_PREFIXES")
        importlib.reload(site_settings)
    assert site_settings.MLOPS_MODEL_PATHS == [] and site_settings.MLOPS_JUDGE_URL_PREFIXES == []  # empty by default


# --- evaluation.judge.base_url: no credentials in it; the operator's prefixes when set.
def judge_config(base_url):
    return eval_only_config(evaluation={"answers": "dataset", "metrics": ["faithfulness"], "judge": {"base_url": base_url, "model": "judge"}})


def test_judge_urls_with_credentials_are_refused():
    errors = errors_of(judge_config("http://user:secret@judge.example/v1"))
    assert errors == {"evaluation.judge.base_url": "must not carry credentials (user:password@); name the key's variable in api_key_env"}


def test_judge_urls_are_limited_to_the_operators_prefixes_when_set(settings):
    settings.MLOPS_JUDGE_URL_PREFIXES = []
    validate_config(judge_config("http://169.254.169.254/latest"), known_datasets=KNOWN)  # no list: any http(s) endpoint
    settings.MLOPS_JUDGE_URL_PREFIXES = ["http://vllm:8000/v1", "https://api.openai.com/v1/"]
    for good in ["http://vllm:8000/v1", "http://VLLM:8000/v1/", "http://vllm:8000/v1/chat", "https://api.openai.com/v1"]:
        validate_config(judge_config(good), known_datasets=KNOWN)
    for bad in ["http://vllm:8000/v10", "http://vllm:8000.evil.example/v1", "http://vllm:8001/v1", "https://vllm:8000/v1",
                "http://vllm:8000/", "http://169.254.169.254/latest", "http://vllm:8000@evil.example/v1", "http://evil.example/?http://vllm:8000/v1"]:
        errors = errors_of(judge_config(bad))
        assert set(errors) == {"evaluation.judge.base_url"}, (bad, errors)
        assert any(why in errors["evaluation.judge.base_url"] for why in ("MLOPS_JUDGE_URL_PREFIXES", "credentials", "not a valid URL")), (bad, errors)
