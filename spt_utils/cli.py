"""The ``spt`` command (``[project.scripts]``): the pipeline's notebooks, step by step.

``spt run`` executes notebooks 00-05; ``spt patch`` 00-02 (the model, the data, path patching
and the head selection), ``spt knockout`` 03, ``spt tune`` 04 and ``spt eval`` 05, each in a
run directory where the steps it needs have finished. ``spt lab`` opens JupyterLab on the
notebooks with the repository root as the kernels' working directory. ``spt organism``
builds (once) the planted model organism and prints its planted heads and acceptance.
``spt <command> --help`` describes every option.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from spt_utils import models, organism, pipeline
from spt_utils.io import REPO

LAB_STARTUP = REPO / "scripts" / "lab_startup.py"


@dataclass(frozen=True)
class Stage:
    """A command's notebooks and the notebooks that must have finished before it runs
    (both by file-name prefix; ``notebooks`` None: all)."""

    help: str
    notebooks: tuple[str, ...] | None
    needs: tuple[str, ...] = ()


STAGES = {
    "run": Stage("run every notebook, 00-05 (as make run)", None),
    "patch": Stage("meet the model, synthesise the data, path-patch every head and select the "
                   "heads (notebooks 00-02)", ("00", "01", "02")),
    "knockout": Stage("knock out the selected heads against random ones (notebook 03)",
                      ("03",), ("01", "02")),
    "tune": Stage("pinpoint-tune the selected heads and train the baselines (notebook 04)",
                  ("04",), ("01", "02")),
    "eval": Stage("evaluate the base model, the tuned models and few-shot prompting "
                  "(notebook 05)", ("05",), ("01", "04")),
}


def stage_notebooks(prefixes: tuple[str, ...] | None) -> list[Path]:
    """The notebooks with these file-name prefixes (all when None), in order."""
    paths = pipeline.notebook_paths()
    if prefixes is None:
        return paths
    chosen = [p for p in paths if p.name[:2] in prefixes]
    if len(chosen) != len(prefixes):
        raise pipeline.RunError(f"{pipeline.NOTEBOOKS}: no notebook for each of {prefixes}")
    return chosen


def lab_environment() -> dict[str, str]:
    """The environment of ``spt lab``: kernels run :data:`LAB_STARTUP`, which changes to the
    repository root."""
    return {**os.environ, "PYTHONSTARTUP": str(LAB_STARTUP), "SPT_REPO": str(REPO)}


def lab_command(lab_args: list[str]) -> list[str]:
    """The JupyterLab command of ``spt lab``: on the notebooks, with ``--allow-root`` when run
    as root (as in most containers, where JupyterLab refuses to start without it)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    allow = ["--allow-root"] if root and "--allow-root" not in lab_args else []
    return [sys.executable, "-m", "jupyterlab", str(pipeline.NOTEBOOKS), *allow, *lab_args]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spt", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        sub = commands.add_parser(name, help=stage.help, description=stage.help)
        pipeline.add_run_arguments(sub)
    commands.add_parser("lab", help="open JupyterLab on the notebooks (as make lab)",
                        description="open JupyterLab on the notebooks; relative paths in them "
                        "resolve to the repository root. Every argument after 'lab' goes to "
                        "jupyter lab as it is, e.g. spt lab --no-browser --port 8890")
    built = commands.add_parser(
        "organism", help="build the planted model organism (once) and print its ground truth "
        "and acceptance", description="build the planted model organism if its cache is "
        "missing or corrupt, then print its planted heads and acceptance")
    built.add_argument("name", nargs="?", default=models.RUN_MODEL,
                       choices=sorted(organism.RECIPES), help="default: %(default)s")
    built.add_argument("--rebuild", action="store_true", help="plant it again even if cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the command."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lab"] and not {"-h", "--help"} & set(argv[1:]):
        print("JupyterLab starts on the notebooks; open the address it prints "
              "(http://localhost:8888/lab?token=… unless the port is taken)", flush=True)
        command = lab_command(argv[1:])
        # JupyterLab replaces this process: stopping `spt lab` stops JupyterLab itself
        os.execve(command[0], command, lab_environment())
    args = parser.parse_args(argv)
    if args.command == "organism":
        card = organism.ensure(args.name, rebuild=args.rebuild)
        print(f"{args.name}: planted heads "
              + (", ".join(f"L{layer}H{head}" for layer, head in card["planted_heads"])
                 or "none (its caving was trained into every block)"))
        print(organism.acceptance_table(card))
        return 0 if all(card["acceptance"]["passed"].values()) else 1
    stage = STAGES[args.command]
    if stage.needs and args.run_dir is None:
        parser.error(f"spt {args.command} continues a run: pass --run-dir of a run where "
                     f"notebooks {', '.join(stage.needs)} finished")
    try:
        return pipeline.run_from_arguments(
            args, stage_notebooks(stage.notebooks), needs=stage_notebooks(stage.needs)
        )
    except pipeline.RunError as error:
        print(f"spt {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
