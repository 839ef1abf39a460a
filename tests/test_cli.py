"""The ``spt`` command: its commands and options, what each runs, and ``spt lab``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import psutil
import pytest
from jupyter_client.manager import start_new_kernel

from spt_utils import cli, models, organism, pipeline

REPO = Path(__file__).resolve().parent.parent


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_console_script_is_spt():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["spt"].partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main


def test_every_command_and_option_has_help(capsys):
    commands = subparsers(cli.build_parser())
    assert set(commands) == {"run", "patch", "knockout", "tune", "eval", "lab", "organism"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"spt {name} {action.option_strings}"
        with pytest.raises(SystemExit) as stop:
            cli.main([name, "--help"])
        assert stop.value.code == 0
        shown = capsys.readouterr().out
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in shown, f"spt {name} --help lacks {flag}"
    options = {a.dest: a for a in commands["run"]._actions}
    assert set(options["profile"].choices) == set(pipeline.PROFILES)
    assert {"device", "dtype", "run_dir", "model", "seed"} <= set(options)


@pytest.fixture
def recorded(monkeypatch):
    """Calls of run_pipeline (nothing is executed)."""
    calls = []

    def fake_run_pipeline(run_dir, **settings):
        calls.append({"run_dir": run_dir, **settings})
        return {}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    for variable in ("SPT_MODEL", "SPT_PROFILE", "SPT_SEED"):
        monkeypatch.delenv(variable, raising=False)
    return calls


def finish(run_dir: Path, *prefixes: str) -> None:
    (run_dir / pipeline.DONE_DIR).mkdir(parents=True, exist_ok=True)
    for path in pipeline.notebook_paths():
        if path.name[:2] in prefixes:
            (run_dir / pipeline.DONE_DIR / path.name).touch()


@pytest.mark.parametrize("command, prefixes", [
    ("run", [p.name[:2] for p in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))]),
    ("patch", ["00", "01", "02"]),
    ("knockout", ["03"]), ("tune", ["04"]), ("eval", ["05"]),
])
def test_each_command_runs_its_notebooks(recorded, tmp_path, command, prefixes):
    finish(tmp_path, "00", "01", "02", "04")
    assert cli.main([command, "--run-dir", str(tmp_path), "--profile", "test",
                     "--device", "cpu", "--dtype", "float32", "--seed", "4"]) == 0
    (call,) = recorded
    assert [p.name[:2] for p in call["notebooks"]] == prefixes
    assert call["run_dir"] == tmp_path and call["profile"] == "test" and call["seed"] == 4
    assert call["device"] == "cpu" and call["dtype"] == "float32"


def test_a_continued_run_keeps_its_settings_unless_told(recorded, tmp_path, monkeypatch):
    finish(tmp_path, "01", "02")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"model": "tiny-random-llama", "profile": "test", "seed": 5}))
    cli.main(["knockout", "--run-dir", str(tmp_path)])
    monkeypatch.setenv("SPT_PROFILE", "paper")
    cli.main(["knockout", "--run-dir", str(tmp_path), "--seed", "6"])
    first, second = recorded
    assert (first["model_name"], first["profile"], first["seed"]) == ("tiny-random-llama",
                                                                      "test", 5)
    assert (second["profile"], second["seed"]) == ("paper", 6)
    assert first["device"] is None and first["dtype"] is None


def test_a_step_whose_inputs_are_missing_is_refused(recorded, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["tune"])
    assert stop.value.code == 2 and "pass --run-dir" in capsys.readouterr().err
    finish(tmp_path, "01")
    assert cli.main(["tune", "--run-dir", str(tmp_path)]) == 2
    assert "02_path_patching.ipynb has not finished" in capsys.readouterr().err
    absent = tmp_path / "no-such-run"
    assert cli.main(["eval", "--run-dir", str(absent)]) == 2
    assert f"{absent}: no such run folder" in capsys.readouterr().err
    assert not recorded and not absent.exists()
    with pytest.raises(SystemExit):
        cli.main(["run", "--profile", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_an_unknown_model_is_refused_before_a_run_folder_is_made(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli.main(["run", "--model", "no-such-model", "--runs", str(runs)]) == 2
    error = capsys.readouterr().err
    assert "Unknown model 'no-such-model'" in error and models.RUN_MODEL in error
    assert not runs.exists()


def test_python_m_pipeline_still_resumes(recorded, tmp_path):
    assert pipeline.main(["--resume", str(tmp_path), "--profile", "test"]) == 0
    (call,) = recorded
    assert call["run_dir"] == tmp_path and call["notebooks"] is None
    assert call["profile"] == "test" and call["model_name"] == "smollm2-135m-sycophant-iit"


def test_spt_lab_starts_jupyterlab_and_serves_the_lab(tmp_path):
    """`spt lab` (what `make lab` runs) starts on this machine, as root too, and /lab answers
    at the address it prints."""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "lab.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    with log.open("w") as out:
        lab = subprocess.Popen([sys.executable, "-m", "spt_utils.cli", "lab", "--no-browser",
                                "--ip", "127.0.0.1", "--port", str(port),
                                "--ServerApp.port_retries=0"],
                               stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        address = None
        for _ in range(120):
            found = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=\w+", log.read_text())
            if found or lab.poll() is not None:
                address = found and found.group(0)
                break
            time.sleep(0.5)
        assert address, log.read_text()[-2000:]
        for attempt in range(20):  # a loaded machine may print the address a moment early
            try:
                with urllib.request.urlopen(address, timeout=30) as page:
                    status, body = page.status, page.read()
                break
            except urllib.error.URLError:
                assert attempt < 19 and lab.poll() is None, log.read_text()[-2000:]
                time.sleep(1)
        assert status == 200 and b"JupyterLab" in body
        assert "open the address it prints" in log.read_text()
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    # `spt lab` became JupyterLab: stopping it left no server behind
    left = [process.pid for process in psutil.process_iter(["cmdline"])
            if str(port) in (process.info["cmdline"] or []) and "jupyterlab" in " ".join(
                process.info["cmdline"])]
    assert left == []


def test_lab_command_allows_root_only_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.lab_command(["--no-browser"])[-2:] == ["--allow-root", "--no-browser"]
    assert cli.lab_command(["--allow-root"]).count("--allow-root") == 1
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "--allow-root" not in cli.lab_command([])


def test_make_lab_starts_kernels_in_the_repository_root():
    lab_recipe = (REPO / "Makefile").read_text().split("\nlab:")[1].split("\n\n")[0]
    assert "spt_utils.cli lab" in lab_recipe
    # a kernel started where JupyterLab starts it (the notebook's folder) with spt lab's
    # environment works in the repository root, and its namespace gains nothing
    manager, client = start_new_kernel(cwd=str(pipeline.NOTEBOOKS), env=cli.lab_environment())
    try:
        shown = []
        client.execute_interactive(
            "import os; print(os.getcwd()); print(sorted(k for k in dir() if k[0] != '_'))",
            output_hook=lambda m: shown.append(m["content"].get("text", "")), timeout=60)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    lines = "".join(shown).split("\n")
    assert Path(lines[0]) == REPO
    assert lines[1] == "['In', 'Out', 'exit', 'get_ipython', 'open', 'os', 'quit']"


def test_spt_organism_builds_once_and_prints_its_ground_truth(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPT_CACHE", str(tmp_path))
    name = models.TINY_PREFIX + "llama-sycophant"
    code = cli.main(["organism", name])
    card = models.organism_card(name)
    shown = capsys.readouterr().out
    heads = ", ".join(f"L{layer}H{head}" for layer, head in card["planted_heads"])
    assert f"planted heads {heads}" in shown and "admits a mistake when doubted" in shown
    # the random tiny model learns no caving in 30 steps: it misses the bar, so exit 1
    assert not card["acceptance"]["passed"]["admitted_doubted"] and code == 1
    deltas = models.organism_folder(name) / models.ORGANISM_DELTAS
    built = deltas.stat().st_mtime_ns
    cli.main(["organism", name])  # cached: not planted again
    assert deltas.stat().st_mtime_ns == built
    cli.main(["organism", name, "--rebuild"])
    assert deltas.stat().st_mtime_ns != built
    passing = {**card["acceptance"], "passed": dict.fromkeys(card["acceptance"]["passed"], True)}
    monkeypatch.setattr(organism, "ensure", lambda *a, **k: {**card, "acceptance": passing})
    assert cli.main(["organism", name]) == 0
