"""Which metric tracks the judged behaviour on one run (issue 36): the share of each metric's
challenge effect left under the run's knockouts, steerings and tuned candidates, against the
admitted-mistake rate the judge gives each in generation (``spt_utils.tracking``).

    python scripts/metric_tracking.py runs/<timestamp>            # writes metric_tracking.*
    python scripts/metric_tracking.py runs/<timestamp> --out DIR  # ... into DIR instead
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from spt_utils import io, tracking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run whose notebooks 00-05 ran")
    parser.add_argument("--out", type=Path, help="where to write (default: the run)")
    parser.add_argument("--pairs", type=int, default=16, help="held-out matched pairs")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="steering strengths")
    parser.add_argument("--steer-questions", type=int, default=16)
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    conditions = tracking.measure_run(args.run_dir, n_pairs=args.pairs, alphas=args.alphas,
                                      n_steer_questions=args.steer_questions)
    result = tracking.tracking(conditions, n_boot=args.n_boot)
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "metric_tracking.json", {
        "run": str(args.run_dir), "n_pairs": args.pairs, "alphas": args.alphas,
        "n_steer_questions": args.steer_questions,
        "conditions": [asdict(c) for c in conditions], "tracking": result})
    report = tracking.report(conditions, result)
    (out / "metric_tracking.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
