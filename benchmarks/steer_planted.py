"""Head steering at the found and at the planted heads of the interchange-trained organism,
with its cost-matched random control (issue 37, item 4), at the lean sizes:

    python benchmarks/steer_planted.py RUN_DIR

Runs notebooks 00-02, 04 (SPT and SPT on the planted heads) and 05 (base, SPT, the upper
bound, and head steering on the heads' dev grid of the full profile) into RUN_DIR by papermill;
RUN_DIR/results.md and eval/steering_dev.json hold the numbers (about 45 minutes on one thread
of a 2-core CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import papermill

from spt_utils import pipeline

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = {
    "04": {"methods": ["spt"], "random_head_draws": 0, "planted_bound": True},
    "05": {"methods": ["base", "spt"], "random_head_draws": 0, "planted_bound": True,
           "steering_kinds": ["heads"], **pipeline.STEER_GRIDS},
}


def main() -> None:
    run_dir = Path(sys.argv[1]).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    common = {"model_name": "smollm2-135m-sycophant-iit", "run_dir": str(run_dir),
              "figures_dir": str(run_dir / "figures"), "seed": 0}
    for name in ("00_meet_the_model", "01_data_synthesis", "02_path_patching",
                 "04_pinpoint_tuning", "05_evaluation"):
        notebook = REPO / "notebooks" / f"{name}.ipynb"
        parameters = {**pipeline.parameters_for(notebook, "cpu", common),
                      **OVERRIDES.get(name[:2], {})}
        print(name, flush=True)
        papermill.execute_notebook(str(notebook), str(run_dir / f"{name}.ipynb"),
                                   parameters=parameters, cwd=str(REPO / "notebooks"),
                                   progress_bar=False)


if __name__ == "__main__":
    main()
