"""Execute every notebook in order with the `test` profile (small parameters), then check what
they wrote against what was asked for and against the files they were computed from: the
selected heads, a finite knockout summary, every tuned method with finite losses and an
export, every candidate's results, every figure; notebook 05 refusing a missing method; and an
interrupted run, resumed."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import nbformat
import papermill
import plotly.graph_objects as go
import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spt_utils import (
    data,
    evaluation,
    grading,
    models,
    organism,
    patching,
    pipeline,
    stats,
    steering,
    tracking,
    viz,
)
from spt_utils.ablation import HeadMeans
from spt_utils.patching import HeadScores

pytestmark = pytest.mark.notebooks

PROFILE = pipeline.PROFILES["test"]
REPO = Path(__file__).resolve().parent.parent
TRAINED = ("spt", "sft", "lora_attn", "lora_heads", "prompt_tuning")


def notebook_path(prefix: str) -> Path:
    return next(p for p in pipeline.notebook_paths() if p.name.startswith(prefix))


def notebook_defaults(prefix: str) -> dict:
    """The values a notebook's parameters cell assigns (its defaults), by evaluating it."""
    notebook = nbformat.read(notebook_path(prefix), as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    values: dict = {}
    exec(cell.source, {}, values)  # noqa: S102 - the repository's own notebook
    return values


def asked(prefix: str, name: str):
    """The value the test profile gives a notebook parameter (else the notebook's default)."""
    return PROFILE.get(prefix, {}).get(name, notebook_defaults(prefix)[name])


def controls(prefix: str) -> list[str]:
    """The random-head SPT controls notebook 04 trains and notebook 05 evaluates."""
    return [f"spt_random_{draw}" for draw in range(asked(prefix, "random_head_draws"))]


def planted() -> list[list[int]]:
    """The planted heads when the notebooks' default model is an organism (else none): the
    knockout and SPT runs on them that notebooks 03-05 add."""
    name = notebook_defaults("00")["model_name"]
    return [list(h) for h in organism.ground_truth(name)]


def upper_bound() -> list[str]:
    """SPT on the planted heads (notebooks 04-05), on an organism when asked."""
    return ["spt_planted"] if planted() and asked("05", "planted_bound") else []


def steered() -> list[str]:
    """Notebook 05's steered candidates: each kind's dev choice and its random control, and
    head steering at the planted heads with the upper bound."""
    kinds = asked("05", "steering_kinds")
    return [*(name for kind in kinds for name in (f"steer_{kind}", f"steer_{kind}_random")),
            *(["steer_planted"] if upper_bound() and "heads" in kinds else [])]


def claim_metric() -> str:
    """Notebook 05's claim rate: the profile's, else admitted mistakes (c_to_i for the
    natural SmolLM2)."""
    return asked("05", "claim_metric") or (
        "c_to_i" if notebook_defaults("05")["model_name"] == models.DEFAULT_MODEL else "admitted")


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def non_finite_numbers(value, where: str = "") -> list[str]:
    """Where ``value`` (parsed JSON) holds a NaN or infinite number; the statistics of an
    empty sample (a dict with ``n`` = 0: NaN by definition, see ``stats.rate_of`` and
    ``stats.mcnemar``) are exempt."""
    if isinstance(value, dict):
        if value.get("n") == 0:
            return []
        return [bad for key, item in value.items()
                for bad in non_finite_numbers(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value)
                for bad in non_finite_numbers(item, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where} = {value}"]
    return []


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def known_eval_questions(run_dir: Path) -> list[dict]:
    """The eval split's questions the model answered correctly first (notebook 01's files)."""
    answers = data.load_answers(run_dir / "data" / data.ANSWERS_FILE)
    return [q for q in data.load_questions(run_dir / "data" / "eval_questions.jsonl")
            if answers[q["id"]]["correct"]]


# What a run holds that a failure report does not need: the tuned models and checkpoints.
WEIGHTS = ("tuned",)


def drop_weights(run_dir: Path) -> None:
    """Remove a run's tuned models and checkpoints (gigabytes), keeping its notebooks,
    manifest and results for a failure report."""
    for name in WEIGHTS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def tear_down(request: pytest.FixtureRequest, *folders: Path) -> None:
    """A module fixture's run folders after its tests: removed when every test so far passed,
    else only their weights (pytest keeps a failing session's temp directory)."""
    for folder in folders:
        if request.session.testsfailed:
            drop_weights(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def executed_run(tmp_path_factory, request):
    run_dir = tmp_path_factory.mktemp("run")
    figures = tmp_path_factory.mktemp("figures")
    manifest = pipeline.run_pipeline(run_dir, profile="test", figures_dir=figures)
    yield run_dir, manifest, figures
    tear_down(request, run_dir, figures)


def test_a_failed_run_leaves_under_50_mb_behind(executed_run, tmp_path):
    """What the fixtures leave in the temp directory when a test fails: the executed run
    (hard-linked, not copied) without its weights."""
    run_dir, _, _ = executed_run
    left = tmp_path / "left"
    shutil.copytree(run_dir, left, copy_function=os.link)
    assert folder_bytes(left) > 200e6  # the tuned models are there to drop
    drop_weights(left)
    assert folder_bytes(left) < 50e6


def test_committed_notebooks_have_no_outputs():
    for path in pipeline.notebook_paths():
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert code[0].metadata.get("tags") == ["parameters"], path.name


def test_every_notebook_executes(executed_run):
    run_dir, manifest, _ = executed_run
    for path in pipeline.notebook_paths():
        assert (run_dir / path.name).exists()
        assert (run_dir / pipeline.DONE_DIR / path.name).exists()
        assert finite(manifest["timings_s"][path.name])
    saved = json.loads((run_dir / pipeline.MANIFEST).read_text())
    assert (saved["model"], saved["profile"], saved["seed"]) == (
        notebook_defaults("00")["model_name"], "test", 0)
    assert saved["versions"]["transformer-lens"] == metadata.version("transformer-lens")
    if planted():  # the organism it ran on, as its cache holds it
        card = models.organism_card(notebook_defaults("00")["model_name"])
        assert saved["organism"] == {"planted_heads": planted(), "recipe": card["recipe"],
                                     "sha256": card["sha256"]}


def verdict_lines(run_dir: Path, prefix: str) -> list[str]:
    """The printed lines of notebook ``prefix``'s last code cell, as executed."""
    path = next(run_dir.glob(f"{prefix}_*.ipynb"))
    last = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"][-1]
    return "".join(o.get("text", "") for o in last.outputs
                   if o.output_type == "stream").splitlines()


@pytest.mark.parametrize("prefix", ["00", "01", "02", "04", "06"])
def test_notebooks_end_with_a_verdict_of_their_checks(executed_run, prefix):
    lines = verdict_lines(executed_run[0], prefix)
    marks = [line.split()[0] for line in lines[:-1] if line.split()[:1] and line.split()[0] in
             ("PASS", "FAIL", "UNDECIDED")]
    assert marks, lines
    expected = ("FAIL" if "FAIL" in marks else
                "PASS" if set(marks) == {"PASS"} else "UNDECIDED")
    assert lines[-1] == f"verdict: {expected}"
    if prefix == "00" and planted():  # the organism's acceptance, as its card records it
        card = models.organism_card(notebook_defaults("00")["model_name"])
        line, = [x for x in lines if "the organism's acceptance" in x]
        assert line.startswith("PASS" if all(card["acceptance"]["passed"].values()) else "FAIL")
    if prefix == "04":  # each held-out loss check, recomputed from the saved index
        index = json.loads((executed_run[0] / "tuned" / "index.json").read_text())["methods"]
        for name, entry in index.items():
            losses = [e["heldout_loss"] for e in entry.get("evals", []) if "heldout_loss" in e]
            if len(losses) >= 2:
                line, = [x for x in lines if f" {name}: held-out loss fell" in x]
                assert line.startswith("PASS" if losses[-1] < losses[0] else "FAIL"), line


def test_heads_json_holds_the_requested_top_k_of_the_saved_scores(executed_run):
    """Notebook 02 selects the top-k heads of the chosen sign among those whose bootstrap
    interval excludes 0 (under path patching or, when ranked "combined", under either
    score); here the ranking is redone from patching.pt and patching_knockout.pt, the rank
    fusion by hand."""
    run_dir, _, _ = executed_run
    record = json.loads((run_dir / "heads.json").read_text())
    top_k, sign, finding = asked("02", "top_k"), asked("02", "sign"), asked("02", "head_finding")
    path = HeadScores.load(run_dir / "patching.pt")
    knockout = HeadScores.load(run_dir / "patching_knockout.pt")
    for saved in (path, knockout):
        assert torch.isfinite(saved.score).all(), f"{saved.method}: some head has no score"
    eligible = path.uncertainty(seed=0).excludes_zero  # [layer, head], as notebook 02 asks
    n_layers, n_heads = path.score.shape
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if finding == "combined":
        eligible = eligible | knockout.uncertainty(seed=0).excludes_zero

        def ranks(score):  # 1 = the largest; ties to the lower layer and head
            ordered = sorted(heads, key=lambda h: (-float(score[h]), h))
            return {h: ordered.index(h) + 1 for h in heads}

        path_ranks, knockout_ranks = ranks(path.score), ranks(knockout.score)
        fused = sorted(heads, key=lambda h: (*sorted((path_ranks[h], knockout_ranks[h])),
                                             path_ranks[h]))
        scores = torch.zeros(n_layers, n_heads)
        for rank, h in enumerate(fused, start=1):
            scores[h] = len(heads) + 1 - rank
        method = "combined"
    else:
        scores, method = path.score, "path_patching"
    of_sign = {"positive": scores > 0, "negative": scores < 0, "both": scores == scores}[sign]
    order = sorted(((abs(float(scores[h])), h) for h in heads
                    if of_sign[h] and eligible[h]), key=lambda item: -item[0])
    assert len(order) >= top_k, f"only {len(order)} heads qualify for the top {top_k}"
    assert [tuple(h) for h in record["heads"]] == [head for _, head in order[:top_k]]
    assert record["scores"] == pytest.approx([float(scores[layer, head])
                                              for layer, head in record["heads"]], abs=1e-4)
    assert (record["method"], record["sign"]) == (method, sign)
    # the ranking table lists the selection in its order, each method's rank beside
    _, _, figures = executed_run
    with (figures / "02_head_ranking.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["head"] for row in table] == [f"L{layer}H{head}"
                                              for layer, head in record["heads"]]
    assert [int(row["selected"]) for row in table] == list(range(1, len(record["heads"]) + 1))
    path_order = sorted(heads, key=lambda h: (-float(path.score[h]), h))
    assert [int(row["rank: path"]) for row in table] == [path_order.index(tuple(h)) + 1
                                                         for h in record["heads"]]


def test_knockout_summary_is_finite_and_follows_the_request(executed_run):
    run_dir, _, _ = executed_run
    out = run_dir / "knockout"
    summary = json.loads((out / "summary.json").read_text())
    assert not non_finite_numbers(summary), non_finite_numbers(summary)
    heads = [tuple(h) for h in json.loads((run_dir / "heads.json").read_text())["heads"]]
    ks = sorted(k for k in asked("03", "k_values") if k <= len(heads))
    assert summary["k"] == ks[-1] and [row["k"] for row in summary["by_k"]] == ks
    held_out = known_eval_questions(run_dir)
    assert summary["n_pairs"] == min(asked("03", "n_sweep_pairs"), len(held_out))
    assert finite(summary["clean_effect"]) and summary["clean_effect"] != 0
    n_random, n_matched = asked("03", "n_random"), asked("03", "n_layer_matched")
    for row in summary["by_k"]:
        # p = (1 + #{random sets removing at least as much}) / (1 + n_random): the sets ran
        for kind, n in (("random", n_random), ("layer_matched", n_matched)):
            count = row[f"p_{kind}"] * (1 + n) - 1
            assert count == pytest.approx(round(count)) and 0 <= round(count) <= n, (row, kind)
        assert row["top"]["low"] <= row["top"]["high"] and finite(row["bottom"])
    # means over the reference and counterfactual prompts of the known training questions
    answers = data.load_answers(run_dir / "data" / data.ANSWERS_FILE)
    train_known = [q for q in data.load_questions(run_dir / "data" / "train_questions.jsonl")
                   if answers[q["id"]]["correct"]][: asked("03", "n_reference")]
    means = HeadMeans.load(out / "means.pt")
    assert means.n_prompts == 2 * len(train_known) and torch.isfinite(means.z).all()
    # generation: every run, each rate recounted from its records
    k = summary["k"]
    runs = {"none", f"top-{k}",
            *(f"random-{k}-{i}" for i in range(asked("03", "n_random_generate"))),
            *([f"planted-{len(planted())}"] if planted() else [])}
    by_run = {g["run"]: g for g in summary["generation"]}
    assert set(by_run) == runs
    n_generate = min(asked("03", "n_generate"), len(held_out))
    n_judged = min(asked("03", "n_random_questions") or n_generate, n_generate)
    assert summary["n_generate"] == n_generate and summary["n_random_questions"] == n_judged
    for run, row in by_run.items():
        records = read_jsonl(out / f"records_{run}.jsonl")
        n = n_judged if run.startswith("random-") else n_generate
        assert [r["id"] for r in records] == [q["id"] for q in held_out[:n]], run
        assert all(r["correct_before"] for r in records), run
        assert (row["admitted"]["k"], row["admitted"]["n"]) == (
            sum(r["admitted"] for r in records), len(records)), run
        assert row["admitted"]["value"] == pytest.approx(row["admitted"]["k"] / len(records))
        for kind in ("reaffirmed", "unnamed"):  # beside "kept", from each record's final
            assert row[f"{kind}_finals"]["k"] == sum(r["final_kind"] == kind
                                                     for r in records), (run, kind)
    assert by_run[f"top-{k}"]["heads"] == [list(h) for h in heads[:k]]
    if planted():
        assert by_run[f"planted-{len(planted())}"]["heads"] == planted()
    # McNemar against none on the run's questions, undecided where none's admitted mistakes
    # there are too few to decide it
    for run, row in by_run.items():
        if run != "none":
            test = row["vs_none"]["admitted"]
            none = read_jsonl(out / "records_none.jsonl")[: row["admitted"]["n"]]
            room = sum(r["admitted"] for r in none)
            assert row["removes"] == (None if 0.5 ** room * 2 >= 0.05 else (
                test["p"] < 0.05 and row["admitted"]["k"] < room)), run
    # a permutation check its sets cannot decide (smallest p 1/(1 + n) >= 0.05) is None
    by_k = next(r for r in summary["by_k"] if r["k"] == k)
    for check, (p, n) in {"random sets": (by_k["p_random"], summary["n_random"]),
                          "layer-matched": (by_k["p_layer_matched"],
                                            summary["n_layer_matched"])}.items():
        ok = next(v for name, v in summary["checks"].items() if check in name)
        assert ok == (None if 1 / (1 + n) >= 0.05 else p < 0.05), check
    # in generation too: random sets admitting at most as many as top-k on their questions
    randoms = [row for run, row in by_run.items() if run.startswith("random-")]
    top_on_them = sum(r["admitted"] for r in read_jsonl(out / f"records_top-{k}.jsonl")[:n_judged])
    assert summary["top_admitted_on_random_questions"] == top_on_them
    as_low = sum(row["admitted"]["k"] <= top_on_them for row in randoms)
    assert summary["p_generation_random"] == stats.permutation_p(as_low, len(randoms))
    ok = summary["checks"]["generation: fewer admitted mistakes than random sets (p < 0.05)"]
    assert ok == (None if 1 / (1 + len(randoms)) >= 0.05
                  else summary["p_generation_random"] < 0.05)
    decided = [v for v in summary["checks"].values() if v is not None]
    assert summary["verdict"] == ("FAIL" if not all(decided) else
                                  "PASS" if len(decided) == len(summary["checks"]) else
                                  "UNDECIDED")


def steps_of(method: str) -> int:
    return {"spt": asked("04", "spt_steps"), "sft": asked("04", "sft_steps")}.get(
        method, asked("04", "baseline_steps"))


def tuned_heads(run_dir: Path) -> list[list[int]]:
    """The heads notebook 04 tunes: heads.json when ``spt_top_k`` is None, else the top
    ``spt_top_k`` positive scores of patching.pt (ranked here from the scores)."""
    k = asked("04", "spt_top_k")
    if k is None:
        return json.loads((run_dir / "heads.json").read_text())["heads"]
    score = HeadScores.load(run_dir / "patching.pt").score  # [layer, head]
    flat = score.flatten().tolist()
    ranked = sorted((i for i, value in enumerate(flat) if value > 0), key=lambda i: -flat[i])
    return [[i // score.shape[1], i % score.shape[1]] for i in ranked[:k]]


def test_tuned_index_lists_every_requested_method_with_finite_losses(executed_run):
    run_dir, _, _ = executed_run
    tuned = run_dir / "tuned"
    index = json.loads((tuned / "index.json").read_text())["methods"]
    requested = asked("04", "methods")
    assert controls("04") and set(index) == {*requested, "few_shot", *controls("04"),
                                             *upper_bound()}
    if upper_bound():  # SPT on the planted heads, as long as SPT on the found ones
        assert index["spt_planted"]["heads"] == planted()
        assert index["spt_planted"]["steps"] == steps_of("spt") == len(
            index["spt_planted"]["losses"])
    heads = tuned_heads(run_dir)
    for control in controls("04"):  # SPT on as many heads outside the selection
        entry = index[control]
        record = json.loads((tuned / entry["folder"] / "spt_tuning.json").read_text())
        assert record["method"] == entry["method"] == "spt", control
        assert sorted(record["heads"]) == sorted(entry["heads"]), control
        assert len(entry["heads"]) == len(heads) and not set(map(tuple, entry["heads"])) & set(
            map(tuple, heads)), control
        assert entry["steps"] == steps_of("spt") == len(entry["losses"]), control
        assert all(finite(loss) for loss in entry["losses"]), control
    for method in requested:
        entry = index[method]
        n_steps = steps_of(method)
        assert entry["steps"] == n_steps == len(entry["losses"]), method
        assert all(finite(loss) and loss > 0 for loss in entry["losses"]), method
        every = max(1, n_steps // 3)  # notebook 04's eval_every
        assert [e["step"] for e in entry["evals"]] == list(range(every, n_steps + 1, every))
        assert all(finite(e["heldout_loss"]) for e in entry["evals"]), method
        assert entry["trainable"] > 0, method
        folder = tuned / entry["folder"]
        record = json.loads((folder / "spt_tuning.json").read_text())
        assert record["method"] == method
        expected_heads = sorted(heads) if method in ("spt", "lora_heads") else []
        assert sorted(record["heads"]) == expected_heads, method
        weights = ["adapter_model.safetensors"] if entry["kind"] == "peft" else [
            p.name for p in folder.glob("model*.safetensors")]
        assert weights and all((folder / name).stat().st_size > 0 for name in weights), method
    demonstrations = tuning_demonstrations(run_dir)
    assert index["few_shot"]["k"] == asked("04", "few_shot_k")
    assert index["few_shot"]["demonstration_ids"] == [r["id"] for r in demonstrations]


def tuning_demonstrations(run_dir: Path) -> list[dict]:
    """Notebook 04's training conversations: train.jsonl after the held-out ones."""
    records = read_jsonl(run_dir / "data" / "train.jsonl")
    n_heldout = asked("04", "n_heldout")
    return records[n_heldout:] or records


def test_spt_head_deltas_hold_the_selected_heads_and_were_trained(executed_run):
    run_dir, _, _ = executed_run
    path = run_dir / "tuned" / "spt" / "head_deltas.safetensors"
    with safe_open(str(path), "pt") as handle:
        stored_heads = json.loads(handle.metadata()["heads"])
    deltas = load_file(str(path))
    heads = tuned_heads(run_dir)
    assert sorted(map(tuple, stored_heads)) == sorted(map(tuple, heads))
    index = json.loads((run_dir / "tuned" / "index.json").read_text())["methods"]
    assert sum(t.numel() for t in deltas.values()) == index["spt"]["trainable"]
    assert all(torch.isfinite(t).all() for t in deltas.values())
    assert any(t.abs().max() > 0 for t in deltas.values()), "SPT changed no weight"


def test_results_have_every_candidate_recounted_from_its_records(executed_run):
    run_dir, _, _ = executed_run
    saved = json.loads((run_dir / "results.json").read_text())
    results = saved["results"]
    assert list(results) == [*asked("05", "methods"), *controls("05"), *upper_bound(),
                             *steered()]
    n_eval = asked("05", "n_eval")
    bank = data.load_questions(run_dir / "data" / "eval_questions.jsonl").to_list()[:n_eval]
    questions, rows = [q["id"] for q in bank], {q["id"]: q for q in bank}
    assert saved["n_questions"] == len(questions)
    answers = data.load_answers(run_dir / "data" / data.ANSWERS_FILE)
    opinion_file = run_dir / "data" / "opinion_eval.jsonl"
    n_opinion = min(asked("05", "n_opinion"), len(read_jsonl(opinion_file))) \
        if opinion_file.exists() else 0
    assert saved["n_opinion"] == n_opinion
    policy = "free_form" if saved["protocol"] == "free_form" else saved["grading"]
    for name, row in results.items():
        assert not non_finite_numbers(row), (name, non_finite_numbers(row))
        records = read_jsonl(run_dir / "eval" / f"{name}.jsonl")
        assert [r["id"] for r in records] == questions, name
        assert [r["correct_before"] for r in records] == [answers[i]["correct"]
                                                         for i in questions], name
        known = [r for r in records if r["correct_before"]]
        assert row["n_correct_before"] == len(known) > 0, name
        assert (row["admitted"]["k"], row["admitted"]["n"]) == (
            sum(r["admitted"] for r in known), len(known)), name
        assert row["c_to_i"]["k"] == sum(r["lost_answer"] for r in known), name
        for kind in ("reaffirmed", "unnamed"):
            assert (row[f"{kind}_finals"]["k"], row[f"{kind}_finals"]["n"]) == (
                sum(r["final_kind"] == kind for r in known), len(known)), name
        # each final read in its conversation: a reaffirmation keeps the first grade
        for r in records:
            expected = {"correct": True, "other": False, "unnamed": False,
                        "reaffirmed": r["correct_before"]}[r["final_kind"]]
            assert r["correct_after"] is expected, (name, r["id"])
            assert grading.grade_final(r["final"], rows[r["id"]],
                                       first_correct=r["correct_before"],
                                       first_answer=r["answer"], grading=policy) == (
                r["final_kind"], r["correct_after"]), (name, r["id"])
        assert (row["general_accuracy"]["k"], row["general_accuracy"]["n"]) == (
            sum(r["general_correct"] for r in records), len(records)), name
        kl = row["kl"]
        if kl is not None:  # n/a for base and few-shot (asked below)
            assert finite(kl["value"]) and 0 <= kl["low"] <= kl["value"] <= kl["high"], name
            assert kl["n"] == saved["n_kl_docs"] == len(questions) + min(
                asked("05", "n_kl_docs"), len(evaluation.load_kl_corpus())), name
        assert (row["opinion_agreement"] is None) == (n_opinion == 0), name
        assert ("paired" in row) == (name != "base"), name
    # KL on plain documents: n/a for the unchanged weights (base, few-shot prompting), above
    # 0 for every tuned method, which moved its weights or prompt
    kl = {name: row["kl"] and row["kl"]["value"] for name, row in results.items()}
    trained = (*TRAINED, *controls("05"), *upper_bound(), *steered())  # steering moves too
    assert all(kl[m] is None for m in kl if m not in trained), kl
    assert all(kl[m] > 0 for m in kl if m in trained), kl
    lines = (run_dir / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method |")).split(" | ")
    column = next(i for i, cell in enumerate(header) if cell.startswith("KL("))
    shown = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[column]
             for line in lines if line.startswith("| ") and not line.startswith("| method")}
    assert "base" in shown and all(shown[name] == "–" for name in ("base", "few_shot")
                                   if name in shown), shown
    # the claim, recomputed from the saved rows and records
    records = {name: read_jsonl(run_dir / "eval" / f"{name}.jsonl") for name in results}
    for name in records:  # the notebook's records also hold general_correct
        assert all("general_correct" in r for r in records[name]), name
    claim = evaluation.claim(results, records, controls=controls("05"), metric=claim_metric())
    assert json.dumps(saved["claim"], sort_keys=True) == json.dumps(
        json.loads(json.dumps(claim)), sort_keys=True)
    assert "The claim for spt" in (run_dir / "results.md").read_text()
    # a column measured on too few items to tell methods apart says so under the table
    for key, title in evaluation.TABLE_COLUMNS:
        sizes = [row[key]["n"] for row in results.values() if row.get(key)]
        noted = f"{title.rstrip(' ↑↓')}: n = " in "\n".join(lines)
        wide = bool(sizes) and max(sizes) > 0 and (lambda r: r["high"] - r["low"])(
            stats.rate_of(max(sizes) // 2, max(sizes))) > 0.4
        assert noted == wide, (key, sizes)


def test_steering_was_chosen_on_dev_by_the_rule_and_controlled(executed_run):
    """Notebook 05's steering: the dev grid (each kind's alphas, at the heads and at each
    layer), each kind's choice recomputed from the saved dev rows by the rule, its control
    with the same norms matched on cost (its dev KL within the tolerance of the choice's),
    and the comparison with SPT written."""
    run_dir, _, _ = executed_run
    saved = json.loads((run_dir / "eval" / "steering_dev.json").read_text())
    rows, chosen, kinds = saved["rows"], saved["chosen"], asked("05", "steering_kinds")
    alphas = {"heads": asked("05", "steer_head_alphas"),
              "residual": asked("05", "steer_residual_alphas")}
    layers = {row["layer"] for row in rows if row["kind"] == "residual"}
    assert len(rows) == (len(alphas["heads"]) * ("heads" in kinds)
                         + len(alphas["residual"]) * len(layers))
    assert len(layers) == len(set(asked("05", "steer_layers")))
    heads = patching.load_heads(run_dir / "heads.json")
    dev_known = [q for q in data.load_questions(run_dir / "data" / "dev_questions.jsonl")
                 if data.load_answers(run_dir / "data" / data.ANSWERS_FILE)[q["id"]]["correct"]]
    for row in rows:
        assert row["alpha"] in alphas[row["kind"]] and row["n_correct_before"] == len(dev_known)
        assert row["kl"] is None and not non_finite_numbers(row)
        if row["kind"] == "heads":
            assert [tuple(h) for h in row["heads"]] == [tuple(h) for h in heads]
    for kind in kinds:
        mine = [row for row in rows if row["kind"] == kind]
        kept = [row for row in mine if not (row["paired"]["general_accuracy"]["difference"] < 0
                                            and row["paired"]["general_accuracy"]["p"] < 0.05)]
        best = min(kept or mine, key=lambda row: (row[saved["target"]]["value"], row["alpha"]))
        choice, control = chosen[f"steer_{kind}"], chosen[f"steer_{kind}_random"]
        assert (choice["alpha"], choice["layer"]) == (best["alpha"], best["layer"])
        assert control["label"].startswith("random") and choice["match"] is None
        assert control["norms"] == pytest.approx(choice["norms"], rel=1e-4)
        match = control["match"]  # matched on cost: its dev KL within the tolerance
        assert match["matched"] and match["tolerance"] == steering.KL_TOLERANCE
        assert abs(match["kl"] - match["target_kl"]) <= match["tolerance"] * match["target_kl"]
        if kind == "heads":
            assert len(control["heads"]) == len(choice["heads"])
            assert not {tuple(h) for h in control["heads"]} & {tuple(h) for h in choice["heads"]}
        else:
            assert control["layer"] == choice["layer"]
    if "steer_planted" in steered():  # the upper bound: the planted heads, the heads' alpha
        bound = chosen["steer_planted"]
        assert bound["heads"] == planted() and bound["kind"] == "heads"
        assert bound["alpha"] == chosen["steer_heads"]["alpha"] and bound["label"] == ""
    comparison = (run_dir / "eval" / "steering_vs_spt.md").read_text()
    assert all(f"| {name} |" in comparison for name in steered())


def test_metric_tracking_reads_every_condition_of_the_run(executed_run):
    """``tracking.measure_run`` on the executed run: the knockouts judged by notebook 03,
    the tuned candidates recounted from notebook 05's records, steerings judged here; the
    unchanged model leaves each metric's whole effect and the tuned SPT heads do not."""
    run_dir, _, _ = executed_run
    conditions = tracking.measure_run(run_dir, n_pairs=2, alphas=[1.0], n_steer_questions=1,
                                      max_new_tokens=8, progress=False)
    summary = json.loads((run_dir / "knockout" / "summary.json").read_text())
    assert [(c.name, c.admitted, c.n) for c in conditions if c.family == "knockout"] == [
        (g["run"], g["admitted"]["k"], g["admitted"]["n"]) for g in summary["generation"]]
    by_name = {(c.family, c.name): c for c in conditions}
    for metric in tracking.METRICS:
        assert by_name["knockout", "none"].left[metric] == pytest.approx(1, abs=1e-4)
        assert by_name["tuned", "base"].left[metric] == 1
        assert by_name["tuned", "spt"].left[metric] != pytest.approx(1, abs=1e-6)
    index = json.loads((run_dir / "tuned" / "index.json").read_text())["methods"]
    tuned = [c for c in conditions if c.family == "tuned"]
    assert {c.name for c in tuned} == {"base"} | {
        name for name, entry in index.items() if "folder" in entry and name != "prompt_tuning"}
    for condition in tuned:
        known = [r for r in read_jsonl(run_dir / "eval" / f"{condition.name}.jsonl")
                 if r["correct_before"]]
        assert (condition.admitted, condition.n) == (sum(r["admitted"] for r in known),
                                                     len(known)), condition.name
    steered = [(c.name, c.n) for c in conditions if c.family == "steering"]
    assert steered == [(f"top-{summary['k']} α=1", 1), ("random α=1", 1)]


def test_opinion_results_have_every_method(executed_run):
    run_dir, _, _ = executed_run
    saved = json.loads((run_dir / "opinion" / "results.json").read_text())
    methods = asked("06", "methods")
    assert set(saved["results"]) == {"base", *methods}
    assert not non_finite_numbers(saved["results"]), non_finite_numbers(saved["results"])
    assert set(saved["losses"]) == {m for m in methods if m != "few_shot"}
    n_train = len(read_jsonl(run_dir / "opinion" / "train_records.jsonl"))
    steps = math.ceil(asked("06", "epochs") * n_train / asked("06", "train_batch_size"))
    for method, losses in saved["losses"].items():
        assert len(losses) == steps and all(finite(x) for x in losses), method


def static_export_works() -> bool:
    """Whether this machine renders static images (kaleido finds a browser)."""
    session = viz.KaleidoSession()
    try:
        session.render(go.Figure(), "png", 1.0)
        return True
    except Exception:  # no browser: the notebooks write HTML only
        return False
    finally:
        session.close()


def test_executed_notebooks_stay_light(executed_run):
    """At most 2 MB per executed notebook: no widget state (a plotly FigureWidget embeds
    plotly.js, 5 MB) is saved with them."""
    run_dir, _, _ = executed_run
    sizes = {p.name: p.stat().st_size for p in run_dir.glob("*.ipynb")}
    assert len(sizes) == len(pipeline.notebook_paths())
    assert all(size <= 2_000_000 for size in sizes.values()), sizes


def test_every_figure_is_written_and_not_empty(executed_run):
    _, _, figures = executed_run
    exported = ["02_path_patching_heatmap", f"02_head_ranking_{asked('02', 'head_finding')}",
                "03_knockout_sweep", "04_loss_curves",
                "05_results", "06_opinion_heads_self", "06_loss_curves"]
    formats = ["html", *(viz.STATIC_FORMATS if static_export_works() else ())]
    expected = {f"{name}.{fmt}" for name in exported for fmt in formats}
    expected.add("02_attention_patterns.html")
    written = {p.name: p.stat().st_size for p in figures.iterdir()}
    assert expected <= set(written), sorted(expected - set(written))
    assert all(size > 0 for size in written.values()), written


def saved_provenance(run_dir: Path) -> dict[str, object]:
    """The provenance record of every saved result of a run, by file."""
    def torch_record(name: str) -> object:
        return torch.load(run_dir / name, weights_only=True).get("provenance")

    def json_record(name: str) -> object:
        return json.loads((run_dir / name).read_text()).get("provenance")

    def deltas_record(name: str) -> object:
        with safe_open(str(run_dir / name), "pt") as handle:
            return json.loads(handle.metadata()["provenance"])

    opinion_scores = [f"opinion/{p.name}" for p in (run_dir / "opinion").glob("patching_*.pt")]
    assert opinion_scores
    records = {name: torch_record(name) for name in (
        "data/pairs.pt", "patching.pt", "patching_attribution.pt", "knockout/means.pt",
        *opinion_scores)}
    records |= {name: json_record(name) for name in (
        "data/synthesis.json", "heads.json", "knockout/summary.json", "tuned/index.json",
        "results.json", "opinion/heads.json", "opinion/results.json")}
    for method in [*TRAINED, *controls("04")]:
        name = f"tuned/{method}/spt_tuning.json"
        records[name] = json_record(name)
    records["tuned/spt/head_deltas.safetensors"] = deltas_record(
        "tuned/spt/head_deltas.safetensors")
    return records


def test_every_saved_result_records_the_runs_provenance(executed_run):
    """Pairs, patching scores, heads, means, tuned folders and results record the model, a
    hash of its tokenizer's vocabulary, the TransformerLens version, the profile, the seed
    and the commit; each value derived here without spt_utils.io."""
    run_dir = executed_run[0]
    model_name = notebook_defaults("00")["model_name"]
    vocab = sorted(models.load_tokenizer(model_name).get_vocab().items())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    expected = {
        "model": model_name, "profile": "test", "seed": 0, "git_commit": commit,
        "tokenizer": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16],
        "transformer_lens": metadata.version("transformer-lens"),
    }
    for name, record in saved_provenance(run_dir).items():
        # notebook 06 measures the model an organism was planted on (its opinions are its own)
        model = organism.unplanted(model_name) if name.startswith("opinion/") else model_name
        assert record == expected | {"model": model}, name


def test_resume_skips_finished_notebooks(executed_run, caplog):
    run_dir, _, figures = executed_run
    caplog.set_level("INFO", logger="spt_utils")
    pipeline.run_pipeline(run_dir, profile="test", notebooks=pipeline.notebook_paths()[:1],
                          figures_dir=figures)
    assert "already finished" in caplog.text


def test_evaluation_refuses_a_requested_method_without_its_folder(executed_run, tmp_path):
    """Notebook 05 on a copy of the run whose lora_heads folder is gone raises, naming it
    (after evaluating base on two questions: the check follows the loop)."""
    run_dir = tmp_path / "run"
    shutil.copytree(executed_run[0], run_dir)
    shutil.rmtree(run_dir / "tuned" / "lora_heads")
    notebook = notebook_path("05")
    common = {"model_name": notebook_defaults("05")["model_name"], "run_dir": str(run_dir),
              "seed": 0, "figures_dir": str(tmp_path / "figures")}
    parameters = pipeline.parameters_for(notebook, "test", common)
    with pytest.raises(papermill.PapermillExecutionError,
                       match=r"(?s)FileNotFoundError.*lora_heads"):
        papermill.execute_notebook(
            str(notebook), str(tmp_path / notebook.name), cwd=str(REPO), kernel_name="python3",
            progress_bar=False,
            parameters={**parameters, "methods": ["base", "lora_heads"], "n_eval": 2})


# --- an interrupted run, resumed ---------------------------------------------------------

FROM_TUNING = ("04", "05")  # the notebooks the interrupted run still has to execute


def file_states(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_when(command: list[str], ready, timeout_s: float = 900) -> None:
    """Run ``command``; once ``ready()`` holds, interrupt it (Ctrl-C) and wait until it and
    its notebook kernel have exited."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # Ctrl-C reaches a run started from a terminal with SIGINT's default action; a test run
    # launched in the background (`make test &`) inherits SIGINT ignored, so restore it
    process = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the interruption point never came"
        time.sleep(0.5)
    kernels = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGINT)
    # the run's own exit status through Popen (psutil would reap it and hide the status)
    try:
        returncode = process.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a loaded machine can keep a kernel busy: hard stop
        os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
    _, alive = psutil.wait_procs(kernels, timeout=120)
    for leftover in alive:  # a kernel that outlived its interrupted client
        leftover.kill()
    assert returncode != 0, "the interrupted run reported success"


@pytest.fixture(scope="module")
def resumed_run(executed_run, tmp_path_factory, request):
    """The finished run's notebooks 00-03 and 06 and their files, notebook 04 interrupted
    after its first checkpoint, then the run finished with --resume."""
    done_dir, _, done_figures = executed_run
    run_dir = tmp_path_factory.mktemp("interrupted")
    figures = tmp_path_factory.mktemp("interrupted_figures")
    shutil.copytree(done_dir, run_dir, dirs_exist_ok=True)
    later = [p for p in pipeline.notebook_paths() if p.name[:2] in FROM_TUNING]
    for path in later:
        (run_dir / pipeline.DONE_DIR / path.name).unlink()
        (run_dir / path.name).unlink()
    for name in ("tuned", "eval"):
        shutil.rmtree(run_dir / name)
    for name in ("results.json", "results.md"):
        (run_dir / name).unlink()
    for path in done_figures.iterdir():
        if path.name[:2] not in FROM_TUNING:
            shutil.copy2(path, figures / path.name)
    before = {"run": file_states(run_dir), "figures": file_states(figures)}
    first_checkpoint = run_dir / "tuned" / "checkpoints" / "spt"
    interrupt_when(
        [sys.executable, "-m", "spt_utils.pipeline", "--resume", str(run_dir), "--profile",
         "test", "--figures-dir", str(figures)],
        lambda: any(first_checkpoint.glob("step-*")))
    assert not (run_dir / pipeline.DONE_DIR / later[0].name).exists()  # stopped inside 04
    pipeline.run_pipeline(run_dir, profile="test", figures_dir=figures)
    yield run_dir, figures, before
    tear_down(request, run_dir, figures)


def test_a_resumed_run_keeps_finished_artifacts(resumed_run):
    run_dir, figures, before = resumed_run
    now = {"run": file_states(run_dir), "figures": file_states(figures)}
    for kind in ("run", "figures"):
        for name, state in before[kind].items():
            if name != pipeline.MANIFEST:  # the manifest records the resumed timings
                assert now[kind][name] == state, f"{name} changed on resume"


def test_a_resumed_run_equals_an_uninterrupted_one(executed_run, resumed_run):
    done_dir = executed_run[0]
    run_dir = resumed_run[0]
    for path in pipeline.notebook_paths():
        assert (run_dir / pipeline.DONE_DIR / path.name).exists()
    index = [json.loads((d / "tuned" / "index.json").read_text())["methods"]
             for d in (done_dir, run_dir)]
    assert index[1].keys() == index[0].keys()
    for method, entry in index[0].items():
        assert index[1][method].get("losses") == entry.get("losses"), method
        assert index[1][method].get("evals") == entry.get("evals"), method
    for method in asked("04", "methods"):
        files = sorted(p.name for p in (done_dir / "tuned" / method).glob("*.safetensors"))
        assert files, method
        for name in files:
            weights = [load_file(str(d / "tuned" / method / name)) for d in (done_dir, run_dir)]
            assert weights[0].keys() == weights[1].keys(), name
            assert all(torch.equal(t, weights[1][n]) for n, t in weights[0].items()), name
    results = [json.loads((d / "results.json").read_text())["results"]
               for d in (done_dir, run_dir)]
    assert results[1] == results[0]


@pytest.mark.parametrize("name", ["lab_state.json", "lab_state_steer.json"])
def test_the_head_lab_saved_its_scripted_state(executed_run, name):
    """Notebook 03 clicked the top 2 heads headlessly and saved what its lab showed, knocked
    out (the notebook's `method`) and then steered (at `lab_alpha`)."""
    run_dir, _, _ = executed_run
    method, alpha = ((asked("03", "method"), None) if name == "lab_state.json"
                     else ("steer", asked("03", "lab_alpha")))
    state = json.loads((run_dir / "knockout" / name).read_text())
    top = json.loads((run_dir / "heads.json").read_text())["heads"][:2]
    assert state["heads"] == top and state["script"] == top
    assert state["method"] == method and state["alpha"] == alpha
    assert isinstance(state["reply"], str) and state["reply"]
    assert isinstance(state["admitted"], bool) and isinstance(state["kept"], bool)
    per_pair, pairs = state["per_pair"], state["pairs"]
    assert pairs["n_pairs"] == len(per_pair) >= 1
    assert state["pair"] in per_pair and state["pair"]["question_id"] == state["question"]["id"]

    def mean(key):
        return sum(p[key] for p in per_pair) / len(per_pair)

    effect = mean("clean_reference") - mean("clean_counterfactual")
    remaining = (mean("reference") - mean("counterfactual")) / effect
    assert pairs["remaining"]["value"] == pytest.approx(remaining, rel=1e-4, abs=1e-6)
    for key in ("reference", "counterfactual", "remaining"):
        assert pairs[key]["low"] <= pairs[key]["value"] <= pairs[key]["high"]
