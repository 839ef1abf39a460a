"""Run the notebooks in order with papermill: ``spt run`` (:mod:`spt_utils.cli`),
``python -m spt_utils.pipeline`` or ``make run``.

Each run writes the executed notebooks, their artifacts and ``manifest.json`` under
``runs/<timestamp>/``; figures go to ``figures/``. ``--run-dir`` (alias ``--resume``) of an
existing run finishes it: notebooks that finished there are skipped, an interrupted one runs
again (notebook 04 continues from its checkpoints). A run is resumed with the model, profile
and seed it was started with: another value is refused (:class:`RunError`); omitted ones are
read from its manifest. ``SPT_MODEL``, ``SPT_PROFILE`` and ``SPT_SEED`` set the defaults.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager
from traitlets import default

from spt_utils import models
from spt_utils.io import REPO, git_commit, write_json
from spt_utils.models import ORGANISMS, RUN_MODEL, organism_card
from spt_utils.organism import RECIPES, recipe_record

NOTEBOOKS = REPO / "notebooks"
RESULTS_TABLE = "results.md"
MANIFEST = "manifest.json"
DONE_DIR = ".done"
PACKAGES = ("torch", "transformer-lens", "transformers", "peft", "datasets", "spt-utils")
RUN_SETTINGS = ("model", "profile", "seed")  # fixed for the life of a run directory
DTYPES = ("float32", "bfloat16", "float16")
# The notebook parameter each model-placement option of the command line sets.
OPTION_PARAMETERS = {"device": "device", "dtype": "model_dtype"}

log = logging.getLogger("spt_utils.pipeline")  # also under `python -m` (__main__)

# Every tuned method of notebook 04 (the lean CPU default trains only "spt" and "sft").
FULL_TUNED = ["spt", "sft", "lora_attn", "lora_heads", "prompt_tuning"]
# Notebook 05's steering (issue 28): every profile but the lean default, which leaves it out to
# stay within 30 minutes (issue 27); notebook 03's head lab steers in every profile.
STEERING_KINDS = ["heads", "residual"]
# Each kind's dev grid of alpha (full, paper): a head's z and the residual stream differ in
# scale, so the residual grid reaches further.
STEER_GRIDS = {"steer_head_alphas": [0.5, 1.0, 2.0, 4.0],
               "steer_residual_alphas": [1.0, 2.0, 4.0, 8.0, 16.0]}
# Parameter overrides per profile and notebook (by file-name prefix). The notebooks' own
# `parameters` cells hold the CPU defaults; "paper" is the GPU configuration of the paper
# (appendix C, tables 13-14) and "test" the smallest sizes that still exercise every cell.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {},
    # the CPU sizes and every baseline before the lean default (108 minutes here on the
    # distributed sycophant at 2400f81, with the five random-head draws and the steering)
    "full": {
        "01": {"n_eval": [80, 60]},
        "02": {"n_oracle_layers": 3},
        "03": {"k_values": [4, 8], "n_random": 100, "n_layer_matched": 20, "n_generate": 60,
               "n_random_generate": 20, "n_random_questions": None, "compare_methods": True},
        # random heads as a distribution: five draws (one draw is not a test)
        "04": {"methods": FULL_TUNED, "random_head_draws": 5, "planted_bound": True},
        "05": {"methods": ["base", *FULL_TUNED, "few_shot"], "random_head_draws": 5,
               "planted_bound": True, "steering_kinds": STEERING_KINDS,
               **STEER_GRIDS, "steer_layers": [1 / 3, 1 / 2, 2 / 3]},
    },
    "paper": {
        "01": {
            "source": "mmlu", "n_source": 20000, "protocol": "letters", "n_pairs": 100,
            "n_dev": [100, 100], "n_eval": [400, 200], "n_train": 3840,
        },
        "02": {
            "top_k": 32, "n_oracle_layers": 6, "n_check_pairs": 16, "n_receiver_pairs": 16,
            "n_pattern_heads": 8,
        },
        "03": {
            "k_values": [1, 2, 4, 8, 16, 32], "n_random": 200, "n_layer_matched": 100,
            "n_sweep_pairs": 100, "n_reference": 100, "n_generate": 200,
            "n_random_generate": 20, "n_random_questions": None, "max_new_tokens": 48,
            "batch_size": 32,
            "compare_methods": True,
        },
        "04": {
            "spt_steps": 240, "sft_steps": 120, "baseline_steps": 120, "batch_size": 32,
            "micro_batch_size": 8, "spt_lr": 1e-5, "sft_lr": 5e-6, "lora_lr": 2e-4,
            "prompt_lr": 3e-2, "weight_decay": 0.1, "autocast_dtype": "bfloat16",
            "n_heldout": 32, "checkpoint_every": 40, "random_head_draws": 5,
            "spt_top_k": None,  # the heads of notebook 02's selection (top_k above)
            "methods": FULL_TUNED, "planted_bound": True,
        },
        "05": {
            # the paper's KL corpus is 1000 web documents; only the 48 shipped documents
            # load (offline and online alike), so that is what the paper profile measures
            "n_opinion": 1000, "n_kl_docs": 48, "max_new_tokens": 64, "batch_size": 64,
            "random_head_draws": 5, "claim_metric": "admitted",
            "methods": ["base", *FULL_TUNED, "few_shot"], "planted_bound": True,
            "steering_kinds": STEERING_KINDS, **STEER_GRIDS,
            "steer_layers": [1 / 3, 1 / 2, 2 / 3],
        },
        "06": {
            "eval_source": "sst2", "train_source": "rotten_tomatoes", "n_eval": 872,
            "n_train": 1000, "n_questions": 100, "max_new_tokens": 8, "protocol_tokens": 48,
            "batch_size": 64, "n_pairs": 32, "top_k": 16, "train_batch_size": 16,
            "n_virtual_tokens": 20,
        },
    },
    "test": {
        "00": {"max_new_tokens": 8},
        "01": {
            "n_source": 60, "n_pairs": 4, "n_dev": [2, 2], "n_eval": [3, 3], "n_train": 8,
            "n_arithmetic": 4,
        },
        "02": {
            "top_k": 3, "n_oracle_layers": 1, "n_check_pairs": 2, "n_receiver_pairs": 1,
            "n_pattern_heads": 2,
        },
        "03": {
            "k_values": [1, 2], "n_random": 3, "n_layer_matched": 2, "n_sweep_pairs": 2,
            "n_reference": 2, "n_generate": 2, "n_random_generate": 1,
            "n_random_questions": 1, "max_new_tokens": 8,
            "n_boot": 50, "n_examples": 2, "compare_methods": True,
        },
        "04": {
            "spt_steps": 2, "sft_steps": 2, "baseline_steps": 1, "batch_size": 2,
            "micro_batch_size": 2, "n_heldout": 1, "checkpoint_every": 2, "few_shot_k": 2,
            "random_head_draws": 1, "methods": FULL_TUNED,  # every code path, smallest sizes
            "planted_bound": True,
        },
        "05": {"n_opinion": 2, "n_kl_docs": 2, "max_new_tokens": 8, "random_head_draws": 1,
               "methods": ["base", *FULL_TUNED, "few_shot"], "planted_bound": True,
               "steering_kinds": STEERING_KINDS, "steer_head_alphas": [2.0],
               "steer_residual_alphas": [2.0]},
        "06": {
            "n_eval": 2, "n_train": 3, "n_questions": 1, "max_new_tokens": 4,
            "protocol_tokens": 4, "n_pairs": 1, "top_k": 1, "n_shots": 1,
            "epochs": 1, "train_batch_size": 3, "n_virtual_tokens": 2, "n_examples": 1,
        },
    },
}


# Wall seconds of each notebook in a run of record of a profile and model (its manifest's
# timings_s, on the idle 2-core CPU machine): what `make run` estimates the rest from. A model
# with no record of its own is paced against the default model's (models.RUN_MODEL), else
# against the profile's first record: models differ in where their time goes (notebook 01
# asks a natural model its first answers). cpu: the runs of record in docs/record/ (the
# default model: a fresh clone at f5125ad with an empty $SPT_CACHE, 1,706 s; the distributed
# sycophant: 1a8355c, 2,160 s); full: the plain organism, the default model at af2db90 (before
# the draws and steering; notebook 00 there read a cached organism), and the distributed
# sycophant at 2400f81 (6,486 s, notebook 03 partly beside benchmarks).
RECORDED_TIMINGS_S: dict[tuple[str, str], dict[str, float]] = {
    ("cpu", RUN_MODEL): {"00": 24, "01": 61, "02": 157, "03": 296, "04": 644, "05": 401,
                         "06": 123},
    ("cpu", models.DISTRIBUTED_ORGANISM): {"00": 12, "01": 12, "02": 225, "03": 535, "04": 799,
                                           "05": 450, "06": 127},
    ("full", models.ORGANISM_MODEL): {"00": 14, "01": 122, "02": 184, "03": 790, "04": 1544,
                                      "05": 3244, "06": 143},
    ("full", models.DISTRIBUTED_ORGANISM): {"00": 12, "01": 11, "02": 271, "03": 1558,
                                            "04": 2137, "05": 2380, "06": 116},
}


def time_left(
    profile: str, model_name: str, finished: dict[str, float], remaining: list[str],
) -> float | None:
    """Seconds the ``remaining`` notebooks should take: their recorded times (by file-name
    prefix, :data:`RECORDED_TIMINGS_S`: the model's own record in the profile, else the
    default model's, else the profile's first), scaled by how this run's ``finished``
    notebooks (name → seconds) compare with theirs. Notebook 00 does not set the pace (on
    first use it plants the organism: minutes, against seconds recorded). None when the
    profile has no record of one."""
    records = {model: timings for (name, model), timings in RECORDED_TIMINGS_S.items()
               if name == profile}
    recorded = records.get(model_name) or records.get(RUN_MODEL) or next(
        iter(records.values()), {})
    if any(name[:2] not in recorded for name in [*finished, *remaining]):
        return None
    pacing = {name: seconds for name, seconds in finished.items() if name[:2] != "00"}
    expected = sum(recorded[name[:2]] for name in pacing)
    pace = sum(pacing.values()) / expected if expected > 0 else 1.0
    return pace * sum(recorded[name[:2]] for name in remaining)


# Appendix C, tables 13 (SFT) and 14 (SPT): per model family and size, the learning rates,
# the batch size (the same for both methods), steps and number of tuned heads. Keys are
# regular expressions on the lower-cased model name; the paper's Qwen rows (Qwen-7B/14B/72B)
# are applied to every Qwen generation of that size (Qwen1.5, Qwen2, Qwen2.5), which the
# paper did not test.
PAPER_MODELS: dict[str, dict[str, Any]] = {
    r"llama-2-7b": {"spt_lr": 1e-5, "sft_lr": 5e-6, "batch_size": 32, "spt_steps": 240,
                    "sft_steps": 120, "top_k": 32},
    r"llama-2-13b": {"spt_lr": 1e-5, "sft_lr": 5e-6, "batch_size": 32, "spt_steps": 240,
                     "sft_steps": 120, "top_k": 64},
    r"llama-2-70b": {"spt_lr": 1e-5, "sft_lr": 5e-6, "batch_size": 64, "spt_steps": 120,
                     "sft_steps": 60, "top_k": 192},
    r"mistral-7b": {"spt_lr": 5e-6, "sft_lr": 5e-6, "batch_size": 32, "spt_steps": 240,
                    "sft_steps": 120, "top_k": 32},
    r"qwen[\d.]*-7b": {"spt_lr": 5e-6, "sft_lr": 5e-7, "batch_size": 32, "spt_steps": 240,
                       "sft_steps": 100, "top_k": 32},
    r"qwen[\d.]*-14b": {"spt_lr": 5e-6, "sft_lr": 5e-7, "batch_size": 32, "spt_steps": 240,
                        "sft_steps": 100, "top_k": 64},
    r"qwen[\d.]*-72b": {"spt_lr": 4e-6, "sft_lr": 1e-6, "batch_size": 64, "spt_steps": 100,
                        "sft_steps": 60, "top_k": 192},
}
# Which notebook takes each table entry.
_PAPER_KEYS = {"02": ("top_k",), "04": ("spt_lr", "sft_lr", "batch_size", "spt_steps",
                                        "sft_steps")}


def paper_row(model_name: str) -> tuple[str, dict[str, Any]] | None:
    """The row of tables 13-14 for ``model_name`` (its pattern and values), or ``None`` for
    a model the paper did not tune (the generic paper profile, sized for 7B, applies)."""
    name = model_name.lower()
    return next(((pattern, row) for pattern, row in PAPER_MODELS.items()
                 if re.search(rf"(^|/){pattern}(?![0-9a-z])", name)), None)


class RunError(ValueError):
    """A run directory that cannot be resumed with these settings, a notebook it still
    needs, or an option a notebook does not declare."""


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def notebook_parameters(notebook: Path) -> set[str]:
    """The names assigned in the notebook's cell tagged ``parameters``."""
    cells = json.loads(notebook.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise RunError(f"{notebook}: {len(tagged)} cells are tagged 'parameters', not 1")
    tree = ast.parse("".join(tagged[0]["source"]))
    return {target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def parameters_for(
    notebook: Path, profile: str, common: dict[str, Any], options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The papermill parameters of ``notebook``: ``common``, the profile's overrides (under
    ``paper``, the model's row of tables 13-14 over them), then ``options`` (parameter names,
    e.g. ``device``, ``model_dtype``; None values are left out), which the notebook's
    parameters cell must declare. ``profile`` is passed to notebooks that declare it."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}: choose one of {sorted(PROFILES)}")
    declared = notebook_parameters(notebook)
    options = {name: value for name, value in (options or {}).items() if value is not None}
    for name in sorted(options):
        if name not in declared:
            raise RunError(f"{notebook}: its parameters cell has no {name!r} to set")
    prefix = notebook.name[:2]
    run_wide = {"profile": profile} if "profile" in declared else {}
    parameters = {**common, **run_wide, **PROFILES[profile].get(prefix, {})}
    # under ``paper`` the row of tables 13-14 for the model (see :func:`paper_row`) wins
    row = paper_row(common.get("model_name", RUN_MODEL)) if profile == "paper" else None
    if row is not None:
        parameters.update({key: row[1][key] for key in _PAPER_KEYS.get(prefix, ())})
    return {**parameters, **options}


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's ``manifest.json`` ({} for a new run directory)."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RunError(f"{path}: not a JSON manifest ({error})") from error


def check_resume(run_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue ``run_dir`` with another model, profile or seed than it began with."""
    manifest = read_manifest(run_dir)
    for name in RUN_SETTINGS:
        if name in manifest and manifest[name] != settings[name]:
            raise RunError(
                f"{Path(run_dir) / MANIFEST}: field {name!r} is {manifest[name]!r} but this "
                f"run asks for {settings[name]!r}: resume a run with the settings it began "
                "with, or start a new run directory"
            )


def organism_record(model_name: str) -> dict[str, Any] | None:
    """What a run records of an organism it runs on (its planted heads, recipe and the hash of
    its head deltas); ``None`` for another model or an organism not built yet."""
    card = organism_card(model_name) if model_name in ORGANISMS else None
    if card is None:
        return None
    return {key: card[key] for key in ("planted_heads", "recipe", "sha256")}


def check_organism(run_dir: Path, model_name: str, recorded: dict[str, Any] | None) -> None:
    """Refuse to continue ``run_dir`` on another organism than it began with (``recorded``,
    its manifest's): one planted again since, with other head deltas, or a recipe the code
    has changed since (which the next notebook would plant anew)."""
    if recorded is None:
        return
    current = organism_record(model_name)
    stale_recipe = model_name in RECIPES and recorded["recipe"] != recipe_record(
        RECIPES[model_name])
    if stale_recipe or (current is not None and current != recorded):
        raise RunError(
            f"{Path(run_dir) / MANIFEST}: field 'organism' records other planted heads, head "
            f"deltas or recipe than {model_name!r} has now (planted again or changed since): "
            "start a new run directory")


def is_finished(run_dir: Path, notebook: Path) -> bool:
    return (Path(run_dir) / DONE_DIR / notebook.name).exists()


def ipc_kernel_manager(sockets: Path) -> type[KernelManager]:
    """A kernel manager whose kernels talk over local sockets in ``sockets`` (IPC) instead of
    unencrypted TCP, which ipykernel warns about on every start."""

    class IPCKernelManager(KernelManager):
        @default("transport")
        def _transport(self) -> str:
            return "ipc"

        @default("ip")
        def _ip(self) -> str:
            return str(sockets / "kernel")

    return IPCKernelManager


def run_pipeline(
    run_dir: Path,
    *,
    model_name: str = RUN_MODEL,
    profile: str = "cpu",
    seed: int = 0,
    figures_dir: Path = REPO / "figures",
    notebooks: list[Path] | None = None,
    log_output: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Execute ``notebooks`` (default: all) into ``run_dir``; return the manifest.

    Notebooks that finished in ``run_dir`` are skipped; ``device`` and ``dtype`` (when given)
    become the notebooks' ``device`` and ``model_dtype`` parameters (:data:`OPTION_PARAMETERS`:
    the model's placement and weight dtype in ``models.load_model``). Raises
    :class:`RunError` before running anything when ``run_dir`` was begun with another model,
    profile or seed, or a notebook lacks an option's parameter, or ``model_name`` names no model
    (then no run folder is made)."""
    import papermill

    try:
        models.check_name(model_name)
    except models.ModelLoadError as error:
        raise RunError(str(error)) from error
    run_dir = run_dir.resolve()
    notebooks = notebooks or notebook_paths()
    common = {
        "model_name": model_name, "run_dir": str(run_dir), "seed": seed,
        "figures_dir": str(Path(figures_dir).resolve()),
    }
    options = {OPTION_PARAMETERS["device"]: device, OPTION_PARAMETERS["dtype"]: dtype}
    parameters = {
        notebook: parameters_for(notebook, profile, common, options) for notebook in notebooks
    }
    check_resume(run_dir, {"model": model_name, "profile": profile, "seed": seed})
    check_organism(run_dir, model_name, read_manifest(run_dir).get("organism"))
    (run_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / MANIFEST
    manifest = read_manifest(run_dir)
    manifest.update(
        model=model_name, profile=profile, seed=seed, git_commit=git_commit(),
        versions=_versions(), timings_s=manifest.get("timings_s", {}),
        notebook_commits=manifest.get("notebook_commits", {}),
    )
    for notebook in notebooks:
        if is_finished(run_dir, notebook):
            log.info("%s: already finished in this run, skipped", notebook.name)
            continue
        log.info("%s ...", notebook.name)
        # a long run may see commits land: its kernel imports what is checked out now
        commit = git_commit()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="spt-kernel-") as sockets:
            papermill.execute_notebook(
                str(notebook),
                str(run_dir / notebook.name),
                parameters=parameters[notebook],
                cwd=str(REPO),
                kernel_name="python3",
                progress_bar=False,
                log_output=log_output,
                kernel_manager_class=ipc_kernel_manager(Path(sockets)),
                # an executed notebook is read without its kernel, where a widget cannot
                # run: its saved state (each plotly FigureWidget embeds plotly.js, 5 MB) is
                # left out; every figure a widget draws is exported to figures/ as well
                store_widget_state=False,
            )
        manifest["timings_s"][notebook.name] = round(time.perf_counter() - started, 1)
        manifest["notebook_commits"][notebook.name] = commit
        # notebook 00 plants an organism on first use; later ones must use that same one
        check_organism(run_dir, model_name, manifest.get("organism"))
        if manifest.get("organism") is None and (record := organism_record(model_name)):
            manifest["organism"] = record
        (run_dir / DONE_DIR / notebook.name).touch()
        write_json(manifest_path, manifest)
        timings = {n.name: manifest["timings_s"][n.name] for n in notebooks
                   if n.name in manifest["timings_s"]}
        left = time_left(profile, model_name, timings,
                         [n.name for n in notebooks if n.name not in timings])
        log.info("%s: %s s (this run so far: %.0f s%s)", notebook.name,
                 manifest["timings_s"][notebook.name], sum(timings.values()),
                 "" if left is None else f"; about {left / 60:.0f} min left")
    write_json(manifest_path, manifest)
    return manifest


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every pipeline command takes (see :func:`run_from_arguments`)."""
    parser.add_argument(
        "--model", help="model id: a planted organism "
        f"({', '.join(models.EMBEDDED_ORGANISMS)}), the natural embedded "
        "'smollm2-135m-instruct', a hub id or a local folder (default: $SPT_MODEL, else the "
        f"run's manifest, else {RUN_MODEL!r})")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES),
        help="parameter sizes: 'cpu' (the notebooks' defaults), 'paper' (the paper's GPU "
        "sizes) or 'test' (tiny) (default: $SPT_PROFILE, else the run's, else 'cpu')")
    parser.add_argument(
        "--seed", type=int,
        help="seed of every notebook (default: $SPT_SEED, else the run's, else 0)")
    parser.add_argument(
        "--device", help="device the notebooks load the model on, e.g. 'cpu', 'cuda', "
        "'cuda:1' (the notebooks' `device` parameter; default: CUDA when available)")
    parser.add_argument(
        "--dtype", choices=DTYPES,
        help="dtype of the model's weights (the notebooks' `model_dtype` parameter; default: "
        "bfloat16 on CUDA, float32 on CPU; notebook 04's training autocast is its own "
        "`autocast_dtype`)")
    parser.add_argument(
        "--run-dir", "--resume", dest="run_dir", type=Path,
        help="run directory to write, or to finish when it exists (default: a new "
        "<runs>/<timestamp>)")
    parser.add_argument(
        "--runs", type=Path, default=REPO / "runs",
        help="folder of new run directories (default: %(default)s)")
    parser.add_argument(
        "--figures-dir", type=Path, default=REPO / "figures",
        help="folder of the exported figures (default: %(default)s)")


def _setting(explicit: Any, variable: str, manifest: dict, key: str, default: Any) -> Any:
    """A flag's value, else the environment variable, else the run's manifest, else default."""
    if explicit is not None:
        return explicit
    if variable in os.environ:
        return type(default)(os.environ[variable])
    return manifest.get(key, default)


def run_from_arguments(
    args: argparse.Namespace, notebooks: list[Path] | None = None,
    needs: list[Path] | tuple[Path, ...] = (),
) -> int:
    """Run ``notebooks`` (default: all) with parsed :func:`add_run_arguments` options;
    ``needs`` must have finished in the run directory first. Prints the results table."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[spt] %(message)s"))
    package_log = logging.getLogger("spt_utils")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    try:
        run_dir = args.run_dir or args.runs / datetime.now().strftime("%Y%m%d-%H%M%S")
        manifest = read_manifest(run_dir)
        if needs and not run_dir.is_dir():
            raise RunError(f"{run_dir}: no such run folder (a run that notebooks "
                           f"{', '.join(n.name[:2] for n in needs)} finished in)")
        missing = [n.name for n in needs if not is_finished(run_dir, n)]
        if missing:
            raise RunError(f"{run_dir}: {', '.join(missing)} has not finished in this run; "
                           "run the earlier steps first (spt patch / spt tune)")
        log.info("run directory: %s", run_dir)
        started = time.perf_counter()
        run_pipeline(
            run_dir,
            model_name=_setting(args.model, "SPT_MODEL", manifest, "model",
                                RUN_MODEL),
            profile=_setting(args.profile, "SPT_PROFILE", manifest, "profile", "cpu"),
            seed=_setting(args.seed, "SPT_SEED", manifest, "seed", 0),
            figures_dir=args.figures_dir, notebooks=notebooks, device=args.device,
            dtype=args.dtype,
        )
        log.info("finished in %.0f s", time.perf_counter() - started)
    finally:
        package_log.removeHandler(handler)
    table = run_dir / RESULTS_TABLE
    if table.exists():
        print(table.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m spt_utils.pipeline``: every notebook, as ``spt run``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    try:
        return run_from_arguments(parser.parse_args(argv))
    except RunError as error:
        print(f"spt: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
