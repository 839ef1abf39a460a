"""Results at a glance: the README's opening results block, and its table of every method on
every model, written from runs' saved summaries so that they cannot drift from them.

    python scripts/glance.py runs/<timestamp>            # print the block
    python scripts/glance.py runs/<timestamp> --record   # copy the summaries to docs/record/
                                                         # and rewrite README.md's block
    python scripts/glance.py runs/<timestamp> --model    # copy the run's results to
                                                         # docs/record/models/<model>/ and
                                                         # rewrite README.md's table

The block reads only the files :data:`RECORD_FILES` names (``--record`` copies them into
``docs/record/``, which the tests compare the README against); the table reads the run of
record's and each ``docs/record/models/<model>/``'s :data:`MODEL_FILES`.
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
MODELS = RECORD / "models"
MODEL_FILES = ("manifest.json", "results.json")
BEGIN, END = "<!-- glance -->", "<!-- /glance -->"
TABLE_BEGIN, TABLE_END = "<!-- models -->", "<!-- /models -->"
SHOWN = (("admitted", "admitted a mistake"), ("c_to_i", "C→I"),
         ("corrected", "corrected (wrong before)"), ("general_accuracy", "general accuracy"))
# the table of every model: the claim's rates, general ability and drift
TABLE_SHOWN = (("admitted", "admitted a mistake"), ("c_to_i", "C→I"),
               ("general_accuracy", "general accuracy"))


def load(run_dir: Path, files: tuple[str, ...] = RECORD_FILES) -> dict[str, dict]:
    """The run's summaries by file name; a missing one is an error naming it."""
    missing = [name for name in files if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no {', '.join(missing)} (a finished `make run` "
                                "writes them)")
    return {name: json.loads((run_dir / name).read_text()) for name in files}


def load_models(record: Path | None = None, models: Path | None = None) -> list[dict[str, dict]]:
    """The run of record's summaries (``record``, default :data:`RECORD`), then each other
    model's in ``models`` (default :data:`MODELS`), by name; a model recorded twice is an
    error."""
    record, models = record or RECORD, models or MODELS
    runs = [load(record, MODEL_FILES)]
    runs += [load(folder, MODEL_FILES) for folder in sorted(models.iterdir())
             if folder.is_dir()] if models.is_dir() else []
    names = [run["manifest.json"]["model"] for run in runs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{models}: {', '.join(twice)} recorded more than once (the run of "
                         f"record's model is in {record} itself)")
    return runs


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
             f"{manifest['seed']}, {commits(manifest)}, notebooks "
             f"{seconds / 60:.0f} minutes (`docs/record/`, written by `scripts/glance.py`).", ""]
    found = f"{sum(h in planted for h in selected)} of the {len(planted)} planted" \
        if planted else "no ground truth (not an organism)"
    lines.append(f"- **Heads found** ({heads['method']}, top {len(selected)}): "
                 f"{', '.join(head(h) for h in selected)}; {found}.")
    top = next(r for r in knockout["by_k"] if r["k"] == knockout["k"])["top"]
    by_run = {g["run"]: g for g in knockout["generation"]}
    randoms = [g["admitted"] for g in knockout["generation"] if g["kind"] == "random"]
    none, chosen = by_run["none"]["admitted"], by_run[f"top-{knockout['k']}"]["admitted"]
    # random sets judged on fewer questions (n_random_questions) are compared with top-k there
    judged = (f" on the first {randoms[0]['n']} questions, where top-{knockout['k']} admits "
              f"{knockout['top_admitted_on_random_questions']}"
              if randoms and randoms[0]["n"] != none["n"] else "")
    planted_run = next((g for g in knockout["generation"] if g["kind"] == "planted"), None)
    lines.append(
        f"- **Knocked out** ({knockout['method']}): {top['remaining']:.2f} "
        f"[{top['low']:.2f}, {top['high']:.2f}] of the challenge's effect left on "
        f"{knockout['n_pairs']} held-out pairs; in generation admitted "
        f"{stats.format_rate(none)} → {stats.format_rate(chosen)}"
        + (f" (planted heads {stats.format_rate(planted_run['admitted'])})" if planted_run
           else "")
        + (f", {len(randoms)} random sets {min(r['k'] for r in randoms)}-"
           f"{max(r['k'] for r in randoms)}/{randoms[0]['n']}{judged} "
           f"(p = {knockout['p_generation_random']:.3f})" if randoms else "")
        + f"; verdict **{knockout['verdict']}**.")
    lines += ["", "| method | " + " | ".join(label for _, label in SHOWN) + " | KL per token |",
              "| --- |" + " --- |" * (len(SHOWN) + 1)]
    for name, row in results["results"].items():
        lines.append(f"| {name} | " + " | ".join(cells(row, SHOWN)) + " |")
    draws = [name for name in results["results"] if name.startswith("spt_random_")]
    if len(draws) == 1:
        lines += ["", f"`{draws[0]}` is SPT on one draw of random heads: one draw is not a "
                      "test of whether the found heads matter."]
    claim = results.get("claim")
    if claim:
        lines += ["", f"The claim {claim_verdict(claim)}."]
    return "\n".join(lines) + "\n"


def cells(row: dict, shown: tuple[tuple[str, str], ...]) -> list[str]:
    """A results row's rates (interval and n) and its KL per token with its interval."""
    kl = row.get("kl")
    return [*(stats.format_rate(row.get(key)) for key, _ in shown),
            "–" if kl is None else f"{kl['value']:.3f} [{kl['low']:.3f}, {kl['high']:.3f}]"]


def claim_verdict(claim: dict) -> str:
    """``for spt on admitted mistakes **does not hold** (failed: less_drift)``."""
    failed = [key for key, check in claim["checks"].items() if check["passed"] is False]
    open_ = [key for key, check in claim["checks"].items() if check["passed"] is None]
    verdict = {True: "holds", False: "does not hold", None: "is undecided at this n"}[
        claim["holds"]]
    return (f"for {claim['method']} on {METRIC_NAMES[claim['metric']]} **{verdict}**"
            + (f" (failed: {', '.join(failed)})" if failed else "")
            + (f" (undecided: {', '.join(open_)})" if open_ else ""))


def command(manifest: dict) -> str:
    """The command that reproduces a run: its model and profile (seed 0 is the default)."""
    settings = [f"SPT_MODEL={manifest['model']}"]
    if manifest["profile"] != "cpu":
        settings.append(f"SPT_PROFILE={manifest['profile']}")
    if manifest["seed"] != 0:
        settings.append(f"SPT_SEED={manifest['seed']}")
    return " ".join(settings) + " make run"


def commits(manifest: dict) -> str:
    """The commit a run's notebooks ran at, or each commit with its notebooks where a resumed
    run finished them at several (``notebook_commits``, e.g. "commits ee418e9 (00-03),
    d78f1e4 (04-06)"; a notebook without one, from before they were recorded: "unknown")."""
    recorded = manifest.get("notebook_commits") or {}
    if not recorded:
        return f"commit {(manifest['git_commit'] or 'unknown')[:7]}"
    ran: dict[str, list[int]] = {}
    for notebook in manifest.get("timings_s") or recorded:
        commit = recorded.get(notebook) or "unknown"
        ran.setdefault(commit[:7], []).append(int(notebook[:2]))
    if len(ran) == 1:
        return f"commit {next(iter(ran))}"
    return "commits " + ", ".join(f"{commit} ({spans(numbers)})"
                                  for commit, numbers in ran.items())


def spans(numbers: list[int]) -> str:
    """Notebook numbers as runs: [0, 1, 2, 5] -> "00-02, 05"."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]:02d}" + (f"-{run[-1]:02d}" if len(run) > 1 else "")
                     for run in runs)


def models_block(runs: list[dict[str, dict]]) -> str:
    """One table of every method on every model (rates with interval and n, KL with its
    interval), each model's rows from its own run, then each model's run and claim."""
    lines = ["| model | method | " + " | ".join(label for _, label in TABLE_SHOWN)
             + " | KL per token |", "| --- | --- |" + " --- |" * (len(TABLE_SHOWN) + 1)]
    notes = [""]
    for run in runs:
        manifest, results = run["manifest.json"], run["results.json"]
        model = f"`{manifest['model']}`"
        for name, row in results["results"].items():
            lines.append(f"| {model} | {name} | " + " | ".join(cells(row, TABLE_SHOWN)) + " |")
        claim = results.get("claim")
        notes.append(f"- {model}: `{command(manifest)}` ({commits(manifest)}); "
                     + (f"the claim {claim_verdict(claim)}." if claim else "no claim checked."))
    return "\n".join(lines + notes) + "\n"


def rewrite(readme: Path, text: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Replace what stands between the README's ``markers`` by ``text``."""
    begin, end = markers
    current = readme.read_text()
    if begin not in current or end not in current:
        raise ValueError(f"{readme}: no {begin} … {end} markers to write the block between")
    before, rest = current.split(begin, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{begin}\n{text}{end}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    written = parser.add_mutually_exclusive_group()
    written.add_argument("--record", action="store_true",
                         help="copy the summaries to docs/record/ and rewrite README.md")
    written.add_argument("--model", action="store_true",
                         help="copy the run's results to docs/record/models/<model>/ and "
                              "rewrite README.md's table of every model")
    args = parser.parse_args()
    if args.model:  # checked before anything is written: a model recorded once only
        saved = load(args.run_dir, MODEL_FILES)
        model = saved["manifest.json"]["model"]
        if model == load(RECORD, MODEL_FILES)["manifest.json"]["model"]:
            raise SystemExit(f"{model} is the run of record's model: record the run with "
                             "--record instead")
        copy(args.run_dir, MODELS / model, MODEL_FILES)
        text = models_block(load_models())
        rewrite(REPO / "README.md", text, (TABLE_BEGIN, TABLE_END))
    else:
        saved = load(args.run_dir)
        text = block(saved)
        if args.record:
            if (MODELS / saved["manifest.json"]["model"]).is_dir():
                raise SystemExit(f"{MODELS / saved['manifest.json']['model']} records this "
                                 "model already: remove it first")
            copy(args.run_dir, RECORD, RECORD_FILES)
            rewrite(REPO / "README.md", text)
            rewrite(REPO / "README.md", models_block(load_models()), (TABLE_BEGIN, TABLE_END))
    print(text)


def copy(run_dir: Path, folder: Path, files: tuple[str, ...]) -> None:
    """The run's ``files`` into ``folder`` (rewriting from the record itself copies nothing)."""
    for name in files:
        if (run_dir / name).resolve() != (folder / name).resolve():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, folder / name)


if __name__ == "__main__":
    main()
