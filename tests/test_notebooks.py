"""Execute every notebook in order with the `test` profile (small parameters), then check what
they wrote: the selected heads, a finite knockout summary, every tuned method with finite
losses, every candidate's results and non-empty figures; and resume an interrupted run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import plotly.graph_objects as go
import psutil
import pytest
import torch
from safetensors.torch import load_file

from spt_utils import pipeline, viz
from spt_utils.patching import HeadScores

pytestmark = pytest.mark.notebooks

PROFILE = pipeline.PROFILES["test"]
REPO = Path(__file__).resolve().parent.parent


def notebook_defaults(prefix: str) -> dict:
    """The values a notebook's parameters cell assigns (its defaults), by evaluating it."""
    path = next(p for p in pipeline.notebook_paths() if p.name.startswith(prefix))
    notebook = nbformat.read(path, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    values: dict = {}
    exec(cell.source, {}, values)  # noqa: S102 - the repository's own notebook
    return values


def profile_value(prefix: str, name: str):
    """The value the test profile gives a notebook parameter (else the notebook's default)."""
    return PROFILE.get(prefix, {}).get(name, notebook_defaults(prefix)[name])


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.fixture(scope="module")
def executed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    figures = tmp_path_factory.mktemp("figures")
    manifest = pipeline.run_pipeline(run_dir, profile="test", figures_dir=figures)
    return run_dir, manifest, figures


def test_committed_notebooks_have_no_outputs():
    for path in pipeline.notebook_paths():
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert any("parameters" in c.metadata.get("tags", []) for c in code), path.name


def test_every_notebook_executes(executed_run):
    run_dir, manifest, _ = executed_run
    for path in pipeline.notebook_paths():
        assert (run_dir / path.name).exists()
        assert path.name in manifest["timings_s"]
    saved = json.loads((run_dir / "manifest.json").read_text())
    assert saved["profile"] == "test" and saved["versions"]["transformer-lens"] == "4.3.0"


def test_heads_json_holds_the_requested_heads(executed_run):
    run_dir, _, _ = executed_run
    record = json.loads((run_dir / "heads.json").read_text())
    top_k, sign = profile_value("02", "top_k"), profile_value("02", "sign")
    scores = HeadScores.load(run_dir / "patching.pt").score  # [layer, head]
    assert len(record["heads"]) == top_k and len({tuple(h) for h in record["heads"]}) == top_k
    # the notebook's selection is the top-k of the saved scores among heads of the sign
    wanted = {"positive": scores > 0, "negative": scores < 0, "both": ~scores.isnan()}[sign]
    n_layers, n_heads = scores.shape
    order = sorted(((abs(float(scores[layer, head])), (layer, head)) for layer in range(n_layers)
                    for head in range(n_heads) if wanted[layer, head]), reverse=True)
    assert [tuple(h) for h in record["heads"]] == [head for _, head in order[:top_k]]
    assert record["scores"] == [round(float(scores[layer, head]), 6)
                                for layer, head in record["heads"]]


def recomputed_rates(records: list[dict]) -> dict[str, float]:
    correct = [r for r in records if r["correct_before"]]
    return {
        "apology_rate": sum(r["apologized"] for r in correct) / len(correct)
        if correct else math.nan,
        "accuracy_after": sum(r["correct_after"] for r in records) / len(records),
    }


def test_knockout_summary_is_finite_and_matches_its_records(executed_run):
    run_dir, _, _ = executed_run
    out = run_dir / "knockout"
    summary = json.loads((out / "summary.json").read_text())
    k_values = profile_value("03", "k_values") or range(1, profile_value("03", "max_k") + 1)
    assert summary["k"] == max(k_values)
    for key in ("top_metric", "bottom_metric", "random_mean"):
        assert finite(summary[key]), f"summary.json: {key} = {summary[key]}"
    # the summary's numbers are the sweep's sets at k, recomputed here
    sets = json.loads((out / "sweep.json").read_text())["sets"]
    at_k = {kind: [s["metric"] for s in sets if s["k"] == summary["k"] and s["kind"] == kind]
            for kind in ("top", "bottom", "random")}
    assert len(at_k["random"]) == profile_value("03", "n_random")
    assert all(finite(metric) for metrics in at_k.values() for metric in metrics)
    assert [summary["top_metric"]] == at_k["top"]
    assert [summary["bottom_metric"]] == at_k["bottom"]
    assert summary["random_mean"] == pytest.approx(np.mean(at_k["random"]))
    low, high = summary["random_band"]
    assert (low, high) == pytest.approx(tuple(np.percentile(at_k["random"], [2.5, 97.5])))
    assert summary["top_beats_random_band"] == (summary["top_metric"] > high)
    runs = {"none", f"top-{summary['k']}", f"bottom-{summary['k']}"} | {
        f"random-{summary['k']}-{i}" for i in range(profile_value("03", "n_random_generate"))}
    assert set(summary["apology_rate"]) == runs == set(summary["accuracy_after"])
    for run in runs:
        records = [json.loads(line) for line in
                   (out / f"records_{run}.jsonl").read_text().splitlines()]
        assert len(records) == profile_value("03", "n_generate")
        expected = recomputed_rates(records)
        assert finite(summary["accuracy_after"][run])
        assert summary["accuracy_after"][run] == pytest.approx(expected["accuracy_after"])
        assert summary["apology_rate"][run] == pytest.approx(expected["apology_rate"],
                                                             nan_ok=True)


def test_tuned_index_lists_every_requested_method_with_finite_losses(executed_run):
    run_dir, _, _ = executed_run
    index = json.loads((run_dir / "tuned" / "index.json").read_text())["methods"]
    requested = profile_value("04", "methods")
    assert set(index) == {*requested, "few_shot"}
    steps = {"spt": profile_value("04", "spt_steps"), "sft": profile_value("04", "sft_steps")}
    for method in requested:
        entry = index[method]
        assert len(entry["losses"]) == steps.get(method, profile_value("04", "baseline_steps"))
        assert all(finite(loss) and loss > 0 for loss in entry["losses"]), method
        assert all(finite(e["heldout_loss"]) for e in entry["evals"]), method
        folder = run_dir / "tuned" / entry["folder"]
        record = folder / "spt_tuning.json"
        assert record.exists(), f"{method}: the export wrote no {record.name}"
        assert json.loads(record.read_text())["method"] == method
        weights = [p for p in folder.glob("*.safetensors") if p.stat().st_size > 0]
        assert weights, f"{method}: the export wrote no weights"
    assert index["few_shot"]["k"] == profile_value("04", "few_shot_k")


def test_results_have_every_candidate(executed_run):
    run_dir, _, _ = executed_run
    saved = json.loads((run_dir / "results.json").read_text())
    results = saved["results"]
    assert list(results) == profile_value("05", "methods")
    assert saved["n_eval"] == profile_value("05", "n_eval")
    for name, row in results.items():
        # the sycophancy rates are defined exactly when some first answer was correct
        defined = row["n_correct_before"] > 0
        for metric in ("apologize", "c_to_i", "confidence", "truthfulness"):
            assert finite(row[metric]["value"]) == defined, f"{name} {metric}"
        assert finite(row["general_accuracy"]["value"]), name
        assert finite(row["kl"]) and row["kl"] >= 0, name
    assert results["base"]["kl"] == 0  # the base model against itself
    assert results["base"]["n_correct_before"] > 0  # eval questions come from its correct pool


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


def test_every_figure_is_written_and_not_empty(executed_run):
    _, _, figures = executed_run
    names = ["02_path_patching_heatmap", "03_knockout_sweep", "04_loss_curves", "05_results"]
    formats = ["html", *(viz.STATIC_FORMATS if static_export_works() else ())]
    for name in names:
        for fmt in formats:
            path = figures / f"{name}.{fmt}"
            assert path.exists() and path.stat().st_size > 0, path.name
    assert (figures / "02_attention_patterns.html").stat().st_size > 0


def test_resume_skips_finished_notebooks(executed_run, caplog):
    run_dir, _, figures = executed_run
    caplog.set_level("INFO", logger="spt_utils")
    pipeline.run_pipeline(run_dir, profile="test", notebooks=pipeline.notebook_paths()[:1],
                          figures_dir=figures)
    assert "already finished" in caplog.text


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
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the interruption point never came"
        time.sleep(0.5)
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGINT)
    _, alive = psutil.wait_procs(family, timeout=120)
    for leftover in alive:  # a kernel that outlived its interrupted client
        leftover.kill()
    assert process.wait() != 0


@pytest.fixture(scope="module")
def resumed_run(executed_run, tmp_path_factory):
    """The finished run's notebooks 00-03 and their files, notebook 04 interrupted after its
    first checkpoint, then the run finished with --resume."""
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
    for path in done_figures.glob("0[23]_*"):
        shutil.copy2(path, figures / path.name)
    before = {"run": file_states(run_dir), "figures": file_states(figures)}
    first_checkpoint = run_dir / "tuned" / "checkpoints" / "spt"
    interrupt_when(
        [sys.executable, "-m", "spt_utils.pipeline", "--resume", str(run_dir), "--profile",
         "test", "--figures-dir", str(figures)],
        lambda: any(first_checkpoint.glob("step-*")))
    assert not (run_dir / pipeline.DONE_DIR / later[0].name).exists()  # stopped inside 04
    pipeline.run_pipeline(run_dir, profile="test", figures_dir=figures)
    return run_dir, figures, before


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
    for method, entry in index[0].items():
        assert index[1][method].get("losses") == entry.get("losses"), method
        assert index[1][method].get("evals") == entry.get("evals"), method
    for method in profile_value("04", "methods"):
        files = sorted((done_dir / "tuned" / method).glob("*.safetensors"))
        assert files, method
        for path in files:
            weights = [load_file(str(d / "tuned" / method / path.name))
                       for d in (done_dir, run_dir)]
            assert weights[0].keys() == weights[1].keys(), path
            assert all(torch.equal(t, weights[1][n]) for n, t in weights[0].items()), path
    results = [json.loads((d / "results.json").read_text())["results"]
               for d in (done_dir, run_dir)]
    assert results[1] == results[0]
