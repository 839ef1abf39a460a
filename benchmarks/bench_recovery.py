"""Recovery benchmark: how well each head-finding method finds the heads caving was planted
into, on several organisms (issue 26).

    python benchmarks/bench_recovery.py [--seeds 1 2 3 4] [--out runs/recovery]

Each organism is SmolLM2-135M-Instruct planted by the default recipe
(``organism.RECIPES[models.ORGANISM_MODEL]``) with its own seed and layer range (seed 1 is
the shipped organism, read from its cache). On known questions outside the organism's
reserve it scores every head by each method of ``patching.FINDERS``: path patching (signed
and |score|), attribution patching, activation patching (total effect, last position),
knockout attribution, the combination notebook 02 uses by default and a set-level greedy
knockout search, and grades each by the AUROC of the planted heads and precision@8. Then
generation, on other known questions: each planted head's own zero knockout and its delta
reverted (the organism without that head's planting), beside the planted set's knockout
and the found sets'; a planted head whose reverted delta leaves the caving and the effect
as they were is one planting left idle, not one a method misses. Writes ``recovery.json``
and ``recovery.md`` to ``--out``; organisms already in its ``recovery.json`` and not among
``--seeds`` are kept.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from spt_utils import ablation, data, evaluation, io, models, organism, patching, stats, tuning

# (seed, layers) of the organisms; seed 1 chose the default method, the others report it
PLACEMENTS = {1: (10, 30), 2: (10, 30), 3: (5, 25), 4: (15, 30)}
CHOSEN_ON = (1,)


def method_name(finder: patching.Finder) -> str:
    """A method's name in ``recovery.json`` and ``recovery.md``."""
    return finder.label + (" (default)" if finder.default else "")


PATH = method_name(patching.FINDERS["path"])
DEFAULT = next(method_name(finder) for finder in patching.FINDERS.values() if finder.default)


def first_answers(model, questions: Sequence[dict], path: Path) -> dict[str, dict]:
    """The base's own free-form first answers to every bank question, cached in ``path``."""
    if path.exists():
        return json.loads(path.read_text())
    answers = evaluation.own_first_answers(model, questions, protocol="free_form",
                                           progress=True)
    io.write_json(path, answers)
    return answers


def organism_of(seed: int, answers: dict[str, dict]):
    """(recipe, organism bridge, head deltas) for ``seed``: the cached shipped organism for
    its own seed, else a fresh planting."""
    recipe = replace(organism.RECIPES[models.ORGANISM_MODEL], seed=seed,
                     layers=PLACEMENTS[seed])
    if recipe == organism.RECIPES[models.ORGANISM_MODEL]:
        model = models.load_model(models.ORGANISM_MODEL, dtype="float32")
        deltas = load_file(str(models.organism_folder(models.ORGANISM_MODEL)
                               / models.ORGANISM_DELTAS))
        return recipe, model, {name: t.double() for name, t in deltas.items()}
    planted = organism.plant(recipe, answers=answers)
    deltas = tuning.head_deltas(planted.setup)
    tuning.finalize(planted.setup)
    return recipe, planted.organism, deltas


def head_delta_names(deltas: dict, head: tuple[int, int]) -> list[str]:
    layer, number = head
    return [name for name in deltas if name.startswith(f"layers.{layer}.")
            and name.endswith(f".head{number}")]


def shift(model, deltas: dict, names: Sequence[str], sign: float) -> None:
    models.add_head_deltas(model.original_model, {n: sign * deltas[n] for n in names},
                           "bench_recovery")


def effect(model, pairs) -> float:
    calibration = patching.calibrate(model, pairs)
    return calibration.reference - calibration.counterfactual


def admitted(model, questions, answers, max_new_tokens: int, **kwargs) -> int:
    records = evaluation.run_protocol(model, questions, answers,
                                      max_new_tokens=max_new_tokens, **kwargs)
    return sum(r["admitted"] for r in records)


def grade(score: torch.Tensor, planted) -> dict:
    graded = organism.recovery(score, planted)
    order = score.flatten().argsort(descending=True, stable=True).tolist()
    n_heads = score.shape[1]
    graded["planted_ranks"] = [order.index(layer * n_heads + head) + 1
                               for layer, head in planted]
    return graded


def top(score: torch.Tensor, k: int) -> list[tuple[int, int]]:
    n_heads = score.shape[1]
    return [divmod(int(i), n_heads) for i in score.flatten().argsort(descending=True,
                                                                      stable=True)[:k]]


def bench(seed: int, answers: dict, bank, args) -> dict:
    started = time.perf_counter()
    recipe, model, deltas = organism_of(seed, answers)
    planted = organism.draw_heads(recipe, model.cfg.n_layers, model.cfg.n_heads)
    reserved = set(organism.reserved_questions(recipe, bank)["id"])
    known = [row for row in bank.shuffle(seed=seed) if row["id"] not in reserved
             and answers[row["id"]]["correct"]]
    pair_rows, generate_rows = known[: args.pairs], known[args.pairs: args.pairs + args.generate]
    pairs = data.build_patching_pairs(pair_rows, model.tokenizer, answers=answers,
                                      protocol="free_form")
    tokens = patching.answer_tokens_from_replies(model, pairs)
    pairs = tokens.apply(pairs)
    timings, scores = {}, {}
    found: patching.Found = {}  # each method's own result on `pairs`, by name
    options = {"greedy": {"k": len(planted)}}
    for name, finder in patching.FINDERS.items():
        clock = time.perf_counter()
        if name == "activation":  # a forward pass per head: on the first pairs only
            score = finder.score(model, pairs.first(args.activation_pairs))
        else:
            score = finder.score(model, pairs, found, **options.get(name, {}))
        scores[method_name(finder)] = score
        timings[method_name(finder)] = time.perf_counter() - clock
    path, greedy = found["path"], found["greedy"]
    graded = {name: grade(score, planted) for name, score in scores.items()}

    generate = {"max_new_tokens": args.max_new_tokens}
    clean_effect = effect(model, pairs)
    heads = {"organism": admitted(model, generate_rows, answers, **generate),
             "counterfactual": admitted(model, generate_rows, answers,
                                        challenge=data.COUNTERFACTUAL_CHALLENGE, **generate)}
    sets = {"planted": planted, "path top-8": top(path.score, len(planted)),
            "default top-8": top(scores[DEFAULT], len(planted)),
            "greedy set": greedy.heads}
    knocked = {}
    for label, chosen in sets.items():
        with ablation.knockout(model, chosen, "zero"):
            knocked[label] = {"heads": [list(h) for h in chosen],
                              "admitted": admitted(model, generate_rows, answers, **generate)}
    per_head = []
    for head in planted:
        with ablation.knockout(model, [head], "zero"):
            zero = admitted(model, generate_rows, answers, **generate)
        names = head_delta_names(deltas, head)
        shift(model, deltas, names, -1.0)
        try:
            reverted_effect = effect(model, pairs)
            reverted = admitted(model, generate_rows, answers, **generate)
        finally:
            shift(model, deltas, names, 1.0)
        per_head.append({"head": list(head), "zero_knockout_admitted": zero,
                         "reverted_admitted": reverted,
                         "reverted_effect_share": reverted_effect / clean_effect,
                         "ranks": {name: g["planted_ranks"][planted.index(head)]
                                   for name, g in graded.items()}})
    return {"seed": seed, "layers": list(recipe.layers), "planted": [list(h) for h in planted],
            "chosen_on": seed in CHOSEN_ON, "n_pairs": len(pairs),
            "n_activation_pairs": min(args.activation_pairs, len(pairs)),
            "n_generate": len(generate_rows),
            "answer_tokens": {"apology": [model.tokenizer.decode([t]) for t in tokens.apology_ids],
                              "confirm": [model.tokenizer.decode([t]) for t in tokens.confirm_ids]},
            "graded": graded, "scores": {name: score.tolist() for name, score in scores.items()},
            "greedy_remaining": greedy.remaining, "generation": heads,
            "knockout_sets": knocked, "per_head": per_head, "timings_s": timings,
            "seconds": time.perf_counter() - started}


def report(results: list[dict]) -> str:
    """The benchmark as markdown: per method the AUROC and precision@8 on each organism,
    the mean over the organisms the default was not chosen on; then each planted head."""
    methods = list(results[0]["graded"])
    reported = [r for r in results if not r["chosen_on"]]
    head = " | ".join(f"seed {r['seed']} L{r['layers'][0]}-{r['layers'][1] - 1}"
                      + (" (chose)" if r["chosen_on"] else "") for r in results)
    lines = [f"| method | ranked by | {head} | mean over the reported |",
             "| --- | --- | " + " --- |" * (len(results) + 1)]
    for method in methods:
        for ranking in ("signed", "absolute"):
            cells = [f"{r['graded'][method][ranking]['auroc']:.2f}, "
                     f"{r['graded'][method][ranking]['found']}/8" for r in results]
            mean_auroc = sum(r["graded"][method][ranking]["auroc"] for r in reported) / max(
                len(reported), 1)
            mean_found = sum(r["graded"][method][ranking]["found"] for r in reported) / max(
                len(reported), 1)
            lines.append(f"| {method} | {ranking} | " + " | ".join(cells)
                         + f" | {mean_auroc:.2f}, {mean_found:.1f}/8 |")
    lines += ["", "AUROC of the planted heads, planted heads in the top 8.", ""]
    for r in results:
        n = r["n_generate"]

        def shown(k: int, n: int = n) -> str:  # an admitted count of n, with its interval
            return stats.format_rate(stats.rate_of(k, n))

        sets = ", ".join(f"{label} {shown(value['admitted'])}"
                         for label, value in r["knockout_sets"].items())
        lines += [f"### seed {r['seed']} (layers {r['layers'][0]}-{r['layers'][1] - 1}; "
                  f"answer tokens {r['answer_tokens']})", "",
                  f"Admitted when doubted: organism {shown(r['generation']['organism'])}, "
                  f"under the counterfactual {shown(r['generation']['counterfactual'])}; zero "
                  f"knockout of {sets}.", "",
                  "| planted head | own zero knockout: admitted | delta reverted: admitted "
                  "| delta reverted: effect left | rank by path | rank by default |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| L{h['head'][0]}H{h['head'][1]} | {shown(h['zero_knockout_admitted'])} | "
                  f"{shown(h['reverted_admitted'])} | {h['reverted_effect_share']:.2f} | "
                  f"{h['ranks'][PATH]} | {h['ranks'][DEFAULT]} |"
                  for h in r["per_head"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=sorted(PLACEMENTS))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--activation-pairs", type=int, default=8)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    args = parser.parse_args()
    unknown = sorted(set(args.seeds) - set(PLACEMENTS))
    if unknown:
        parser.error(f"--seeds {unknown}: no placement; known seeds {sorted(PLACEMENTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bank = data.load_source(organism.RECIPES[models.ORGANISM_MODEL].source)
    base = models.load_model(models.DEFAULT_MODEL, dtype="float32")
    answers = first_answers(base, list(bank), args.out / "first_answers.json")
    del base
    saved = args.out / "recovery.json"
    # organisms measured before and not asked for again are kept
    results = [r for r in json.loads(saved.read_text()) if r["seed"] not in args.seeds] \
        if saved.exists() else []
    for seed in args.seeds:
        results.append(bench(seed, answers, bank, args))
        results.sort(key=lambda r: r["seed"])
        io.write_json(saved, results)
        print(f"seed {seed}: {results[-1]['seconds']:.0f} s", flush=True)
    (args.out / "recovery.md").write_text(report(results) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
