"""Results at a glance: the README's opening results block, written from a run's saved
summaries so that it cannot drift from them.

    python scripts/glance.py runs/<timestamp>            # print the block
    python scripts/glance.py runs/<timestamp> --record   # copy the summaries to docs/record/
                                                         # and rewrite README.md's block

The block reads only the files :data:`RECORD_FILES` names (``--record`` copies them into
``docs/record/``, which the tests compare the README against).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from spt_utils import stats
from spt_utils.evaluation import METRIC_NAMES

REPO = Path(__file__).resolve().parent.parent
RECORD = REPO / "docs" / "record"
RECORD_FILES = ("manifest.json", "heads.json", "knockout/summary.json", "results.json")
BEGIN, END = "<!-- glance -->", "<!-- /glance -->"
SHOWN = (("admitted", "admitted a mistake"), ("c_to_i", "C→I"),
         ("corrected", "corrected (wrong before)"), ("general_accuracy", "general accuracy"))


def load(run_dir: Path) -> dict[str, dict]:
    """The run's summaries by file name; a missing one is an error naming it."""
    missing = [name for name in RECORD_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no {', '.join(missing)} (a finished `make run` "
                                "writes them)")
    return {name: json.loads((run_dir / name).read_text()) for name in RECORD_FILES}


def head(h: list[int]) -> str:
    return f"L{h[0]}H{h[1]}"


def block(saved: dict[str, dict]) -> str:
    """The markdown block: what ran, which heads were found (against the planted ones), what
    knocking them out did, and every method's rates and drift with the claim's verdict."""
    manifest, heads = saved["manifest.json"], saved["heads.json"]
    knockout, results = saved["knockout/summary.json"], saved["results.json"]
    planted = (manifest.get("organism") or {}).get("planted_heads") or []
    seconds = sum(manifest.get("timings_s", {}).values())
    selected = heads["heads"]
    lines = [f"Run of record: `{manifest['model']}`, profile `{manifest['profile']}`, seed "
             f"{manifest['seed']}, commit {manifest['git_commit'][:7]}, notebooks "
             f"{seconds / 60:.0f} minutes (`docs/record/`, written by `scripts/glance.py`).", ""]
    found = f"{sum(h in planted for h in selected)} of the {len(planted)} planted" \
        if planted else "no ground truth (not an organism)"
    lines.append(f"- **Heads found** ({heads['method']}, top {len(selected)}): "
                 f"{', '.join(head(h) for h in selected)}; {found}.")
    top = next(r for r in knockout["by_k"] if r["k"] == knockout["k"])["top"]
    by_run = {g["run"]: g for g in knockout["generation"]}
    randoms = [g["admitted"]["k"] for g in knockout["generation"] if g["kind"] == "random"]
    none, chosen = by_run["none"]["admitted"], by_run[f"top-{knockout['k']}"]["admitted"]
    planted_run = next((g for g in knockout["generation"] if g["kind"] == "planted"), None)
    lines.append(
        f"- **Knocked out** ({knockout['method']}): {top['remaining']:.2f} "
        f"[{top['low']:.2f}, {top['high']:.2f}] of the challenge's effect left on "
        f"{knockout['n_pairs']} held-out pairs; in generation admitted "
        f"{stats.format_rate(none)} → {stats.format_rate(chosen)}"
        + (f" (planted heads {stats.format_rate(planted_run['admitted'])})" if planted_run
           else "")
        + (f", {len(randoms)} random sets {min(randoms)}-{max(randoms)}/{none['n']}"
           if randoms else "")
        + f"; verdict **{knockout['verdict']}**.")
    lines += ["", "| method | " + " | ".join(label for _, label in SHOWN) + " | KL per token |",
              "| --- |" + " --- |" * (len(SHOWN) + 1)]
    for name, row in results["results"].items():
        kl = row.get("kl")
        cells = [stats.format_rate(row.get(key)) for key, _ in SHOWN]
        cells.append("–" if kl is None else f"{kl['value']:.3f} [{kl['low']:.3f}, "
                     f"{kl['high']:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    draws = [name for name in results["results"] if name.startswith("spt_random_")]
    if len(draws) == 1:
        lines += ["", f"`{draws[0]}` is SPT on one draw of random heads: one draw is not a "
                      "test of whether the found heads matter."]
    claim = results.get("claim")
    if claim:
        failed = [key for key, check in claim["checks"].items() if check["passed"] is False]
        open_ = [key for key, check in claim["checks"].items() if check["passed"] is None]
        verdict = {True: "holds", False: "does not hold", None: "is undecided at this n"}[
            claim["holds"]]
        lines += ["", f"The claim for {claim['method']} on {METRIC_NAMES[claim['metric']]} "
                      f"**{verdict}**" + (f" (failed: {', '.join(failed)})" if failed else "")
                  + (f" (undecided: {', '.join(open_)})" if open_ else "") + "."]
    return "\n".join(lines) + "\n"


def rewrite(readme: Path, text: str) -> None:
    """Replace what stands between the README's glance markers by ``text``."""
    current = readme.read_text()
    if BEGIN not in current or END not in current:
        raise ValueError(f"{readme}: no {BEGIN} … {END} markers to write the block between")
    before, rest = current.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{BEGIN}\n{text}{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--record", action="store_true",
                        help="copy the summaries to docs/record/ and rewrite README.md")
    args = parser.parse_args()
    saved = load(args.run_dir)
    text = block(saved)
    if args.record:
        for name in RECORD_FILES:  # (rewriting the README from docs/record copies nothing)
            if (args.run_dir / name).resolve() != (RECORD / name).resolve():
                (RECORD / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(args.run_dir / name, RECORD / name)
        rewrite(REPO / "README.md", text)
    print(text)


if __name__ == "__main__":
    main()
