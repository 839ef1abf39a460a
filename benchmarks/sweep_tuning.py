"""Sweep SPT and full SFT on a run directory, choose on the dev split, report on eval.

Phase 1 (dev split only): SPT on the top-k heads of notebook 02's path patching over
lr × steps × k (optionally with the K/V groups) and SFT over lr × steps, each trained from the
same base weights (``tuning.sweep``), measured on the dev questions: admitted-mistake rate on
the known ones, corrected rate on the wrong ones, general ability (the model's own first
answers, free-form) and per-token KL drift with a bootstrap interval over held-out prompts
(the patching and dev questions' prompts and the shipped KL corpus; never the eval split).
The chosen SPT setting is the one with the lowest KL among those whose dev target rate is
within ``--slack`` of the best SFT rate (else the lowest rate, ties broken by KL), among the SPT
settings whose general ability is not significantly below base's (McNemar p < 0.05; all of
them when none is); the matched SFT setting the lowest-KL SFT within the same bound.
Random-head draws of the chosen k, lr and steps follow.

Phase 2 (``--eval``): the chosen SPT, the matched SFT and the random draws are retrained and
measured once on the eval split (KL on the eval questions' prompts and the corpus), with
exact McNemar tests against base. Writes ``sweep.json``, ``sweep.md`` and the Pareto figure
to ``--out`` (default ``RUN_DIR/sweep``). Usage::

    python benchmarks/sweep_tuning.py --run-dir runs/<timestamp> [--eval]

Each measured setting is appended to ``dev_rows.jsonl`` (``eval_rows.jsonl``) at once and
base's records are cached, so rerunning the same command resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from spt_utils import (
    ablation,
    data,
    evaluation,
    models,
    patching,
    stats,
    steering,
    tuning,
    viz,
)
from spt_utils.io import write_json

PROFILES = {  # "cpu" is ordered by what matters first (a rerun resumes); "full" is issue 14's
    "cpu": {"k": [16, 32, 8], "lr": [3e-4, 1e-3], "steps": [60], "kv": [False],
            "sft_lr": [2e-5], "sft_steps": [60], "lora_lr": [1e-3], "lora_steps": [60],
            "prompt_lr": [3e-2], "prompt_steps": [60], "draws": 2},
    "full": {"k": [4, 8, 16, 32], "lr": [1e-4, 3e-4, 1e-3], "steps": [30, 60, 120],
             "kv": [False, True], "sft_lr": [1e-5, 2e-5, 5e-5], "sft_steps": [30, 60, 120],
             "lora_lr": [1e-4, 3e-4, 1e-3], "lora_steps": [30, 60, 120],
             "prompt_lr": [1e-2, 3e-2, 1e-1], "prompt_steps": [30, 60, 120], "draws": 5},
}


class Measure:
    """Measures the model in ``bridge`` on one question split against ``base`` (base's own
    records are cached in ``base_file``)."""

    def __init__(self, base, bridge, questions, answers, protocol, documents, n_tokens,
                 base_file: Path):
        self.base, self.bridge, self.answers, self.protocol = base, bridge, answers, protocol
        self.questions, self.documents, self.n_tokens = questions, documents, n_tokens
        ids = [q["id"] for q in questions]
        cached = json.loads(base_file.read_text()) if base_file.exists() else None
        graded_in_context = cached is not None and all(  # records from before final_kind
            "final_kind" in r for r in cached["records"])
        if not graded_in_context or cached["ids"] != ids or cached["n_tokens"] != n_tokens:
            cached = {"ids": ids, "n_tokens": n_tokens, "records": self.records(base),
                      "general": self.general(base)}
            write_json(base_file, cached)
        self.base_records, self.base_general = cached["records"], cached["general"]

    def candidate(self, hf_model) -> evaluation.Candidate:
        return evaluation.Candidate("tuned", self.bridge, hf_model=hf_model)

    def records(self, model) -> list[dict]:
        return evaluation.run_protocol(model, self.questions, self.answers,
                                       protocol=self.protocol, max_new_tokens=self.n_tokens)

    def general(self, model) -> list[bool]:
        return evaluation.first_turn_correct(
            model, self.questions, protocol=self.protocol,
            max_new_tokens=evaluation.FIRST_ANSWER_TOKENS[self.protocol])

    def row(self, records: list[dict], general: list[bool], kl: dict | None) -> dict[str, Any]:
        metrics = evaluation.sycophancy_metrics(records)
        paired = evaluation.paired_tests(self.base_records, records)
        paired["general"] = stats.mcnemar(self.base_general, general)
        keys = ("admitted", "c_to_i", "reaffirmed_finals", "unnamed_finals", "apology_words",
                "corrected", "truthfulness")
        return {key: metrics[key] for key in keys} | {
            "general": stats.rate(general), "kl": kl, "paired": paired}

    def base_row(self) -> dict[str, Any]:
        zero = {"value": 0.0, "low": 0.0, "high": 0.0, "n": len(self.documents)}
        return self.row(self.base_records, self.base_general, zero)

    def __call__(self, _setting, hf_model) -> dict[str, Any]:
        tuned = self.candidate(hf_model)
        per_document = evaluation.kl_per_document(self.base, tuned, self.documents)
        kl = evaluation.kl_interval(per_document)
        return self.row(self.records(tuned), self.general(tuned), kl)


def grid(profile: dict, ranking: list[patching.Head]) -> list[tuning.SweepSetting]:
    """SPT on the first k of ``profile["k"]``, then SFT, LoRA and prompt tuning, then SPT on
    the other k: the order a resumed, partial sweep is most useful in."""
    spt = [[tuning.SweepSetting("spt", lr, steps, ranking[:k], kv) for kv in profile["kv"]
            for lr in profile["lr"] for steps in profile["steps"]] for k in profile["k"]]
    others = [tuning.SweepSetting(method, lr, steps)
              for method, prefix in (("sft", "sft"), ("lora_attn", "lora"),
                                     ("prompt_tuning", "prompt"))
              for lr in profile[f"{prefix}_lr"] for steps in profile[f"{prefix}_steps"]]
    return [*spt[0], *others, *(setting for rest in spt[1:] for setting in rest)]


def run_settings(bridge, examples, settings: list[tuning.SweepSetting], measure: Measure,
                 partial: Path, options: dict[str, Any]) -> list[dict]:
    """``tuning.sweep`` over the settings not yet in ``partial`` (a JSONL file each measured
    row is appended to at once, so an interrupted sweep resumes where it stopped)."""
    done = {}
    if partial.exists():
        done = {row["name"]: row for row in map(json.loads, partial.read_text().splitlines())}
    todo = [setting for setting in settings if setting.name not in done]

    def save(row: dict) -> None:
        with partial.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        done[row["name"]] = row

    tuning.sweep(bridge, examples, todo, measure, on_row=save, **options)
    return [done[setting.name] for setting in settings]


def random_draws(setting: tuning.SweepSetting, n_layers: int, n_heads: int, draws: int,
                 seed: int) -> list[tuning.SweepSetting]:
    """``draws`` settings like ``setting`` on as many heads drawn uniformly from the heads
    outside ``setting.heads`` (:func:`ablation.random_head_sets`)."""
    head_sets = ablation.random_head_sets(len(setting.heads), draws, n_layers, n_heads,
                                          seed=seed, exclude=setting.heads)
    return [tuning.SweepSetting("spt", setting.lr, setting.steps, heads, setting.include_kv,
                                label=f"random {draw}")
            for draw, heads in enumerate(head_sets)]


def lost_general(rows: list[dict]) -> list[dict]:
    """The SPT settings on the top heads whose general ability on dev falls
    (:func:`spt_utils.steering.keeps_general`)."""
    return [r for r in rows if r["method"] == "spt" and not r["label"]
            and not steering.keeps_general(r, key="general")]


def choose(rows: list[dict], slack: float, target: str = "admitted") -> tuple[dict, dict | None]:
    """The chosen SPT row and the matched SFT row (see the module docstring), by the dev
    rate of ``target``. SPT settings that lose general ability (:func:`lost_general`) are
    passed over while any other remains: a lower rate bought by a model that no longer
    answers plain questions is not the goal."""
    def value(row: dict) -> float:
        return row[target]["value"]

    spt = [r for r in rows if r["method"] == "spt" and not r["label"]]
    lost = lost_general(rows)
    spt = [r for r in spt if r not in lost] or spt
    sft = [r for r in rows if r["method"] == "sft"]
    bound = (min(value(r) for r in sft) if sft else 0.0) + slack
    reaching = [r for r in spt if value(r) <= bound]
    chosen = (min(reaching, key=lambda r: r["kl"]["value"]) if reaching
              else min(spt, key=lambda r: (value(r), r["kl"]["value"])))
    matched_pool = [r for r in sft if value(r) <= value(chosen) + slack] or sft
    matched = min(matched_pool, key=lambda r: r["kl"]["value"]) if sft else None
    return chosen, matched


def _cell(value: dict | None) -> str:
    if value is None:
        return "–"
    return stats.format_rate(value) if "k" in value else evaluation.format_kl(value)


def table(rows: list[dict], target: str = "admitted") -> str:
    """Markdown: one row per setting, rates with exact intervals, KL with its bootstrap
    interval, McNemar p of the ``target`` rate against base."""
    header = ["setting", "admitted (known) ↓", "C→I (known) ↓", "finals reaffirmed (known)",
              "finals naming no answer (known)", "corrected (wrong) ↑", "general ↑",
              "KL per token ↓", f"p {target}", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        p = row.get("paired", {}).get(target)
        lines.append("| " + " | ".join([
            row["name"], _cell(row["admitted"]), _cell(row["c_to_i"]),
            _cell(row.get("reaffirmed_finals")), _cell(row.get("unnamed_finals")),
            _cell(row["corrected"]), _cell(row["general"]), _cell(row["kl"]),
            "–" if p is None else f"{p['p']:.2g}", str(row.get("train_s", "–"))]) + " |")
    return "\n".join(lines) + "\n"


def group(row: dict) -> str:
    if row["method"] == "base":
        return "base"
    if row["method"] != "spt":
        return {"sft": "SFT", "lora_attn": "LoRA", "prompt_tuning": "prompt tuning"}[
            row["method"]]
    return "SPT random heads" if row["label"] else "SPT top heads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--slack", type=float, default=0.05)
    parser.add_argument("--target", choices=sorted(evaluation.METRIC_NAMES), default="admitted",
                        help="the rate the settings are chosen to lower (c_to_i where base "
                        "admits too few mistakes on dev to lower)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval", action="store_true", help="phase 2 on the eval split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir, out = args.run_dir / "data", args.out or args.run_dir / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    protocol = data.read_protocol(data_dir)
    answers = data.load_answers(data_dir / data.ANSWERS_FILE, protocol=protocol)
    split = {name: list(data.load_questions(data_dir / f"{name}_questions.jsonl"))
             for name in ("patching", "dev", "eval")}
    base = models.load_model(args.model)
    bridge = models.load_model(args.model)
    records = tuning.load_training_conversations(data_dir / "train.jsonl")
    examples = tuning.prepare_examples(bridge.tokenizer, [r["messages"] for r in records])
    ranking = patching.HeadScores.load(args.run_dir / "patching.pt").top_heads(
        bridge.cfg.n_layers * bridge.cfg.n_heads)
    corpus = evaluation.load_kl_corpus()
    profile = PROFILES[args.profile]
    options = {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
               "seed": args.seed}

    dev_docs = evaluation.question_prompts(base.tokenizer, split["patching"] + split["dev"],
                                           protocol) + corpus
    measure = Measure(base, bridge, split["dev"], answers, protocol, dev_docs,
                      args.max_new_tokens, out / "base_dev.json")
    partial = out / "dev_rows.jsonl"
    rows = run_settings(bridge, examples, grid(profile, ranking), measure, partial, options)
    chosen, matched = choose(rows, args.slack, args.target)
    chosen_setting = tuning.SweepSetting("spt", chosen["lr"], chosen["steps"],
                                         [tuple(h) for h in chosen["heads"]],
                                         chosen["include_kv"])
    draws = random_draws(chosen_setting, bridge.cfg.n_layers, bridge.cfg.n_heads,
                         profile["draws"], args.seed)
    rows += run_settings(bridge, examples, draws, measure, partial, options)
    dev_rows = [{"name": "base", "method": "base", "label": "", **measure.base_row()}, *rows]
    for row in dev_rows:
        row["group"], row["target"] = group(row), row[args.target]
    result: dict[str, Any] = {"dev": dev_rows, "chosen": chosen["name"],
                              "matched_sft": matched["name"] if matched else None,
                              "n_kl_prompts_dev": len(dev_docs), "profile": args.profile,
                              "model": args.model,
                              "target": args.target}
    text = f"## Dev split ({len(dev_docs)} KL prompts)\n\n" + table(dev_rows, args.target)
    result["lost_general"] = [r["name"] for r in lost_general(rows)]
    text += (f"\nchosen SPT: {chosen['name']}; matched SFT: {result['matched_sft']}; "
             "SPT settings passed over for losing general ability (McNemar p < 0.05): "
             f"{', '.join(result['lost_general']) or 'none'}\n")

    if args.eval:
        eval_docs = evaluation.question_prompts(base.tokenizer, split["eval"], protocol) + corpus
        final = Measure(base, bridge, split["eval"], answers, protocol, eval_docs,
                        args.max_new_tokens, out / "base_eval.json")
        settings = [chosen_setting, *draws]
        if matched:
            settings.append(tuning.SweepSetting("sft", matched["lr"], matched["steps"]))
        eval_rows = [{"name": "base", "method": "base", "label": "", **final.base_row()},
                     *run_settings(bridge, examples, settings, final,
                                   out / "eval_rows.jsonl", options)]
        for row in eval_rows:
            row["group"], row["target"] = group(row), row[args.target]
        result["eval"] = eval_rows
        result["n_kl_prompts_eval"] = len(eval_docs)
        text += f"\n## Eval split ({len(eval_docs)} KL prompts)\n\n" + table(eval_rows, args.target)
    write_json(out / "sweep.json", result)
    (out / "sweep.md").write_text(text)
    figure = viz.sweep_pareto_figure(
        result, yaxis_title=f"rate of {evaluation.METRIC_NAMES[args.target]}")
    print("wrote", *viz.export_figure(figure, out, "sweep_pareto"))
    print(text)


if __name__ == "__main__":
    main()
