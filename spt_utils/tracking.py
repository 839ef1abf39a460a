"""Which metric tracks the judged behaviour (issue 36).

A run's conditions each change the model one way and are judged in generation: notebook 03's
knockouts (its sets interchanged), steerings of the selected heads and of random heads (at
several strengths), and notebook 04's tuned candidates (judged by notebook 05). For each
condition the share of each metric's challenge effect left (1 = intact, 0 = gone) is measured
on held-out matched pairs, and the metric whose shares rank the conditions as the judge's
admitted-mistake rates do (Spearman's rho, with a bootstrap interval over conditions and the
paired difference between the metrics) is the one that tracks the behaviour.

    conditions = tracking.measure_run("runs/<timestamp>")
    result = tracking.tracking(conditions)
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import ablation, candidates, data, evaluation, io, models, patching, stats, steering

METRICS = ("first_token", "sequence")
FAMILIES = ("knockout", "steering", "tuned")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Condition:
    """One way the model was changed: ``admitted`` of ``n`` known questions admitted a
    mistake in generation; ``left``: per metric, the share of the challenge effect left."""

    family: str
    name: str
    admitted: int
    n: int
    left: dict[str, float]


def effect(model: TransformerBridge, runs: patching.MetricRuns) -> float:
    """The challenge's effect on ``runs``' metric, mean reference − counterfactual, with
    whatever hooks (a steering) are active on ``model``."""
    with torch.no_grad():
        return (patching.run_side(model, runs, "reference")
                - patching.run_side(model, runs, "counterfactual")).mean().item()


def _interval(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    low, high = torch.tensor(values, dtype=torch.float64).quantile(
        torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def correlations(conditions: Sequence[Condition], *, n_boot: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Each metric's Spearman rho between its share left and the admitted rate over
    ``conditions``, and the difference sequence − first token, each with a 95% percentile
    interval from resampling the conditions (resamples where a side is constant are
    dropped; ``n_boot_used`` says how many stayed)."""
    admitted = [c.admitted / c.n for c in conditions]
    result: dict[str, Any] = {metric: stats.spearman([c.left[metric] for c in conditions],
                                                     admitted) for metric in METRICS}
    generator, draws = random.Random(seed), {metric: [] for metric in METRICS}
    for _ in range(n_boot):
        rows = [generator.randrange(len(conditions)) for _ in conditions]
        rhos = {metric: stats.spearman([conditions[i].left[metric] for i in rows],
                                       [admitted[i] for i in rows])["rho"] for metric in METRICS}
        if not any(math.isnan(rho) for rho in rhos.values()):
            for metric in METRICS:
                draws[metric].append(rhos[metric])
    for metric in METRICS:
        result[metric]["low"], result[metric]["high"] = _interval(draws[metric])
    difference = [s - f for s, f in zip(draws["sequence"], draws["first_token"], strict=True)]
    low, high = _interval(difference)
    result["difference"] = {"value": result["sequence"]["rho"] - result["first_token"]["rho"],
                            "low": low, "high": high}
    result["n_boot_used"] = len(difference)
    return result


def tracking(conditions: Sequence[Condition], *, n_boot: int = 2000,
             seed: int = 0) -> dict[str, Any]:
    """:func:`correlations` per family and pooled over every condition; ``tracks``: the
    metric whose pooled rho is higher where the difference's interval excludes 0, else
    ``None`` (the conditions cannot tell the metrics apart)."""
    if len(conditions) < 3:
        raise ValueError(f"tracking: {len(conditions)} conditions; a rank correlation needs 3")
    groups = {family: [c for c in conditions if c.family == family] for family in FAMILIES}
    result: dict[str, Any] = {family: correlations(members, n_boot=n_boot, seed=seed)
                              for family, members in groups.items() if len(members) >= 3}
    result["pooled"] = pooled = correlations(conditions, n_boot=n_boot, seed=seed)
    difference = pooled["difference"]
    result["tracks"] = ("sequence" if difference["low"] > 0 else "first_token"
                        if difference["high"] < 0 else None)
    result["n_conditions"] = {family: len(members) for family, members in groups.items()}
    return result


def _known(records: Sequence[dict]) -> tuple[int, int]:
    """Admitted mistakes and n over the records of questions answered correctly before."""
    known = [r for r in records if r["correct_before"]]
    return sum(bool(r["admitted"]) for r in known), len(known)


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (run notebooks 03-05 on this run first)")
    return json.loads(path.read_text())


def measure_run(
    run_dir: str | Path, *, n_pairs: int = 16, alphas: Sequence[float] = (0.5, 1.0, 2.0),
    n_steer_questions: int = 16, max_new_tokens: int = 32, batch_size: int = 16,
    progress: bool = True,
) -> list[Condition]:
    """Every condition of the run in ``run_dir`` (notebooks 00-05 executed), each metric's
    share left measured on the first ``n_pairs`` held-out known evaluation questions'
    matched pairs (the organism's own replies for the sequence metric):

    * ``knockout``: each set notebook 03 judged in generation (``knockout/summary.json``;
      its method must be ``interchange``), interchanged exactly on the pairs;
    * ``steering``: the selection's top k heads (notebook 03's k) and as many random heads
      with random directions of the same norms (:func:`spt_utils.steering.random_control`),
      each at every α of ``alphas``, judged here on the first ``n_steer_questions`` held-out
      known questions;
    * ``tuned``: the base and each tuned folder of ``tuned/index.json``, judged by
      notebook 05 (``eval/<method>.jsonl``, the questions correct before). Few-shot is
      left out: it tunes nothing, and its demonstrations change the pairs' prompts; so is
      prompt tuning (its virtual tokens do).
    """
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / "manifest.json")
    summary_path = run_dir / "knockout" / "summary.json"
    summary = _read_json(summary_path)
    if summary["method"] != "interchange":
        raise ValueError(f"{summary_path}: field 'method' is {summary['method']!r}; the "
                         "knockouts are measured under 'interchange' only")
    model = models.load_model(manifest["model"], dtype="float32")
    run = io.provenance(manifest["model"], model.tokenizer, profile=manifest["profile"],
                        seed=manifest["seed"])
    data_dir = run_dir / "data"
    answers = data.load_answers(data_dir / data.ANSWERS_FILE)
    protocol = data.read_protocol(data_dir)
    held_out = [q for q in data.load_questions(data_dir / "eval_questions.jsonl")
                if answers[q["id"]]["correct"]]
    answer_tokens = patching.AnswerTokens.load(run_dir / "answer_tokens.json", expect=run)
    pairs = answer_tokens.apply(data.build_patching_pairs(
        held_out[:n_pairs], model.tokenizer, answers=answers, protocol=protocol,
        wording="matched"))
    runs = {"first_token": patching.first_token_runs(pairs),
            "sequence": patching.sequence_runs(patching.reply_pairs(model, pairs))}
    clean = {metric: effect(model, metric_runs) for metric, metric_runs in runs.items()}
    conditions = []

    for judged in summary["generation"]:
        heads = [tuple(head) for head in judged["heads"]]
        conditions.append(Condition("knockout", judged["run"], judged["admitted"]["k"],
                                    judged["admitted"]["n"], {
            metric: patching.interchanged_effect(model, metric_runs, heads) / clean[metric]
            for metric, metric_runs in runs.items()}))

    selected = patching.load_heads(run_dir / "heads.json", expect=run)[: summary["k"]]
    steer_pairs = data.PatchingPairs.load(data_dir / "pairs.pt", expect=run)
    selection = steering.head_steering(model, steer_pairs, selected)
    [random_heads] = ablation.random_head_sets(len(selected), 1, model.cfg.n_layers,
                                               model.cfg.n_heads, seed=manifest["seed"],
                                               exclude=selected)
    steerings = {f"top-{len(selected)}": selection,
                 "random": steering.random_control(selection, seed=manifest["seed"],
                                                   heads=random_heads)}
    for name, steered in steerings.items():
        for alpha in alphas:
            with steering.steer(model, steered, alpha):
                records = evaluation.run_protocol(
                    model, held_out[:n_steer_questions], answers, protocol=protocol,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
                left = {metric: effect(model, metric_runs) / clean[metric]
                        for metric, metric_runs in runs.items()}
            conditions.append(Condition("steering", f"{name} α={alpha:g}", *_known(records),
                                        left))

    index = _read_json(run_dir / "tuned" / "index.json")
    tuned = [method for method, entry in index["methods"].items() if "folder" in entry]
    for method in ["base", *tuned]:
        records = [json.loads(line) for line in
                   (run_dir / "eval" / f"{method}.jsonl").read_text().splitlines()]
        with candidates.open_candidate(run_dir, model, method, expect=run) as candidate:
            if candidate is None:
                raise FileNotFoundError(f"{run_dir / 'tuned' / method}: listed in "
                                        "tuned/index.json but not loadable")
            if candidate.hf_model is not None:  # virtual tokens in front of every prompt
                log.warning("%s: left out (a wrapper that changes the prompts)", method)
                continue
            left = {metric: effect(candidate.bridge, metric_runs) / clean[metric]
                    for metric, metric_runs in runs.items()}
        conditions.append(Condition("tuned", method, *_known(records), left))
    return conditions


def report(conditions: Sequence[Condition], result: dict[str, Any]) -> str:
    """The conditions and the correlations as markdown."""
    def cell(value: dict) -> str:
        return (f"{value['rho']:.2f} [{value['low']:.2f}, {value['high']:.2f}]"
                if "rho" in value else
                f"{value['value']:+.2f} [{value['low']:.2f}, {value['high']:.2f}]")

    lines = ["| condition | admitted | first-token effect left | sequence effect left |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {c.family}: {c.name} | {stats.format_rate(stats.rate_of(c.admitted, c.n))} | "
              f"{c.left['first_token']:.2f} | {c.left['sequence']:.2f} |" for c in conditions]
    lines += ["", "| conditions | n | first token: rho [95%] | sequence: rho [95%] | "
              "sequence − first token |", "| --- | --- | --- | --- | --- |"]
    for group in (*FAMILIES, "pooled"):
        if group in result:
            value = result[group]
            lines.append(f"| {group} | {value['first_token']['n']} | "
                         f"{cell(value['first_token'])} | {cell(value['sequence'])} | "
                         f"{cell(value['difference'])} |")
    tracks = result["tracks"]
    lines += ["", f"Tracks the judge: **{tracks or 'undecided'}** (pooled; the difference's "
                  "interval " + ("excludes 0)." if tracks else "includes 0).")]
    return "\n".join(lines)
