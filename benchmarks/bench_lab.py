"""One update of the live head lab on SmolLM2: how long after a click until the lab is ready?

    python benchmarks/bench_lab.py [--pairs 8] [--max-new-tokens 40] [--clicks 3]
        [--model NAME (default: the run's organism)] [--method interchange|mean]

An update is one greedy reply of up to ``--max-new-tokens`` tokens with the knockout set
ablated plus both sides' logit differences (clean and ablated) of ``--pairs`` held-out pairs
(under ``interchange``, notebook 03's knockout on the default organism, the counterfactual
side holds no doubt and is its clean run, and the doubting side runs from the clean KV cache
of what precedes its challenge: printed beside the full runs).
Prints the seconds of each click through the headless path (``run_script``) and through the
live path (worker thread: click to the reply shown, and to ready), and of a reply and the
pair metrics alone; side by side, a reply checked against its question's last reply (the lab's
way, ``chat.greedy_from_draft``) and the same reply generated from nothing.
First answers are the scripted correct answers; mean ablation's means over other questions' prompts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spt_utils import ablation, chat, data, models, viz

# heads spread over the layers; the timing does not depend on which heads are clicked
CLICKS = [(3, 1), (10, 4), (17, 2), (24, 7), (29, 0), (7, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the lab as `make run` and `make lab` open it: the default organism, interchange knockout
    parser.add_argument("--model", default=models.RUN_MODEL)
    parser.add_argument("--pairs", type=int, default=8, help="held-out pairs averaged")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--clicks", type=int, default=3, help="clicks per path (at most 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machine)")
    parser.add_argument("--method", choices=("mean", "interchange"), default="interchange")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.load_model(args.model)
    bank = data.load_starter()
    questions = bank.select(range(args.pairs)).to_list()
    answers = {q["id"]: {"answer": q["correct_answer"], "correct": True} for q in questions}
    reference = bank.select(range(100, 108))
    prompts = ablation.challenge_tokens(model, [
        data.challenge_conversation(q, challenge, protocol="free_form") for q in reference
        for challenge in (data.REFERENCE_CHALLENGE, data.COUNTERFACTUAL_CHALLENGE)])
    means = ablation.HeadMeans.from_activations(ablation.collect_z(model, prompts))
    probe = ablation.KnockoutProbe(
        model, questions, answers, protocol="free_form", means=means,
        interchange=ablation.Interchange.from_challenges(model.tokenizer),
        max_new_tokens=args.max_new_tokens)
    score = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    clicks = [(layer % model.cfg.n_layers, head % model.cfg.n_heads) for layer, head in CLICKS]
    clicks = clicks[: 2 * min(args.clicks, 3)]

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        lab = viz.HeadLab(probe, score, Path(folder) / "heads.json", method=args.method)
        print(f"{args.model}, {args.method}: {model.cfg.n_layers} layers x {model.cfg.n_heads} "
              f"heads, {args.pairs} pairs, "
              f"replies up to {args.max_new_tokens} tokens, {args.threads} thread(s)")
        print(f"first update (the unablated reply, pairs): {time.perf_counter() - started:.2f} s")
        headless = []
        for click in clicks[: len(clicks) // 2]:
            headless.append(lab.run_script([click]).seconds)
        live, shown = [], []
        lab.conversation_view.observe(lambda change: shown.append(time.perf_counter()),
                                      names="value")
        for layer, head in clicks[len(clicks) // 2 :]:
            shown.clear()
            started = time.perf_counter()
            lab.selector.toggle(layer, head)  # what a click does; returns at once
            returned = time.perf_counter() - started
            lab.wait()
            live.append(time.perf_counter() - started)
            print(f"live click {viz.head_name((layer, head))}: returned in {returned * 1e3:.1f} "
                  f"ms, reply shown after {shown[0] - started:.2f} s, ready after "
                  f"{live[-1]:.2f} s")
        heads = list(lab.state.request.heads)
        started = time.perf_counter()
        reply = probe.reply(heads, args.method, 0)
        reply_seconds = time.perf_counter() - started
        drafted, undrafted = [], []  # side by side: the reply from its last one, from nothing
        for _ in range(3):
            started = time.perf_counter()
            assert probe.reply(heads, args.method, 0) == reply
            drafted.append(time.perf_counter() - started)
            started = time.perf_counter()
            with probe.intervention(heads, args.method):
                alone, = chat.generate(model, [probe.conversation(0)],
                                       max_new_tokens=args.max_new_tokens)
            undrafted.append(time.perf_counter() - started)
            assert alone == reply["reply"]
        print(f"the same set asked again (its draft all right, the best case): the reply "
              f"checked against the last one {statistics.median(drafted):.2f} s, "
              f"generated from nothing {statistics.median(undrafted):.2f} s "
              f"({statistics.median(undrafted) / statistics.median(drafted):.1f}x; the same "
              "reply)")
        started = time.perf_counter()
        metrics = probe.pair_metrics(heads, args.method)
        metrics_seconds = time.perf_counter() - started
        if args.method == "interchange":  # side by side: the full runs, no clean prefixes
            started = time.perf_counter()
            full = ablation.pair_metrics(model, probe.pairs, heads, args.method,
                                         interchange=probe.interchange, clean=probe.clean(),
                                         n_boot=probe.n_boot, seed=probe.seed)
            full_seconds = time.perf_counter() - started
            gap = max(abs(a["reference"] - b["reference"])
                      for a, b in zip(metrics["per_pair"], full["per_pair"], strict=True))
            print(f"pair metrics from the clean prefixes {metrics_seconds:.2f} s, full runs "
                  f"{full_seconds:.2f} s ({full_seconds / metrics_seconds:.1f}x); largest "
                  f"difference of a pair's logit difference {gap:.1e}")
    n_tokens = len(model.tokenizer(reply["reply"])["input_ids"])
    print("headless updates (run_script):", ", ".join(f"{s:.2f}" for s in headless), "s")
    print("live updates (click to ready):", ", ".join(f"{s:.2f}" for s in live), "s")
    print(f"median update: {statistics.median(headless + live):.2f} s "
          f"(one reply alone {reply_seconds:.2f} s for {n_tokens} tokens; pair metrics alone "
          f"{metrics_seconds:.2f} s)")


if __name__ == "__main__":
    main()
