"""The eval-only kind (runs/kinds/eval_only.py): its graphs, config rules and what its pages show."""

from __future__ import annotations

import pytest

from runs.config import ConfigError, validate_config
from runs.kinds import kind_named
from runs.pipeline import drive_inline, inline_foreground
from runs.services import run_create
from tests.runs.factories import eval_only_config

KIND = kind_named("eval_only")


def test_its_graph_generates_then_scores_or_scores_the_stored_answers():
    generated = KIND.graph(validate_config(eval_only_config(evaluation={"answers": "generate"})))
    assert [(s.name, s.queue, s.after) for s in generated.steps] == [("generate", "gpu", ()), ("score", "cpu", ("generate",))]
    stored = KIND.graph(validate_config(eval_only_config()))
    assert [(s.name, s.queue, s.after) for s in stored.steps] == [("score", "cpu", ())]
    assert KIND.path == ("pending", "evaluating", "completed")


def test_it_refuses_the_sections_of_a_fine_tune_naming_them():
    for section, value in (("training", {}), ("promotion", {})):
        with pytest.raises(ConfigError) as refused:
            validate_config(eval_only_config(**{section: value}))
        assert refused.value.errors[0]["field"] == section and "applies to kind finetune only" in refused.value.errors[0]["message"]


def test_the_run_is_about_its_stored_answers_or_the_base_model():
    stored, generated = validate_config(eval_only_config()), validate_config(eval_only_config(evaluation={"answers": "generate"}))
    assert (KIND.main_variant(stored), KIND.main_variant(generated)) == ("dataset", "base")
    assert (KIND.generated_variants(stored), KIND.generated_variants(generated)) == ([], ["base"])
    assert KIND.model_label(stored, "local:tiny-llama") == "stored answers"
    assert not KIND.config_applies("model.base", stored) and KIND.config_applies("model.base", generated)
    assert not KIND.config_applies("training.epochs", generated) and KIND.config_applies("evaluation.metrics", stored)
    assert KIND.shows() == {}


@pytest.mark.django_db(transaction=True)
def test_a_run_scores_the_stored_answers_in_one_cpu_job(user):
    with inline_foreground():
        run = run_create(config=eval_only_config(), owner=user)
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "completed" and list(run.jobs.values_list("step", "queue", "state")) == [("score", "cpu", "done")]
    assert run.main_variant == "dataset" and run.results.filter(variant="dataset").count() == 2
