"""The playground of a completed fine-tune: base and fine-tuned answers, inline and on a real gpu worker.

The run is a real tiny-llama fine-tune (run_pipeline); asked one of its eval rows,
the playground must answer exactly what the run's generate step answered (same
prompt format, budget and generation settings), for both variants.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from runs.models import PipelineRun, SampleResult
from tests.conftest import run_worker_burst

from .factories import finetune_config, make_run

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

CONFIG = finetune_config(
    name="playground-finetune",
    training={"epochs": 1, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 5e-3, "max_steps": 2, "seed": 3},
    evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 8, "batch_size": 1, "compare_base": True},
)


@pytest.fixture
def completed_finetune(tmp_path: Path, tiny_model, user) -> PipelineRun:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    call_command("run_pipeline", str(path))
    run = PipelineRun.objects.get(name=CONFIG["name"])
    assert run.status == "completed", run.logs
    PipelineRun.objects.filter(pk=run.pk).update(owner=user)
    return PipelineRun.objects.get(pk=run.pk)


def stored(run: PipelineRun, variant: str, index: int = 0) -> SampleResult:
    return SampleResult.objects.get(run=run, variant=variant, index=index)


def test_inline_it_answers_an_eval_row_as_the_run_did(completed_finetune, api, client, user):
    from evaluation.playground import forget_loaded_model

    run = completed_finetune
    forget_loaded_model()
    for index in (0, 1):
        row = stored(run, "finetuned", index)
        response = api.post(f"/api/runs/{run.pk}/generate/", {"question": row.question, "contexts": row.contexts}, format="json")
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["finetuned"] == row.answer
        assert body["base"] == stored(run, "base", index).answer
        if index == 0:
            assert body["prompt"] == run.reproducibility["prompt_example"]
        assert "### Question:" in body["prompt"] and row.question in body["prompt"]

    # Typed by hand: no contexts at all is a question too.
    typed = api.post(f"/api/runs/{run.pk}/generate/", {"question": "What is the capital of France?", "contexts": []}, format="json")
    assert typed.status_code == 200 and set(typed.json()) == {"base", "finetuned", "prompt", "base_cut_off", "finetuned_cut_off", "decoding"}
    assert typed.json()["decoding"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8}  # the run's own: greedy, its max_new_tokens

    # The page: the box on the run page, prefilled from an eval row, answered in place (htmx) or as a page.
    client.force_login(user)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="playground"' in page and 'name="sample"' in page
    row = stored(run, "finetuned", 1)
    prefilled = client.get(f"/runs/{run.pk}/playground/", {"sample": row.pk}, HTTP_HX_REQUEST="true")
    assert prefilled.status_code == 200 and row.question in prefilled.content.decode()
    asked = client.post(f"/runs/{run.pk}/playground/", {"question": row.question, "contexts": "\n\n".join(row.contexts)}, HTTP_HX_REQUEST="true")
    html = asked.content.decode()
    assert asked.status_code == 200 and 'id="playground-answers"' in html
    from django.utils.html import escape

    assert f'id="playground-finetuned">{escape(row.answer) or "(empty answer)"}<' in html
    assert f'id="playground-base">{escape(stored(run, "base", 1).answer) or "(empty answer)"}<' in html
    plain = client.post(f"/runs/{run.pk}/playground/", {"question": row.question, "contexts": "\n\n".join(row.contexts)})
    assert plain.status_code == 200 and "<html" in plain.content.decode() and 'id="playground-answers"' in plain.content.decode()


def test_it_refuses_runs_that_are_not_completed_fine_tunes_and_bounds_its_input(api, other_api, user, client):
    pending = make_run(user, status="pending")
    evaluated = make_run(user, kind="eval_only", status="completed")
    for run in (pending, evaluated):
        response = api.post(f"/api/runs/{run.pk}/generate/", {"question": "q", "contexts": ["c"]}, format="json")
        assert response.status_code == 409, response.content
    assert other_api.post(f"/api/runs/{pending.pk}/generate/", {"question": "q", "contexts": []}, format="json").status_code == 404
    completed = make_run(user, status="completed")
    too_long = api.post(f"/api/runs/{completed.pk}/generate/", {"question": "q" * 4001, "contexts": []}, format="json")
    assert too_long.status_code == 400 and "question" in too_long.content.decode()
    too_many = api.post(f"/api/runs/{completed.pk}/generate/", {"question": "q", "contexts": ["c"] * 21}, format="json")
    assert too_many.status_code == 400 and "contexts" in too_many.content.decode()
    assert api.post(f"/api/runs/{completed.pk}/generate/", {"contexts": ["c"]}, format="json").status_code == 400
    # A completed row with no adapter anywhere (no folder here, no MLflow run): 409 with the reason, not a 500.
    orphan = api.post(f"/api/runs/{completed.pk}/generate/", {"question": "q", "contexts": ["c"]}, format="json")
    assert orphan.status_code == 409 and "no fine-tuned adapter" in orphan.json()["detail"], orphan.content
    client.force_login(user)
    assert 'id="playground"' not in client.get(f"/runs/{pending.pk}/").content.decode()
    assert client.get(f"/runs/{pending.pk}/playground/").status_code == 409
    # The run page says why instead of offering a form that cannot answer.
    page = client.get(f"/runs/{completed.pk}/").content.decode()
    assert 'id="playground-unavailable"' in page and "no fine-tuned adapter" in page and 'id="playground-form"' not in page


@pytest.mark.parametrize(("field", "value", "says"), [
    ("temperature", -0.1, "greater than or equal to 0"), ("temperature", 2.5, "less than or equal to 2"), ("temperature", "warm", "valid number"),
    ("top_p", 0, "above 0"), ("top_p", 1.5, "less than or equal to 1"),
    ("max_new_tokens", 0, "greater than or equal to 1"), ("max_new_tokens", 241, "between 1 and 240 for this run"),
    ("max_new_tokens", 5000, "less than or equal to 1024"), ("max_new_tokens", 2.5, "valid integer"),
])
def test_bad_decoding_options_are_refused_naming_the_field(api, client, user, field, value, says):
    # max_seq_length 256: at most 240 new tokens. (An MLflow run id: the page asks only a run with an adapter somewhere.)
    completed = make_run(user, status="completed", mlflow_run_id="0" * 32)
    response = api.post(f"/api/runs/{completed.pk}/generate/", {"question": "q", "contexts": [], field: value}, format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert [e["field"] for e in body["errors"]] == [field] and says in body["detail"], body
    client.force_login(user)
    page = client.post(f"/runs/{completed.pk}/playground/", {"question": "q", "contexts": "", field: value}, HTTP_HX_REQUEST="true")
    assert page.status_code == 200 and f"{field}: " in page.content.decode()


def test_sampling_and_the_token_limit_inline(completed_finetune, api, client, user):
    from evaluation.playground import forget_loaded_model

    run = completed_finetune
    forget_loaded_model()
    row = stored(run, "finetuned", 0)
    question = {"question": row.question, "contexts": row.contexts}
    # One new token: an answer either stopped at once (empty) or was cut off, and says so.
    short = api.post(f"/api/runs/{run.pk}/generate/", {**question, "max_new_tokens": 1}, format="json").json()
    assert short["decoding"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1}
    for variant in ("base", "finetuned"):
        assert short[f"{variant}_cut_off"] is (short[variant] != ""), short
    assert short["finetuned"] and short["finetuned_cut_off"]  # the tiny model never stops after one token on this row
    # The run's own decoding answers as the run did; the cut-off flag is consistent with its token count.
    greedy = api.post(f"/api/runs/{run.pk}/generate/", question, format="json").json()
    assert greedy["finetuned"] == row.answer
    sampled = api.post(f"/api/runs/{run.pk}/generate/", {**question, "temperature": 1.3, "top_p": 0.95, "max_new_tokens": 24}, format="json")
    assert sampled.status_code == 200 and sampled.json()["decoding"] == {"temperature": 1.3, "top_p": 0.95, "max_new_tokens": 24}
    # The page: decoding controls, and a cut-off answer marked as such.
    client.force_login(user)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert all(f'name="{name}"' in page for name in ("temperature", "top_p", "max_new_tokens"))
    asked = client.post(f"/runs/{run.pk}/playground/", {"question": row.question, "contexts": "\n\n".join(row.contexts), "max_new_tokens": "1"},
                        HTTP_HX_REQUEST="true").content.decode()
    assert 'id="playground-finetuned-cut-off"' in asked and "used all 1 new tokens" in asked
    assert "Greedy, at most 1 new tokens" in asked


def test_served_it_is_a_gpu_job_that_the_page_and_the_api_poll(completed_finetune, api, client, user, request, redis_url):
    import django_rq

    run = completed_finetune
    request.getfixturevalue("rq_settings")  # from here on: served mode, jobs on the test Redis
    row = stored(run, "finetuned", 0)
    sent = api.post(f"/api/runs/{run.pk}/generate/", {"question": row.question, "contexts": row.contexts}, format="json")
    assert sent.status_code == 202, sent.content
    body = sent.json()
    job_id = body["job_id"]
    assert job_id.startswith(f"playground-{run.pk}-") and django_rq.get_queue("gpu").job_ids == [job_id]
    assert body["gpu_workers"] == 0 and "No gpu worker is live" in body["message"]
    assert body["poll"].endswith(f"/api/runs/{run.pk}/generate/{job_id}/")
    waiting = api.get(f"/api/runs/{run.pk}/generate/{job_id}/")
    assert waiting.status_code == 202 and waiting.json()["status"] == "queued"

    client.force_login(user)
    asked = client.post(f"/runs/{run.pk}/playground/", {"question": row.question, "contexts": "\n\n".join(row.contexts)}, HTTP_HX_REQUEST="true")
    assert 'id="playground-pending"' in asked.content.decode() and "No gpu worker is live" in asked.content.decode()
    page_job = asked.content.decode().split(f"/runs/{run.pk}/playground/", 1)[1].split("/", 1)[0]
    poll = client.get(f"/runs/{run.pk}/playground/{page_job}/", HTTP_HX_REQUEST="true")
    assert poll.status_code == 200 and "No gpu worker is live" in poll.content.decode()
    # Another run's id in the path does not read this run's job.
    other = make_run(user, status="completed")
    assert api.get(f"/api/runs/{other.pk}/generate/{job_id}/").status_code == 404

    result = run_worker_burst("gpu", redis_url)
    assert result.returncode == 0, result.stderr[-3000:]
    done = api.get(f"/api/runs/{run.pk}/generate/{job_id}/")
    assert done.status_code == 200, done.content
    answers = done.json()
    assert answers["status"] == "finished"
    assert answers["finetuned"] == row.answer and answers["base"] == stored(run, "base", 0).answer
    assert answers["prompt"] == run.reproducibility["prompt_example"]
    final = client.get(f"/runs/{run.pk}/playground/{page_job}/", HTTP_HX_REQUEST="true")
    assert final.status_code == 286 and 'id="playground-answers"' in final.content.decode()


def test_served_without_redis_it_answers_503_and_the_page_says_why(settings, api, client, user):
    import django_rq.queues

    from tests.conftest import free_port

    settings.JOBS_INLINE = False
    settings.RQ_QUEUES = {name: {**conf, "URL": f"redis://127.0.0.1:{free_port()}/0"} for name, conf in settings.RQ_QUEUES.items()}
    getattr(getattr(django_rq.queues, "get_redis_connection", None), "cache_clear", lambda: None)()
    run = make_run(user, status="completed", mlflow_run_id="0" * 32)  # its adapter would be fetched from MLflow by the worker
    response = api.post(f"/api/runs/{run.pk}/generate/", {"question": "q", "contexts": ["c"]}, format="json")
    assert response.status_code == 503 and "gpu queue cannot be reached" in response.json()["detail"]
    client.force_login(user)
    asked = client.post(f"/runs/{run.pk}/playground/", {"question": "q", "contexts": "c"}, HTTP_HX_REQUEST="true")
    assert asked.status_code == 200 and "Redis cannot be reached" in asked.content.decode()
