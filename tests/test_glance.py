"""The README's results block (``scripts/glance.py``): written from the run of record's
summaries in ``docs/record/``, so it cannot drift from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def glance():
    spec = importlib.util.spec_from_file_location("glance", REPO / "scripts" / "glance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_block_is_the_scripts_output_for_the_committed_run_of_record(glance):
    readme = (REPO / "README.md").read_text()
    written = readme.split(glance.BEGIN + "\n", 1)[1].split(glance.END, 1)[0]
    assert written == glance.block(glance.load(glance.RECORD))


def test_the_block_reads_its_numbers_from_the_summaries(glance, tmp_path):
    for name in glance.RECORD_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((glance.RECORD / name).read_text())
    summary = json.loads((tmp_path / "knockout/summary.json").read_text())
    summary["verdict"] = "A VERDICT OF NO RUN"
    (tmp_path / "knockout/summary.json").write_text(json.dumps(summary))
    assert "verdict **A VERDICT OF NO RUN**" in glance.block(glance.load(tmp_path))
    (tmp_path / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        glance.load(tmp_path)


def test_the_block_names_failed_and_undecided_parts_of_the_claim(glance):
    saved = glance.load(glance.RECORD)
    claim = saved["results.json"]["claim"]
    keys = list(claim["checks"])
    claim["checks"] = {key: {**check, "passed": True} for key, check in claim["checks"].items()}
    claim["checks"][keys[1]]["passed"] = None
    claim["holds"] = None
    assert f"**is undecided at this n** (undecided: {keys[1]})." in glance.block(saved)
    claim["checks"][keys[0]]["passed"], claim["holds"] = False, False
    assert (f"**does not hold** (failed: {keys[0]}) (undecided: {keys[1]})."
            in glance.block(saved))


def test_rewrite_replaces_only_the_block(glance, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{glance.BEGIN}\nold\n{glance.END}\n\n## Rest\n")
    glance.rewrite(readme, "new\n")
    assert readme.read_text() == f"# Title\n\n{glance.BEGIN}\nnew\n{glance.END}\n\n## Rest\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- glance --> … <!-- /glance --> markers"):
        glance.rewrite(readme, "new\n")
