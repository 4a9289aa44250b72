"""Compare page: every run after the first against the first, paired by eval row (issue 11 §4)."""

import pytest

from datasets_app.models import Dataset
from evaluation.significance import format_interval
from runs import page_data
from runs.models import PipelineRun, RunResult
from runs.services import run_record_samples

from .factories import make_run

pytestmark = pytest.mark.django_db

N = 20
SHA = "a" * 64
# Scores that vary from row to row, and a per-row wobble averaging zero.
BASELINE = [0.2 + 0.02 * i for i in range(N)]
WOBBLE = [0.05 if i % 2 else -0.05 for i in range(N)]


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def scored(owner, scores: dict[str, list[float | None]], *, kind="finetune", sha=SHA, name=None, rows=range(N)):
    """A completed run with hand-made per-sample scores of its main variant on ragas_eval, on the eval rows `rows`
    (a fine-tune's base answers score 0.9 everywhere: pairing them instead would show)."""
    run = make_run(owner, kind=kind, status="completed")
    if name:
        run.name = name
    dataset = Dataset.objects.get(name="ragas_eval")
    run.eval_datasets.set([dataset])
    run.reproducibility = {"datasets": {"ragas_eval": sha}} if sha is not None else {}
    run.save()
    variants = {run.main_variant: scores}
    if kind == "finetune":
        variants["base"] = {metric: [0.9] * len(values) for metric, values in scores.items()}
    samples = []
    for variant, by_metric in variants.items():
        for metric, values in by_metric.items():
            measured = [values[i] for i in rows if values[i] is not None]
            RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric=metric,
                                     value=sum(measured) / len(measured), n_scored=len(measured), n_failed=len(rows) - len(measured))
        for i in rows:
            samples.append({
                "dataset": dataset, "variant": variant, "index": i, "question": f"question {i}", "contexts": ["ctx"],
                "ground_truth": "truth", "answer": f"{variant} answer {i}",
                "scores": {metric: values[i] for metric, values in by_metric.items()}, "reasons": {},
            })
    run_record_samples(run_id=run.pk, samples=samples)
    return run


def compared(*runs):
    ids = [run.pk for run in runs]
    return page_data.compare_data(sorted(page_data.compare_queryset(PipelineRun.objects.filter(pk__in=ids)), key=lambda r: ids.index(r.pk)))


def paired_cell(data, metric, run):
    [row] = [r for r in data["rows"] if r["metric"] == metric]
    return row["cells"][[r.pk for r in data["runs"]].index(run.pk)]


def test_a_clear_shift_is_better_from_the_references_point_of_view(logged_in, user):
    reference = scored(user, {"rouge_score": BASELINE, "exact_match": [0.0] * N})
    shifted = scored(user, {"rouge_score": [b + 0.3 + w for b, w in zip(BASELINE, WOBBLE, strict=True)], "exact_match": [0.0] * N},
                     name="shifted")

    data = compared(reference, shifted)
    assert data["reference"] == reference and data["pairing_refused"] == []
    assert paired_cell(data, "rouge_score", reference)["reference"] and paired_cell(data, "rouge_score", reference)["paired"] is None
    cell = paired_cell(data, "rouge_score", shifted)["paired"]
    assert cell["n_pairs"] == N and cell["delta"] == pytest.approx(0.3)  # finetuned vs finetuned, not vs the 0.9 base answers
    assert 0 < cell["ci_low"] < 0.3 < cell["ci_high"] < 0.4
    assert cell["verdict"] == "better" and cell["p_adjusted"] < 0.05
    assert cell["interval"] == format_interval(cell["delta"], cell["ci_low"], cell["ci_high"])
    same = paired_cell(data, "exact_match", shifted)["paired"]
    assert same["verdict"] == "no significant difference" and same["interval"] == "+0.000 [+0.000, +0.000]"

    page = logged_in.get(f"/compare/?runs={reference.pk},{shifted.pk}").content.decode()
    assert f"− #{reference.pk}, paired by row" in page
    assert cell["interval"] in page
    assert '<div class="significance verdict-better">' in page and "<strong>better</strong>" in page
    assert f"({N} pairs)" in page

    # The other way round the same shift is worse.
    page = logged_in.get(f"/compare/?runs={shifted.pk},{reference.pk}").content.decode()
    assert '<div class="significance verdict-worse">' in page and "<strong>worse</strong>" in page
    assert "-0.300 [" in page


def test_noise_alone_is_no_significant_difference_and_stored_answers_pair_with_a_fine_tune(user):
    reference = scored(user, {"rouge_score": BASELINE})
    noisy = scored(user, {"rouge_score": [b + w for b, w in zip(BASELINE, WOBBLE, strict=True)]}, kind="eval_only")
    cell = paired_cell(compared(reference, noisy), "rouge_score", noisy)["paired"]
    assert cell["n_pairs"] == N and cell["delta"] == pytest.approx(0.0, abs=1e-12)
    assert cell["ci_low"] < 0 < cell["ci_high"] and cell["verdict"] == "no significant difference"


def test_rows_only_one_run_measured_are_excluded_and_few_pairs_get_no_verdict(user):
    reference = scored(user, {"rouge_score": [None if i >= 5 else v for i, v in enumerate(BASELINE)]})
    other = scored(user, {"rouge_score": [v + 0.3 for v in BASELINE]})
    cell = paired_cell(compared(reference, other), "rouge_score", other)["paired"]
    assert (cell["n_pairs"], cell["n_excluded"]) == (5, N - 5)
    assert cell["verdict"] == "too few pairs" and cell["p_adjusted"] is None


def test_a_different_dataset_sha256_is_refused_naming_the_dataset(logged_in, user):
    reference = scored(user, {"rouge_score": BASELINE})
    same = scored(user, {"rouge_score": [v + 0.3 for v in BASELINE]}, name="same-file")
    changed = scored(user, {"rouge_score": [v + 0.3 for v in BASELINE]}, sha="b" * 64, name="changed-file")

    data = compared(reference, same, changed)
    assert paired_cell(data, "rouge_score", same)["paired"]["verdict"] == "better"
    refused = paired_cell(data, "rouge_score", changed)
    assert refused["refused"] and refused["paired"] is None
    [message] = data["pairing_refused"]
    assert message.startswith(f"#{changed.pk} changed-file is not paired with #{reference.pk}") and "ragas_eval" in message

    page = logged_in.get(f"/compare/?runs={reference.pk},{same.pk},{changed.pk}").content.decode()
    assert f"#{changed.pk} changed-file is not paired with #{reference.pk} {reference.name} on ragas_eval: they scored different versions of ragas_eval" in page
    assert "not paired: different ragas_eval" in page
    assert page.count("<strong>better</strong>") == 1


def test_a_record_without_the_dataset_pairs_unchecked_and_says_so(logged_in, user):
    reference = scored(user, {"rouge_score": BASELINE})
    unrecorded = scored(user, {"rouge_score": [v + 0.3 for v in BASELINE]}, sha=None)
    data = compared(reference, unrecorded)
    assert paired_cell(data, "rouge_score", unrecorded)["paired"]["verdict"] == "better"
    [note] = data["pairing_unchecked"]
    assert note.startswith(f"ragas_eval: the reproducibility record of #{unrecorded.pk} has no sha256")
    assert note in logged_in.get(f"/compare/?runs={reference.pk},{unrecorded.pk}").content.decode()


def test_a_single_run_has_no_paired_row(logged_in, user):
    run = scored(user, {"rouge_score": BASELINE})
    data = compared(run)
    assert data["reference"] is None and not any(row["has_paired"] for row in data["rows"])
    assert "paired by row" not in logged_in.get(f"/compare/?runs={run.pk}").content.decode()


def test_the_reference_is_the_first_ticked_or_the_one_chosen_and_a_bad_choice_names_ref(logged_in, user):
    low = scored(user, {"rouge_score": BASELINE}, name="low")
    high = scored(user, {"rouge_score": [b + 0.3 + w for b, w in zip(BASELINE, WOBBLE, strict=True)]}, name="high")
    # the dashboard sends the boxes in page order (newest first) and, from app.js, the order they were ticked as `runs`
    page = logged_in.get(f"/compare/?runs={low.pk},{high.pk}&run={high.pk}&run={low.pk}").content.decode()
    assert f"− #{low.pk}, paired by row" in page and "<strong>better</strong>" in page
    assert f'<option value="{low.pk}" selected>' in page
    # chosen on the page: `ref`, the tick order kept for the next choice
    page = logged_in.get(f"/compare/?runs={low.pk},{high.pk}&ref={high.pk}").content.decode()
    assert f"− #{high.pk}, paired by row" in page and "<strong>worse</strong>" in page
    assert f'name="runs" value="{low.pk},{high.pk}"' in page
    response = logged_in.get(f"/compare/?runs={low.pk},{high.pk}&ref=99999")
    assert response.status_code == 400
    assert f"ref: &#x27;99999&#x27; is not one of the compared runs (#{low.pk}, #{high.pk})" in response.content.decode()
    assert logged_in.get(f"/compare/?runs={low.pk},{high.pk}&ref=x%00y").status_code == 400


def test_runs_that_scored_different_rows_are_warned_about_and_not_ranked(logged_in, user):
    fifty = scored(user, {"rouge_score": BASELINE}, name="all-rows")
    ten = scored(user, {"rouge_score": BASELINE}, name="ten-rows", rows=range(10))
    other_ten = scored(user, {"rouge_score": BASELINE}, name="other-ten", rows=range(10, 20))
    data = compared(fifty, ten, other_ten)
    [warning] = data["different_rows"]
    assert warning.startswith(f"ragas_eval: these runs scored different rows (#{fifty.pk} 20 rows (rows 0-19), #{ten.pk} 10 rows (rows 0-9), "
                              f"#{other_ten.pk} 10 rows (rows 10-19))")
    assert paired_cell(data, "rouge_score", ten)["paired"]["n_pairs"] == 10  # only the rows both scored
    page = logged_in.get(f"/compare/?runs={fifty.pk},{ten.pk},{other_ten.pk}").content.decode()
    assert "Different rows." in page and "n=20" in page and "n=10" in page and "cell-best" not in page
    # the same rows: no warning
    assert compared(fifty, scored(user, {"rouge_score": BASELINE}))["different_rows"] == []


def test_the_paired_differences_chart_carries_each_interval(user):
    reference = scored(user, {"rouge_score": BASELINE, "exact_match": [0.0] * N})
    shifted = scored(user, {"rouge_score": [b + 0.3 + w for b, w in zip(BASELINE, WOBBLE, strict=True)], "exact_match": [0.0] * N})
    data = compared(reference, shifted)
    chart = data["paired_chart"]
    assert chart["reference"] == f"#{reference.pk} {reference.name}" and chart["categories"] == ["ragas_eval · exact_match", "ragas_eval · rouge_score"]
    [series] = chart["runs"]
    cell = paired_cell(data, "rouge_score", shifted)["paired"]
    assert series["run"] == f"#{shifted.pk} {shifted.name}" and series["verdict"] == ["no significant difference", "better"]
    assert (series["delta"][1], series["low"][1], series["high"][1], series["n_pairs"][1]) == (cell["delta"], cell["ci_low"], cell["ci_high"], N)
