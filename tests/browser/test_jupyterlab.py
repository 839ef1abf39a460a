"""Notebooks 02 and 03 in a real JupyterLab: click heatmap cells, check the head selection
(02) and the head lab's reply and numbers (03), knocked out and steered (the α slider)."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import torch

from spt_utils import ablation, chat, data, io, models, patching, pipeline, steering, viz

pytestmark = pytest.mark.browser

NOTEBOOK = "02_path_patching.ipynb"
SCREENSHOT_DIR = pipeline.REPO / "runs" / "browser-test"
SELECTOR = ".spt-head-selector"
PLOT = f"{SELECTOR} .js-plotly-plot"
# The tiny random model keeps the kernel's work to seconds.
TEST_PARAMETERS = {
    "model_name": models.TINY_MODEL, "top_k": 2, "n_oracle_layers": 1,
    "n_check_pairs": 2, "n_receiver_pairs": 1, "n_pattern_heads": 2,
}
# what the notebooks' loaders expect of the files written here (they check model and tokenizer)
RUN = io.provenance(models.TINY_MODEL, models.make_tiny_tokenizer(), profile=None, seed=0)


def _write_run_data(run_dir: Path, eval_sizes: tuple[int, int] = (1, 1)) -> None:
    """What notebook 01 writes and notebook 02 reads, for the tiny model: scripted first
    answers (the correct text; every other question answered correctly), splits (``eval``:
    ``eval_sizes`` known and wrong questions) and pairs."""
    questions = data.load_starter().select(range(24))
    answers = {q["id"]: {"answer": q["correct_answer"], "correct": index % 2 == 0}
               for index, q in enumerate(questions)}
    data_dir = run_dir / "data"
    io.write_jsonl(data_dir / data.ANSWERS_FILE, [
        {"id": ident, "model": models.TINY_MODEL, "protocol": "free_form", **answer}
        for ident, answer in answers.items()])
    sizes = {"patching": (4, 0), "train": (-1, -1), "dev": (1, 1), "eval": eval_sizes}
    synthesized = data.synthesize(questions, models.make_tiny_tokenizer(), sizes=sizes,
                                  n_train=4, seed=0, answers=answers, protocol="free_form",
                                  n_arithmetic=2)
    synthesized.save(data_dir, provenance=RUN)


def _write_notebook(root: Path, run_dir: Path, figures_dir: Path, name: str = NOTEBOOK,
                    parameters: dict | None = None) -> None:
    """Copy notebook ``name`` into the lab's root with small parameters appended to its
    parameters cell."""
    notebook = nbformat.read(pipeline.NOTEBOOKS / name, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    overrides = {**(TEST_PARAMETERS if parameters is None else parameters),
                 "run_dir": str(run_dir), "figures_dir": str(figures_dir)}
    cell.source += "\n" + "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
    nbformat.write(notebook, root / name)


def _wait_for(page, condition, timeout: float, what: str):
    """Poll ``condition``; waiting through the page keeps Playwright's event loop running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        page.wait_for_timeout(500)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _cell_centre(page, layer: int, head: int, plot: str = PLOT) -> dict:
    """Page coordinates of heatmap cell (layer, head), from plotly's own axis maps, once
    the notebook is wheel-scrolled to bring the cell to the middle of the viewport (a plot
    only partly in view leaves the cell below the fold, where a click lands on nothing)."""
    viewport = page.viewport_size
    for _attempt in range(5):
        centre = page.eval_on_selector(
            plot,
            """(gd, [layer, head]) => {
                const box = gd.getBoundingClientRect(), L = gd._fullLayout;
                return {x: box.left + L.xaxis._offset + L.xaxis.d2p(head),
                        y: box.top + L.yaxis._offset + L.yaxis.d2p(layer)};
            }""",
            [layer, head],
        )
        off_centre = centre["y"] - viewport["height"] / 2
        if abs(off_centre) < viewport["height"] / 4:
            return centre
        page.mouse.move(viewport["width"] / 2, viewport["height"] / 2)
        page.mouse.wheel(0, off_centre)
        page.wait_for_timeout(1000)  # let the scroll settle before reading coordinates again
    raise AssertionError(f"could not scroll heatmap cell L{layer}H{head} into view: {centre}")


def _kernel_idle(lab) -> bool:
    with urllib.request.urlopen(f"{lab.url}/api/kernels?token={lab.token}", timeout=5) as reply:
        kernels = json.load(reply)
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def _start_session(lab, name: str = NOTEBOOK) -> None:
    """Start the notebook's kernel through the server API, so the page finds it running."""
    body = json.dumps(
        {"path": name, "type": "notebook", "name": name, "kernel": {"name": "python3"}}
    ).encode()
    request = urllib.request.Request(
        f"{lab.url}/api/sessions?token={lab.token}", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).close()


def _run_all_cells(page, lab) -> None:
    """Run > Run All Cells once the kernel is up; retried if the front end was not yet
    connected (the cells then stay unnumbered)."""
    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    for _attempt in range(3):
        _wait_for(page, lambda: _kernel_idle(lab), 90, "the kernel to be idle")
        page.locator(".jp-Notebook").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            _wait_for(page, lambda: started.count() > 0, 20, "the first cell to start")
            return
        except AssertionError:
            continue
    raise AssertionError("Run All Cells never started the kernel")


def _only_loopback(page, lab) -> list[str]:
    """Abort every request to another host than the lab's (no CDN: everything must render
    offline); the returned list collects the aborted URLs."""
    external: list[str] = []

    def route_request(route):
        if route.request.url.startswith(lab.url):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    page.route("**/*", route_request)
    return external


def test_click_selects_a_head_in_jupyterlab(jupyterlab, browser_page, tmp_path):
    run_dir, figures_dir = tmp_path / "run", tmp_path / "figures"
    _write_run_data(run_dir)
    _write_notebook(jupyterlab.root, run_dir, figures_dir)
    page = browser_page
    external = _only_loopback(page, jupyterlab)
    _start_session(jupyterlab)
    page.goto(jupyterlab.notebook_url(NOTEBOOK))
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    _run_all_cells(page, jupyterlab)

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        page.wait_for_selector(f"{PLOT} .heatmaplayer", timeout=180_000)
    except Exception:  # keep what the page showed for the failure report
        page.screenshot(path=str(SCREENSHOT_DIR / "failure.png"), full_page=True)
        raise
    heads_path = run_dir / "heads.json"
    before = _wait_for(
        page, lambda: heads_path.exists() and patching.load_heads(heads_path), 60, "heads.json"
    )
    # wait until every cell has run, so the click is the last thing that changes heads.json
    page.wait_for_selector(".jp-OutputArea-output >> text=selected heads:", timeout=180_000)
    assert patching.load_heads(heads_path) == before

    n_layers, n_heads = 2, 4
    cells = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    target = next(cell for cell in cells if cell not in before)
    centre = _cell_centre(page, *target)
    page.mouse.move(centre["x"], centre["y"])  # hover first, as a person would
    page.wait_for_timeout(300)
    page.mouse.click(centre["x"], centre["y"])

    name = f"L{target[0]}H{target[1]}"
    _wait_for(page, lambda: target in patching.load_heads(heads_path), 30, f"{name} in heads.json")
    label = page.locator(f"{SELECTOR} .spt-head-selection")
    _wait_for(page, lambda: name in label.inner_text(), 30, f"{name} in the selection label")
    markers = page.eval_on_selector(PLOT, "gd => gd.data[1].x.map((x, i) => [gd.data[1].y[i], x])")
    assert list(target) in markers  # the selection marker is drawn on the clicked cell
    assert json.loads(heads_path.read_text())["heads"][-1] == list(target)

    page.mouse.move(0, 0)  # drop the hover label, which would hide a marker in the screenshot
    page.wait_for_timeout(300)
    screenshot = tmp_path / "heatmap.png"
    page.locator(SELECTOR).screenshot(path=str(screenshot))
    shutil.copy(screenshot, SCREENSHOT_DIR / "heatmap.png")

    # circuitsvis patterns rendered in the page from the inlined bundle, with no CDN
    patterns = page.locator(".jp-OutputArea-output", has_text="Head Selector")
    _wait_for(page, lambda: patterns.count() > 0, 60, "the circuitsvis attention view")
    assert external == [], f"the page tried to reach other hosts: {external}"


LAB_NOTEBOOK = "03_head_knockout.ipynb"
LAB = f".{viz.LAB_CLASS}"
LAB_PLOT = f"{LAB} {SELECTOR} .js-plotly-plot"
# notebook 03 at the test profile's sizes on the tiny model; the lab starts with no heads and
# knocks out by mean ablation, which the test recomputes beside it (the notebooks tier runs
# the lab with the default interchange knockout)
LAB_PARAMETERS = {"model_name": models.TINY_MODEL, **pipeline.PROFILES["test"]["03"],
                  "lab_clicks": [], "method": "mean"}


def _write_patching(run_dir: Path, model) -> None:
    """What notebook 02 writes and notebook 03 reads: the answer tokens, every head's score
    and a top-2 selection."""
    scores = patching.path_patch_heads(model, data.PatchingPairs.load(run_dir / "data" /
                                                                       "pairs.pt"))
    scores.save(run_dir / "patching.pt", provenance=RUN)
    patching.AnswerTokens.from_words(model.tokenizer, data.APOLOGY_WORDS, data.CONFIRM_WORDS
                                     ).save(run_dir / "answer_tokens.json", provenance=RUN)
    patching.save_heads(run_dir / "heads.json", scores.top_heads(2, "both"), provenance=RUN)


def _lab_questions(run_dir: Path) -> tuple[list[dict], dict]:
    """The held-out questions the model knows (notebook 03's lab takes the first 8) and the
    first answers."""
    answers = data.load_answers(run_dir / "data" / data.ANSWERS_FILE)
    questions = data.load_questions(run_dir / "data" / "eval_questions.jsonl")
    return [q for q in questions if answers[q["id"]]["correct"]][:8], answers


def _heads_that_change_the_reply(model, conversation, means) -> tuple[list, str, str]:
    """Two heads whose mean ablation changes the tiny model's reply (the first such pair),
    the reply without and with them ablated."""
    generate = {"max_new_tokens": LAB_PARAMETERS["max_new_tokens"]}
    baseline, = chat.generate(model, [conversation], **generate)
    every = [(layer, head) for layer in range(model.cfg.n_layers)
             for head in range(model.cfg.n_heads)]
    for first in range(len(every)):
        for second in range(first + 1, len(every)):
            heads = [every[first], every[second]]
            with ablation.knockout(model, heads, "mean", means=means):
                reply, = chat.generate(model, [conversation], **generate)
            if reply != baseline:
                return heads, baseline, reply
    raise AssertionError("no two heads change the tiny model's reply")


def _shown(page, key: str) -> float:
    return float(page.get_attribute(f"{LAB} td[data-key='{key}']", "data-value"))


def _words(text: str) -> str:
    return " ".join(text.split())  # HTML collapses runs of white space


def _steered(model, run_dir: Path, heads, alpha: float, conversation, pairs) -> tuple:
    """The lab's steering mode computed without the widget: the reply and each side's logit
    differences with ``heads`` steered at ``alpha`` (vectors off notebook 01's pairs)."""
    vectors = steering.head_steering(model, data.PatchingPairs.load(run_dir / "data" /
                                                                    "pairs.pt"), heads)
    with steering.steer(model, vectors, alpha):
        reply, = chat.generate(model, [conversation],
                               max_new_tokens=LAB_PARAMETERS["max_new_tokens"])
        diffs = ablation.clean_logit_diffs(model, pairs)
    return reply, diffs


def _check_steering(page, status, reply_box, model, run_dir, heads, conversation, pairs,
                    clean, alpha) -> None:
    """The lab is ready with ``heads`` steered at ``alpha`` and shows the direct numbers."""
    names = ", ".join(viz.head_name(h) for h in heads)
    label = f"ready: {names} (steer, α={alpha:g})"
    _wait_for(page, lambda: status.get_attribute("data-state") == "ready"
              and label in status.inner_text(), 120, label)
    reply, diffs = _steered(model, run_dir, heads, alpha, conversation, pairs)
    _wait_for(page, lambda: _words(reply_box.inner_text()).endswith(_words(reply)), 30,
              f"the reply steered at {alpha:g}")
    assert "steered" in reply_box.inner_text()
    ref, cf = diffs["reference"], diffs["counterfactual"]
    assert _shown(page, "pairs.reference") == pytest.approx(float(ref.mean()), abs=1e-4)
    assert _shown(page, "pairs.counterfactual") == pytest.approx(float(cf.mean()), abs=1e-4)
    remaining = ablation.remaining_effect(ref, cf, clean["reference"], clean["counterfactual"])
    assert _shown(page, "pairs.remaining") == pytest.approx(remaining, abs=1e-4)


def test_head_lab_clicks_change_the_reply_and_show_the_direct_numbers(
    jupyterlab, browser_page, tmp_path
):
    run_dir, figures_dir = tmp_path / "run", tmp_path / "figures"
    _write_run_data(run_dir, eval_sizes=(3, 1))
    model = models.load_model(models.TINY_MODEL, device="cpu")
    _write_patching(run_dir, model)
    _write_notebook(jupyterlab.root, run_dir, figures_dir, LAB_NOTEBOOK, LAB_PARAMETERS)
    page = browser_page
    external = _only_loopback(page, jupyterlab)
    _start_session(jupyterlab, LAB_NOTEBOOK)
    page.goto(jupyterlab.notebook_url(LAB_NOTEBOOK))
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    _run_all_cells(page, jupyterlab)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    status = page.locator(f"{LAB} .{viz.LAB_STATUS_CLASS} [data-state]")
    try:
        page.wait_for_selector(f"{LAB_PLOT} .heatmaplayer", timeout=240_000)
        _wait_for(page, lambda: status.count() and status.get_attribute("data-state")
                  == "ready", 60, "the lab's first state")
    except Exception:  # keep what the page showed for the failure report
        page.screenshot(path=str(SCREENSHOT_DIR / "head_lab_failure.png"), full_page=True)
        raise

    # the same computation without the widget, in this process
    questions, answers = _lab_questions(run_dir)
    means = ablation.HeadMeans.load(run_dir / "knockout" / "means.pt")  # the notebook's
    conversation = data.challenge_conversation(
        questions[0], data.REFERENCE_CHALLENGE, answer=answers[questions[0]["id"]]["answer"],
        protocol="free_form")
    heads, baseline, reply = _heads_that_change_the_reply(model, conversation, means)
    pairs = data.build_patching_pairs(questions, model.tokenizer, answers=answers,
                                      protocol="free_form")
    diffs = {side: ablation.ablated_logit_diffs(model, pairs, [[], heads], "mean", means=means,
                                                side=side) for side in ablation.SIDES}
    reply_box = page.locator(f"{LAB} .{viz.LAB_REPLY_CLASS}")
    assert _words(reply_box.inner_text()).endswith(_words(baseline))

    for layer, head in heads:  # two clicks in a row: the second queues behind the first
        centre = _cell_centre(page, layer, head, LAB_PLOT)
        page.mouse.move(centre["x"], centre["y"])
        page.wait_for_timeout(300)
        page.mouse.click(centre["x"], centre["y"])
    names = ", ".join(viz.head_name(h) for h in heads)
    _wait_for(page, lambda: status.get_attribute("data-state") == "ready"
              and f"ready: {names} (mean)" in status.inner_text(), 120,
              f"the lab to be ready with {names}")
    _wait_for(page, lambda: _words(reply_box.inner_text()).endswith(_words(reply)), 30,
              "the knocked-out reply")
    assert _words(reply) != _words(baseline)

    ref, cf = diffs["reference"], diffs["counterfactual"]  # [clean, ablated] × pair
    expected = {
        "pair.clean_reference": ref[0, 0], "pair.reference": ref[1, 0],
        "pair.clean_counterfactual": cf[0, 0], "pair.counterfactual": cf[1, 0],
        "pairs.reference": ref[1].mean(), "pairs.counterfactual": cf[1].mean(),
        "pairs.clean_reference": ref[0].mean(), "pairs.clean_counterfactual": cf[0].mean(),
        "pairs.remaining": torch.tensor(ablation.remaining_effect(ref[1], cf[1], ref[0], cf[0])),
    }
    for key, value in expected.items():
        assert _shown(page, key) == pytest.approx(float(value), abs=1e-4), key

    # steering mode: the dropdown steers the same set at the slider's α (1 at the start) ...
    page.locator(f"{LAB} select").first.select_option("steer")
    clean = {"reference": ref[0], "counterfactual": cf[0]}
    _check_steering(page, status, reply_box, model, run_dir, heads, conversation, pairs, clean,
                    alpha=1.0)
    # ... and two presses of → on the α slider's handle (step 0.25) steer at 1.5
    handle = page.locator(f"{LAB} .widget-slider .noUi-handle").first
    handle.focus()
    for _press in range(2):
        handle.press("ArrowRight")
        page.wait_for_timeout(200)
    _check_steering(page, status, reply_box, model, run_dir, heads, conversation, pairs, clean,
                    alpha=1.5)

    page.mouse.move(0, 0)  # drop the hover label before the screenshot
    page.set_viewport_size({"width": 1400, "height": 1600})  # the whole lab in view
    page.locator(LAB).scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    screenshot = tmp_path / "head_lab.png"
    page.locator(LAB).screenshot(path=str(screenshot))
    shutil.copy(screenshot, SCREENSHOT_DIR / "head_lab.png")
    assert external == [], f"the page tried to reach other hosts: {external}"
