"""Notebook 02 in a real JupyterLab: run it, click a heatmap cell, check the selection."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from spt_utils import data, io, models, patching, pipeline

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


def _write_run_data(run_dir: Path) -> None:
    """What notebook 01 writes and notebook 02 reads, for the tiny model: scripted first
    answers (the correct text; every other question answered correctly), splits and pairs."""
    questions = data.load_starter().select(range(24))
    answers = {q["id"]: {"answer": q["correct_answer"], "correct": index % 2 == 0}
               for index, q in enumerate(questions)}
    data_dir = run_dir / "data"
    io.write_jsonl(data_dir / data.ANSWERS_FILE, [
        {"id": ident, "model": models.TINY_MODEL, "protocol": "free_form", **answer}
        for ident, answer in answers.items()])
    sizes = {"patching": (4, 0), "train": (-1, -1), "dev": (1, 1), "eval": (1, 1)}
    data.synthesize(questions, models.make_tiny_tokenizer(), sizes=sizes, n_train=4, seed=0,
                    answers=answers, protocol="free_form", n_arithmetic=2).save(data_dir)


def _write_notebook(root: Path, run_dir: Path, figures_dir: Path) -> None:
    """Copy notebook 02 into the lab's root with small parameters appended to its cell."""
    notebook = nbformat.read(pipeline.NOTEBOOKS / NOTEBOOK, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    overrides = {**TEST_PARAMETERS, "run_dir": str(run_dir), "figures_dir": str(figures_dir)}
    cell.source += "\n" + "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
    nbformat.write(notebook, root / NOTEBOOK)


def _wait_for(page, condition, timeout: float, what: str):
    """Poll ``condition``; waiting through the page keeps Playwright's event loop running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        page.wait_for_timeout(500)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _cell_centre(page, layer: int, head: int) -> dict:
    """Page coordinates of heatmap cell (layer, head), from plotly's own axis maps."""
    return page.eval_on_selector(
        PLOT,
        """(gd, [layer, head]) => {
            const box = gd.getBoundingClientRect(), L = gd._fullLayout;
            return {x: box.left + L.xaxis._offset + L.xaxis.d2p(head),
                    y: box.top + L.yaxis._offset + L.yaxis.d2p(layer)};
        }""",
        [layer, head],
    )


def _kernel_idle(lab) -> bool:
    with urllib.request.urlopen(f"{lab.url}/api/kernels?token={lab.token}", timeout=5) as reply:
        kernels = json.load(reply)
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def _start_session(lab) -> None:
    """Start the notebook's kernel through the server API, so the page finds it running."""
    body = json.dumps(
        {"path": NOTEBOOK, "type": "notebook", "name": NOTEBOOK, "kernel": {"name": "python3"}}
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


def test_click_selects_a_head_in_jupyterlab(jupyterlab, browser_page, tmp_path):
    run_dir, figures_dir = tmp_path / "run", tmp_path / "figures"
    _write_run_data(run_dir)
    _write_notebook(jupyterlab.root, run_dir, figures_dir)
    page = browser_page
    external: list[str] = []

    def only_loopback(route):
        if route.request.url.startswith(jupyterlab.url):
            route.continue_()
        else:  # no CDN or any other host: everything must render offline
            external.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
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
    page.locator(PLOT).scroll_into_view_if_needed()
    page.wait_for_timeout(1000)  # let the scroll settle before reading coordinates
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
