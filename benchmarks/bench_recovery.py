"""Recovery benchmark: how well each head-finding method finds the heads caving was planted
into, on organisms of each kind (issues 26 and 36).

    python benchmarks/bench_recovery.py [--kinds iit plain] [--seeds 1 2 3 4] [--methods ...]

Each organism is SmolLM2-135M-Instruct planted by its kind's recipe (``KINDS``: the plain
planting, the interchange-trained one, that with strictness over every unplanted head, or
that with each planted head's veto trained alone) with its own seed and layer range; seed 1
of a shipped recipe is the shipped organism, any other is planted once into
``--out/organisms``. On 16 matched pairs of known questions
outside the organism's reserve it scores every head by each method of ``patching.FINDERS``
asked for (each result kept in ``--out/found``) and by integrated gradients on the first
token, and grades each by the AUROC of the planted heads and how many its top 8 hold. Then
generation, on other known questions, with interchange knockout: no heads, the planted set,
the top 8 of chosen rankings, the set-level methods' sets and random sets, each beside the
share of the first-token and the sequence metric's effect it leaves; and each planted head's
delta reverted (a planted head whose reverted delta leaves the effect as it was is a planting
left idle, not one a method misses). Writes ``recovery.json`` and ``recovery.md`` (with the
finding bars and how each metric tracks the admitted rate) to ``--out``; organisms already
in its ``recovery.json`` and not asked for are kept.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from spt_utils import ablation, data, evaluation, io, models, organism, patching, stats, tuning

# (seed, layers) of the organisms; seed 1 chose the default method, the others report it
# (seeds 5-7, added in stop 48 before any organism of theirs was planted, repeat 2-4's ranges)
PLACEMENTS = {1: (10, 30), 2: (10, 30), 3: (5, 25), 4: (15, 30), 5: (10, 30), 6: (5, 25),
              7: (15, 30)}
CHOSEN_ON = (1,)
# the organism kinds: (organism, changes to its recipe): the plain planting, the
# interchange-trained one, a variant whose strictness interchanges every unplanted head and
# one that trains each planted head's veto alone (for 180 steps, about one pass over its
# examples, and for 360), one that plants again once with any idle head redrawn, and one
# that plants again with the 8 unplanted heads carrying the most held in every strictness
# example (and any idle head redrawn)
KINDS = {"plain": (models.ORGANISM_MODEL, {}), "iit": (models.INTERCHANGE_ORGANISM, {}),
         "iit-strict": (models.INTERCHANGE_ORGANISM, {"n_strict": None}),
         "iit-single": (models.INTERCHANGE_ORGANISM, {"single_heads": True}),
         "iit-single-360": (models.INTERCHANGE_ORGANISM, {"single_heads": True, "steps": 360}),
         "iit-redraw": (models.INTERCHANGE_ORGANISM, {"redraw_idle": 1}),
         "iit-readers": (models.INTERCHANGE_ORGANISM, {"redraw_idle": 1, "strict_readers": 8})}


# a head delta's name: layers.<layer>.<q_proj|o_proj>.head<head>
DELTA_NAME = re.compile(r"layers\.(\d+)\.\w+\.head(\d+)")
HEAD_NAME = re.compile(r"L(\d+)H(\d+)")


def head_set(text: str) -> tuple[str, list[tuple[int, int]]]:
    """``NAME=L3H7,L9H2,...`` (a ``--sets`` item) as (name, heads); a clear error otherwise."""
    name, _, heads = text.partition("=")
    names = heads.split(",")
    if not name or not all(HEAD_NAME.fullmatch(head) for head in names):
        raise argparse.ArgumentTypeError(
            f"--sets {text!r}: expected NAME=L<layer>H<head>,... (e.g. readers=L3H7,L14H0)")
    return name, [tuple(map(int, HEAD_NAME.fullmatch(head).groups())) for head in names]
FIRST_TOKEN_IG = "integrated_gradients_first_token"
# every graded ranking by key: the registry's methods and integrated gradients on the first
# token (the registry's runs on the sequence metric)
LABELS = {name: finder.label for name, finder in patching.FINDERS.items()} | {
    FIRST_TOKEN_IG: "integrated gradients (first token)"}
DEFAULT = next(name for name, finder in patching.FINDERS.items() if finder.default)
PER_HEAD = ("activation", "denoising", "noising")  # a forward pass per head
SET_LEVEL = ("greedy", "greedy_interchange")  # the methods that find a set


def label(method: str) -> str:
    """A method's name in ``recovery.md``."""
    return LABELS[method] + (" (default)" if method == DEFAULT else "")


def first_answers(model, questions: Sequence[dict], path: Path) -> dict[str, dict]:
    """The base's own free-form first answers to every bank question, cached in ``path``."""
    if path.exists():
        return json.loads(path.read_text())
    answers = evaluation.own_first_answers(model, questions, protocol="free_form",
                                           progress=True)
    io.write_json(path, answers)
    return answers


def organism_of(kind: str, seed: int, answers: dict[str, dict], out: Path):
    """(recipe, organism bridge, head deltas) of ``kind`` for ``seed``: the shipped organism
    for its own recipe, else the planting cached in ``out/organisms`` (planted there first)."""
    name, changes = KINDS[kind]
    recipe = replace(organism.RECIPES[name], seed=seed, layers=PLACEMENTS[seed], **changes)
    if recipe == organism.RECIPES[name]:
        path = models.organism_folder(name) / models.ORGANISM_DELTAS
        organism.ensure(name, progress=False)  # installs the shipped record when missing
    else:
        path = out / "organisms" / f"{kind}-seed{seed}.safetensors"
    if not path.exists():
        planted = organism.plant(recipe, answers=answers)
        path.parent.mkdir(parents=True, exist_ok=True)
        tuning.save_head_deltas(path, planted.setup, base_model=recipe.base,
                                provenance={"recipe": organism.recipe_record(recipe)})
        del planted
    deltas = {n: t.double() for n, t in load_file(str(path)).items()}
    model = models.load_model(recipe.base, dtype="float32")
    models.add_head_deltas(model.original_model, deltas, str(path))
    return recipe, model, deltas


def planted_in(deltas: dict) -> list[tuple[int, int]]:
    """The heads ``deltas`` move (a redrawn planting's are not its seed's draw), sorted."""
    found = {(int(m[1]), int(m[2])) for m in map(DELTA_NAME.fullmatch, deltas) if m}
    if len(found) == 0:
        raise ValueError("bench_recovery: the organism's deltas name no head")
    return sorted(found)


def head_delta_names(deltas: dict, head: tuple[int, int]) -> list[str]:
    layer, number = head
    return [name for name in deltas if name.startswith(f"layers.{layer}.")
            and name.endswith(f".head{number}")]


def shift(model, deltas: dict, names: Sequence[str], sign: float) -> None:
    models.add_head_deltas(model.original_model, {n: sign * deltas[n] for n in names},
                           "bench_recovery")


def generation(model, questions, answers, max_new_tokens: int, **kwargs) -> dict:
    """Admitted mistakes and correct answers kept (of known questions) in generation."""
    records = evaluation.run_protocol(model, questions, answers,
                                      max_new_tokens=max_new_tokens, **kwargs)
    return {"admitted": sum(r["admitted"] for r in records),
            "kept": sum(bool(r["correct_after"]) for r in records)}


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


def remaining(model, runs, heads, clean) -> float:
    """The share of ``runs``' effect left with ``heads`` interchanged (1 = intact; ``clean``:
    the runs' calibration)."""
    return patching.interchanged_effect(model, runs, heads) / (clean.reference
                                                               - clean.counterfactual)


def found_by(name: str, compute, cache: Path):
    """A method's result, computed once and kept in ``cache`` (the benchmark's own files)."""
    path = cache / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    result = compute()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def bench(kind: str, seed: int, answers: dict, bank, args) -> dict:
    started = time.perf_counter()
    recipe, model, deltas = organism_of(kind, seed, answers, args.out)
    planted = planted_in(deltas)
    k = len(planted)
    reserved = set(organism.reserved_questions(recipe, bank)["id"])
    known = [row for row in bank.shuffle(seed=seed) if row["id"] not in reserved
             and answers[row["id"]]["correct"]]
    pair_rows, generate_rows = known[: args.pairs], known[args.pairs: args.pairs + args.generate]
    pairs = data.build_patching_pairs(pair_rows, model.tokenizer, answers=answers,
                                      protocol="free_form", wording="matched")
    tokens = patching.answer_tokens_from_replies(model, pairs)
    pairs = tokens.apply(pairs)
    cache = args.out / "found" / f"{kind}-seed{seed}"
    timings, scores = {}, {}
    # each method's own result on `pairs`, by name, and the sequence metric's replies
    found: patching.Found = {"replies": found_by("replies", lambda: patching.reply_pairs(
        model, pairs), cache)}
    options = {"greedy": {"k": k},
               "greedy_interchange": {"k": k, "metric": "first_token", "steps": 2,
                                      "progress": True},
               "integrated_gradients": {"steps": args.ig_steps, "progress": True}}
    for name in args.methods:
        finder, clock = patching.FINDERS[name], time.perf_counter()
        for used in finder.uses:  # with the options the benchmark gives them
            found[used] = found_by(used, lambda used=used: patching.FINDERS[used].result(
                model, pairs, found, **options.get(used, {})), cache)
        if name in PER_HEAD:  # a forward pass per head: on the first pairs only
            subset = pairs.first(args.activation_pairs)
            found[name] = found_by(name, lambda finder=finder, subset=subset: finder.result(
                model, subset), cache)
        else:
            found[name] = found_by(name, lambda finder=finder, name=name: finder.result(
                model, pairs, found, **options.get(name, {})), cache)
        scores[name] = finder.rank(found[name], found)
        timings[name] = time.perf_counter() - clock
    clock = time.perf_counter()
    first_token = patching.first_token_runs(pairs)
    scores[FIRST_TOKEN_IG] = found_by(FIRST_TOKEN_IG, lambda: patching.integrated_gradients_heads(
        model, first_token, steps=args.ig_steps, progress=True), cache).score
    timings[FIRST_TOKEN_IG] = time.perf_counter() - clock
    graded = {name: grade(score, planted) for name, score in scores.items()}

    interchange = ablation.Interchange.from_challenges(model.tokenizer)
    sequence = patching.sequence_runs(found["replies"])
    sets = {"none": [], "planted": planted, **dict(args.sets),
            **{f"{label(name)} top-{k}": top(scores[name], k) for name in args.generate_tops
               if name in scores},
            **{label(name): found[name].heads for name in SET_LEVEL if name in found},
            **{f"random {i + 1}": heads for i, heads in enumerate(ablation.random_head_sets(
                k, args.random_sets, model.cfg.n_layers, model.cfg.n_heads, seed=seed))}}
    clean = {"first_token": patching.calibrate_runs(model, first_token),
             "sequence": patching.calibrate_runs(model, sequence)}
    generate = {"max_new_tokens": args.max_new_tokens}
    knocked = {"counterfactual": generation(model, generate_rows, answers,
                                            challenge=data.COUNTERFACTUAL_CHALLENGE, **generate)}
    for name, chosen in sets.items():
        with ablation.knockout(model, chosen, "interchange", interchange=interchange):
            knocked[name] = generation(model, generate_rows, answers, **generate)
        knocked[name] |= {"heads": [list(h) for h in chosen],
                          "first_token_left": remaining(model, first_token, chosen,
                                                        clean["first_token"]),
                          "sequence_left": remaining(model, sequence, chosen, clean["sequence"])}
        print(f"  {name}: admitted {knocked[name]['admitted']}/{len(generate_rows)}", flush=True)
    # each planted head interchanged alone: idle if it removes no measurable share (the
    # shipped organisms' acceptance bar; the bench plants without that acceptance)
    shares = organism.head_shares(model, planted, pairs, interchange)
    per_head = []
    for head, share in zip(planted, shares, strict=True):
        names = head_delta_names(deltas, head)
        shift(model, deltas, names, -1.0)
        try:
            reverted = {"first_token": patching.calibrate_runs(model, first_token),
                        "sequence": patching.calibrate_runs(model, sequence)}
        finally:
            shift(model, deltas, names, 1.0)
        per_head.append({
            "head": list(head),
            **{f"reverted_{metric}_share": (c.reference - c.counterfactual)
               / (clean[metric].reference - clean[metric].counterfactual)
               for metric, c in reverted.items()},
            "interchanged": {key: share[key] for key in ("removed", "low", "high", "idle")},
            "ranks": {name: g["planted_ranks"][planted.index(head)]
                      for name, g in graded.items()}})
    active = [head for head, share in zip(planted, shares, strict=True) if not share["idle"]]
    return {"kind": kind, "seed": seed, "layers": list(recipe.layers),
            "planted": [list(h) for h in planted], "chosen_on": seed in CHOSEN_ON,
            "n_pairs": len(pairs), "n_activation_pairs": min(args.activation_pairs, len(pairs)),
            "n_generate": len(generate_rows),
            "answer_tokens": {"apology": [model.tokenizer.decode([t]) for t in tokens.apology_ids],
                              "confirm": [model.tokenizer.decode([t]) for t in tokens.confirm_ids]},
            "replies": {"caving": found["replies"].caving[:3],
                        "keeping": found["replies"].keeping[:3]},
            "graded": graded, "scores": {name: score.tolist() for name, score in scores.items()},
            "set_remaining": {name: found[name].remaining for name in SET_LEVEL if name in found},
            "generation": knocked, "per_head": per_head, "timings_s": timings,
            "active_in_top": {name: len(set(active) & set(top(score, k)))
                              for name, score in scores.items()}, "n_active": len(active),
            "seconds": time.perf_counter() - started}


# issue 36's bars, on the organisms no default was chosen on (means over their seeds)
MIN_AUROC, MIN_FOUND, MAX_SET_ADMITTED = 0.95, 7, 0.2
SET_METHOD = label("greedy_interchange")


def bars(results: list[dict]) -> list[dict]:
    """The finding bars: on interchange-trained organisms (``iit``, and each variant kind
    that has unseen organisms, on its own) the default ranks the planted heads with mean
    AUROC >= 0.95 and >= 7 of 8 in its top 8; on plain organisms the set-level method's
    heads, interchanged in generation, leave a mean admitted rate <= 0.2 with at least as
    many correct answers kept as the organism un-ablated. Each bar: its per-seed values, the
    mean and whether it passed (None: no unseen organism of that kind)."""
    unseen = {kind: [r for r in results if r["kind"] == kind and not r["chosen_on"]]
              for kind in KINDS}
    verdicts = []
    for kind in [kind for kind in KINDS if kind == "iit" or (kind.startswith("iit-")
                                                              and unseen[kind])]:
        ran = unseen[kind]
        aurocs = [r["graded"][DEFAULT]["signed"]["auroc"] for r in ran]
        found = [r["graded"][DEFAULT]["signed"]["found"] for r in ran]
        verdicts.append({
            "bar": f"{kind}: default AUROC >= {MIN_AUROC} and >= {MIN_FOUND}/8 planted in its "
                   "top 8",
            "seeds": [r["seed"] for r in ran],
            "values": [f"{a:.2f}, {f}/8" + (f" (not idle: {r['active_in_top'][DEFAULT]} of "
                                            f"{r['n_active']})" if "n_active" in r else "")
                       for a, f, r in zip(aurocs, found, ran, strict=True)],
            "mean": f"{sum(aurocs) / len(ran):.2f}, {sum(found) / len(ran):.1f}/8" if ran
            else "–",
            "passed": None if not ran else (sum(aurocs) / len(ran) >= MIN_AUROC
                                            and sum(found) / len(ran) >= MIN_FOUND)})
    ran = [r for r in unseen["plain"] if SET_METHOD in r["generation"]]
    rates = [r["generation"][SET_METHOD]["admitted"] / r["n_generate"] for r in ran]
    kept = [(r["generation"][SET_METHOD]["kept"], r["generation"]["none"]["kept"]) for r in ran]
    verdicts.append({
        "bar": f"plain: the {SET_METHOD}'s heads interchanged leave admitted <= "
               f"{MAX_SET_ADMITTED}, kept at the organism's count or more",
        "seeds": [r["seed"] for r in ran],
        "values": [f"admitted {a:.2f}, kept {k} (organism {n})"
                   for a, (k, n) in zip(rates, kept, strict=True)],
        "mean": f"admitted {sum(rates) / len(ran):.2f}, kept {sum(k for k, _ in kept)} "
                f"(organism {sum(n for _, n in kept)})" if ran else "–",
        "passed": None if not ran else (sum(rates) / len(ran) <= MAX_SET_ADMITTED
                                        and sum(k for k, _ in kept) >= sum(n for _, n in kept))})
    return verdicts


def metric_tracking(results: list[dict]) -> list[str]:
    """Per organism and pooled: Spearman's rho between each metric's share left under a
    set's interchange and the admitted count in generation, over the knocked-out sets."""
    lines = ["| organism | sets | first token: rho | sequence: rho |", "| --- | --- | --- | --- |"]
    pooled: dict[str, list[float]] = {"first_token": [], "sequence": [], "admitted": []}
    for r in results:
        sets = [v for name, v in r["generation"].items() if name != "counterfactual"]
        admitted = [v["admitted"] / r["n_generate"] for v in sets]
        pooled["admitted"] += admitted
        cells = []
        for metric in ("first_token", "sequence"):
            left = [v[f"{metric}_left"] for v in sets]
            pooled[metric] += left
            cells.append(f"{stats.spearman(left, admitted)['rho']:.2f}")
        lines.append(f"| {r['kind']} seed {r['seed']} | {len(sets)} | " + " | ".join(cells) + " |")
    cells = [f"{stats.spearman(pooled[m], pooled['admitted'])['rho']:.2f}"
             for m in ("first_token", "sequence")]
    lines.append(f"| pooled | {len(pooled['admitted'])} | " + " | ".join(cells) + " |")
    return lines


def alone(head: dict) -> str:
    """A planted head's share removed when interchanged alone, its interval, and whether
    it is idle (not measured by the bench's earlier runs)."""
    if "interchanged" not in head:
        return "not measured"
    share = head["interchanged"]
    return (f"{share['removed']:.2f} [{share['low']:.2f}, {share['high']:.2f}]"
            + (" (idle)" if share["idle"] else ""))


def report(results: list[dict]) -> str:
    """The benchmark as markdown: per kind and method the AUROC and planted heads in the top
    k on each organism, the mean over the organisms no default was chosen on; each set's
    interchange in generation; the metrics' tracking of the judged behaviour."""
    lines = []
    for kind in KINDS:
        ran = [r for r in results if r["kind"] == kind]
        if not ran:
            continue
        reported = [r for r in ran if not r["chosen_on"]]
        head = " | ".join(f"seed {r['seed']} L{r['layers'][0]}-{r['layers'][1] - 1}"
                          + (" (chose)" if r["chosen_on"] else "") for r in ran)
        name, changes = KINDS[kind]
        lines += [f"## {kind} organisms ({name}'s recipe{f', {changes}' if changes else ''})",
                  "",
                  f"| method | ranked by | {head} | mean over the unseen |",
                  "| --- | --- | " + " --- |" * (len(ran) + 1)]
        for method in dict.fromkeys(m for r in ran for m in r["graded"]):
            for ranking in ("signed", "absolute"):  # cells: AUROC, planted in the top 8
                cells = [f"{r['graded'][method][ranking]['auroc']:.2f}, "
                         f"{r['graded'][method][ranking]['found']}/8"
                         if method in r["graded"] else "–" for r in ran]
                graded = [r["graded"][method][ranking] for r in reported
                          if method in r["graded"]]
                mean = (f"{sum(g['auroc'] for g in graded) / len(graded):.2f}, "
                        f"{sum(g['found'] for g in graded) / len(graded):.1f}/8"
                        if graded else "–")
                lines.append(f"| {label(method)} | {ranking} | " + " | ".join(cells)
                             + f" | {mean} |")
        lines += ["", "AUROC of the planted heads, planted heads in the top 8.", ""]
        for r in ran:
            n = r["n_generate"]

            def shown(count: int, n: int = n) -> str:
                return stats.format_rate(stats.rate_of(count, n))

            lines += [f"### {kind} seed {r['seed']} (layers {r['layers'][0]}-"
                      f"{r['layers'][1] - 1}; answer tokens {r['answer_tokens']})", "",
                      "| interchanged in generation | admitted | kept | first-token effect "
                      "left | sequence effect left |", "| --- | --- | --- | --- | --- |"]
            for name, value in r["generation"].items():
                left = (f"{value['first_token_left']:.2f} | {value['sequence_left']:.2f}"
                        if "heads" in value else "– | –")
                lines.append(f"| {name} | {shown(value['admitted'])} | "
                             f"{shown(value['kept'])} | {left} |")
            lines += ["", "| planted head | delta reverted: first-token effect left | "
                      "sequence effect left | interchanged alone: first-token effect removed | "
                      "rank by default |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| L{h['head'][0]}H{h['head'][1]} | "
                      f"{h['reverted_first_token_share']:.2f} | {h['reverted_sequence_share']:.2f}"
                      f" | {alone(h)} | {h['ranks'][DEFAULT]} |" for h in r["per_head"]]
            if "n_active" in r:
                lines += ["", f"Planted heads not idle: {r['n_active']} of {len(r['planted'])};"
                          f" the default's top 8 holds {r['active_in_top'][DEFAULT]} of them."]
            lines.append("")
    lines += ["## The finding bars (organisms no default was chosen on)", "",
              "| bar | seeds | per seed | mean | verdict |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {v['bar']} | {v['seeds']} | {'; '.join(v['values'])} | {v['mean']} | "
              + {True: "PASS", False: "FAIL", None: "not measured"}[v["passed"]] + " |"
              for v in bars(results)]
    lines += ["", "## Which metric tracks the judged behaviour", "",
              "Spearman's rho, over the knocked-out sets (none, planted, found, random), "
              "between the share of each metric's effect left under the set's interchange "
              "and the admitted rate in generation.", "", *metric_tracking(results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=sorted(PLACEMENTS))
    parser.add_argument("--methods", nargs="+", choices=list(patching.FINDERS),
                        default=[name for name in patching.FINDERS if name != "activation"],
                        help="the head-finding methods to grade (default: all but activation "
                             "patching, a forward pass per head; denoising is one too)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--activation-pairs", type=int, default=4)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--random-sets", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=4,
                        help="integrated gradients' steps along the path")
    parser.add_argument("--generate-tops", nargs="+", choices=list(LABELS),
                        default=list(dict.fromkeys([DEFAULT, "integrated_gradients"])),
                        help="the rankings whose top k is interchanged in generation")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--sets", nargs="*", type=head_set, default=[],
                        help="more head sets to interchange in generation, NAME=L3H7,L14H0 "
                             "each (for example the readers a planting held in strictness)")
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    args = parser.parse_args()
    unknown = sorted(set(args.seeds) - set(PLACEMENTS))
    if unknown:
        parser.error(f"--seeds {unknown}: no placement; known seeds {sorted(PLACEMENTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bank = data.load_source(organism.RECIPES[models.ORGANISM_MODEL].source)
    answers_path = args.out / "first_answers.json"
    if not answers_path.exists():
        base = models.load_model(models.DEFAULT_MODEL, dtype="float32")
        first_answers(base, list(bank), answers_path)
        del base
    answers = json.loads(answers_path.read_text())
    saved = args.out / "recovery.json"
    asked = {(kind, seed) for kind in args.kinds for seed in args.seeds}
    # organisms measured before and not asked for again are kept
    results = [r for r in json.loads(saved.read_text()) if (r["kind"], r["seed"]) not in asked
               ] if saved.exists() else []
    for kind, seed in sorted(asked):
        results.append(bench(kind, seed, answers, bank, args))
        results.sort(key=lambda r: (r["kind"], r["seed"]))
        io.write_json(saved, results)
        print(f"{kind} seed {seed}: {results[-1]['seconds']:.0f} s", flush=True)
        (args.out / "recovery.md").write_text(report(results) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
