"""Head knockout: ablate chosen attention heads and measure what the model loses (notebook 03).

An ablation replaces a head's output ``z`` (the input to the output projection, hook
``blocks.{l}.attn.hook_z``) at **every position**. Heads are (layer, query-head) pairs, so a
grouped-query model ablates single query heads, never a whole kv group. Three methods:

* ``zero``: ``z = 0``.
* ``mean``: ``z`` = the head's mean over every real (non-pad) position of a reference set of
  prompts (:class:`HeadMeans`, computed once, saved and loaded). One vector per head, used at
  every position, so it applies equally to prompts of any length and to generated tokens.
* ``resample``: ``z`` from another prompt (:class:`ResampleDonors`). Each batch row draws one
  donor prompt (seeded; the same donor for every layer and every decoding step), and the donor
  is **aligned from the end**: the row's last position gets the donor's last position, the one
  before it the donor's one before, and so on; positions before the donor's start reuse its
  first position. During cached generation each new token therefore gets the donor's last
  position (the end of its generation prompt). Use donors from prompts other than the ablated
  ones (the notebook uses the training questions).

Alignment from the end needs the inputs' real tokens to end at the last position, so every
measurement here runs **left-padded** with an attention mask and mask-derived position ids,
exactly as :func:`spt_utils.chat.generate` does. Pad positions are masked as keys in every
layer, so whatever an ablation writes there never reaches a real token (a test checks this).

Hooks added on the bridge also fire when its Hugging Face model runs, so
:func:`spt_utils.chat.generate` and :func:`spt_utils.evaluation.run_protocol` called inside
``with knockout(...)`` generate with the heads ablated (in every turn of the conversation);
the notebooks compose the two, so neither module imports the other.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat, viz
from spt_utils.data import PatchingPairs
from spt_utils.io import atomic_write
from spt_utils.patching import (
    Calibration,
    Head,
    answer_logit_diff,
    cache_before_unembed,
    validate_heads,
    z_name,
)

METHODS = ("zero", "mean", "resample")


@torch.no_grad()
def collect_z(
    model: TransformerBridge, sequences: Sequence[Tensor], *, batch_size: int = 8
) -> list[Float[Tensor, "pos n_layers n_heads d_head"]]:
    """Every head's ``z`` at every real position of each token sequence (right-padded runs)."""
    if not sequences:
        raise ValueError("collect_z: no sequences")
    names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    collected = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch, last = chat.pad_right(chunk, model.tokenizer.pad_token_id)
        cache = cache_before_unembed(model, batch, names)
        # z: [batch, pos, head, d_head] per layer → [batch, pos, layer, head, d_head]
        z = torch.stack([cache[name] for name in names], dim=2).cpu()
        collected += [z[row, : int(last[row]) + 1] for row in range(len(chunk))]
    return collected


@dataclass
class HeadMeans:
    """Each head's mean ``z`` over the real positions of a reference set of prompts."""

    z: Float[Tensor, "n_layers n_heads d_head"]
    n_prompts: int
    n_positions: int

    @classmethod
    def from_activations(
        cls, activations: Sequence[Float[Tensor, "pos n_layers n_heads d_head"]]
    ) -> HeadMeans:
        stacked = torch.cat(list(activations))  # [positions, layer, head, d_head]
        return cls(stacked.mean(0), n_prompts=len(activations), n_positions=len(stacked))

    def save(self, path: str | Path) -> None:
        with atomic_write(path, "wb") as handle:
            torch.save(self.__dict__, handle)

    @classmethod
    def load(cls, path: str | Path) -> HeadMeans:
        try:
            return cls(**torch.load(path, weights_only=True))
        except (TypeError, KeyError) as error:
            raise ValueError(f"{path}: not a HeadMeans file ({error})") from error

    def values(self, layer: int, z: Tensor, rows: Tensor) -> Tensor:
        return self.z[layer].to(z)[None, None]  # [1, 1, head, d_head]


@dataclass
class ResampleDonors:
    """``z`` of donor prompts, stored left-padded (pads repeat each donor's first position)."""

    z: Float[Tensor, "n_donors pos n_layers n_heads d_head"]
    seed: int = 0

    @classmethod
    def from_activations(
        cls, activations: Sequence[Float[Tensor, "pos n_layers n_heads d_head"]], seed: int = 0
    ) -> ResampleDonors:
        if not activations:
            raise ValueError("ResampleDonors: no donor prompts")
        width = max(len(a) for a in activations)
        padded = [torch.cat([a[:1].expand(width - len(a), *a.shape[1:]), a]) for a in activations]
        return cls(torch.stack(padded), seed=seed)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self._order = torch.randperm(len(self.z), generator=generator)

    def donor_of(self, rows: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
        """Each prompt's donor, from a seeded permutation of the pool indexed by the prompt's
        number: a prompt keeps its donor however it is batched (distinct within the pool)."""
        return self._order[rows.cpu() % len(self.z)]

    def values(self, layer: int, z: Tensor, rows: Tensor) -> Tensor:
        pos = z.shape[1]
        donors = self.z[self.donor_of(rows), -pos:, layer]  # [batch, ≤ pos, head, d_head]
        if pos > donors.shape[1]:
            donors = torch.cat([donors[:, :1].expand(-1, pos - donors.shape[1], -1, -1), donors], 1)
        return donors.to(z)


class _Zero:
    def values(self, layer: int, z: Tensor, rows: Tensor) -> Tensor:
        return z.new_zeros(())


def _source(
    method: str, means: HeadMeans | None, donors: ResampleDonors | None
) -> _Zero | HeadMeans | ResampleDonors:
    if method == "zero":
        return _Zero()
    if method == "mean":
        if means is None:
            raise ValueError("knockout(method='mean') needs means=HeadMeans")
        return means
    if method == "resample":
        if donors is None:
            raise ValueError("knockout(method='resample') needs donors=ResampleDonors")
        return donors
    raise ValueError(f"knockout: method {method!r} is not one of {METHODS}")


def _ablate_z(
    z: Float[Tensor, "batch pos head d_head"],
    hook: HookPoint,
    *,
    layer: int,
    mask: Bool[Tensor, "batch_or_1 head"],
    source: _Zero | HeadMeans | ResampleDonors,
    rows: Int[Tensor, " batch"] | None,
) -> Float[Tensor, "batch pos head d_head"]:
    """Replace the masked heads' ``z`` with the source's values; ``rows`` numbers each batch
    row's prompt (default: its place in the batch), which picks its resample donor."""
    rows = torch.arange(len(z)) if rows is None else rows
    return torch.where(mask.to(z.device)[:, None, :, None], source.values(layer, z, rows), z)


def head_mask(
    heads: Sequence[Head], n_layers: int, n_heads: int
) -> Bool[Tensor, "n_layers n_heads"]:
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in validate_heads(list(heads), n_layers, n_heads):
        mask[layer, head] = True
    return mask


def _check_shape(model: TransformerBridge, source: object) -> None:
    expected = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    if isinstance(source, HeadMeans) and tuple(source.z.shape) != expected:
        raise ValueError(f"HeadMeans.z has shape {tuple(source.z.shape)}, the model {expected}")
    if isinstance(source, ResampleDonors) and tuple(source.z.shape[2:]) != expected:
        raise ValueError(f"ResampleDonors.z ends in {tuple(source.z.shape[2:])}, not {expected}")


@contextlib.contextmanager
def _masked_knockout(
    model: TransformerBridge,
    mask: Bool[Tensor, "batch_or_1 n_layers n_heads"],
    source: _Zero | HeadMeans | ResampleDonors,
    rows: Int[Tensor, " batch"] | None = None,
) -> Iterator[None]:
    _check_shape(model, source)
    hooks = [
        (
            z_name(layer),
            partial(_ablate_z, layer=layer, mask=mask[:, layer], source=source, rows=rows),
        )
        for layer in range(model.cfg.n_layers)
        if mask[:, layer].any()
    ]
    with model.hooks(fwd_hooks=hooks):
        yield


@contextlib.contextmanager
def knockout(
    model: TransformerBridge,
    heads: Sequence[Head],
    method: str = "mean",
    *,
    means: HeadMeans | None = None,
    donors: ResampleDonors | None = None,
) -> Iterator[None]:
    """Ablate ``heads`` (``[(layer, query_head), ...]``) inside the ``with`` block.

    Every forward pass of the bridge or of its HF model (so also generation) sees the heads
    ablated; the hooks are removed on exit, also after an exception. An empty set is the
    identity (no hooks at all).
    """
    source = _source(method, means, donors)
    mask = head_mask(heads, model.cfg.n_layers, model.cfg.n_heads)
    with _masked_knockout(model, mask[None], source):
        yield


def challenge_tokens(model: TransformerBridge, conversations: Sequence[list]) -> list[Tensor]:
    return [chat.tokens(model.tokenizer, c) for c in conversations]


def _left_padded(
    tokens: Int[Tensor, "batch pos"], last: Int[Tensor, " batch"], pad: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded pairs → left-padded ids, attention mask and position ids (as generate)."""
    rows = [row[: int(end) + 1] for row, end in zip(tokens, last, strict=True)]
    ids, attention = chat.pad_left(rows, pad)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions


@torch.no_grad()
def ablated_logit_diffs(
    model: TransformerBridge,
    pairs: PatchingPairs,
    head_sets: Sequence[Sequence[Head]],
    method: str = "mean",
    *,
    means: HeadMeans | None = None,
    donors: ResampleDonors | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, "n_sets n_pairs"]:
    """The reference prompts' last-position logit difference with each head set ablated.

    Head sets are batched together: each row of a forward pass carries its own head mask.
    """
    source = _source(method, means, donors)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    masks = torch.stack([head_mask(s, n_layers, n_heads) for s in head_sets])
    ids, attention, positions = _left_padded(
        pairs.reference, pairs.reference_last, model.tokenizer.pad_token_id
    )
    n_pairs = len(pairs)
    rows = [(s, p) for s in range(len(head_sets)) for p in range(n_pairs)]
    diffs = torch.empty(len(head_sets), n_pairs)
    device = model.cfg.device
    for start in tqdm(range(0, len(rows), batch_size), desc="knockout", disable=not progress):
        chunk = rows[start : start + batch_size]
        sets = torch.tensor([s for s, _ in chunk])
        prompts = torch.tensor([p for _, p in chunk])
        with _masked_knockout(model, masks[sets], source, rows=prompts):
            logits = model.original_model(
                input_ids=ids[prompts].to(device),
                attention_mask=attention[prompts].to(device),
                position_ids=positions[prompts].to(device),
            ).logits[:, -1]  # [batch, d_vocab]
        diffs[sets, prompts] = answer_logit_diff(
            logits.float().cpu(), pairs.apology_ids, pairs.confirm_ids
        )
    return diffs


def random_head_sets(
    k: int, n: int, n_layers: int, n_heads: int, *, seed: int = 0
) -> list[list[Head]]:
    """``n`` seeded sets of ``k`` distinct heads drawn uniformly from all heads."""
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    rng = random.Random(f"{seed}-{k}")
    return [sorted(rng.sample(every, k)) for _ in range(n)]


def bottom_heads(
    scores: Float[Tensor, "n_layers n_heads"], ranking: Sequence[Head], k: int
) -> list[Head]:
    """The ``k`` heads at the opposite end of ``scores`` from the ranking's top heads.

    The sign convention of ``scores`` is read off the ranking: the end holding the ranking's
    first head is the top, the other end the bottom (most opposite-signed).
    """
    flat = scores.flatten().float()
    n_heads = scores.shape[1]
    top_layer, top_head = ranking[0]
    sign = 1.0 if flat[top_layer * n_heads + top_head] >= flat.median() else -1.0
    order = torch.argsort(sign * flat)[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def _interval(values: Sequence[float]) -> dict[str, float]:
    tensor = torch.tensor(list(values), dtype=torch.float64)
    return {
        "mean": tensor.mean().item(),
        "low": torch.quantile(tensor, 0.025).item(),
        "high": torch.quantile(tensor, 0.975).item(),
        "n": len(tensor),
    }


def sweep(
    model: TransformerBridge,
    pairs: PatchingPairs,
    calibration: Calibration,
    ranking: Sequence[Head],
    *,
    ks: Sequence[int],
    n_random: int = 20,
    scores: Float[Tensor, "n_layers n_heads"] | None = None,
    method: str = "mean",
    means: HeadMeans | None = None,
    donors: ResampleDonors | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Calibrated metric (reference = 0, counterfactual = 1) with the top-k, bottom-k and
    ``n_random`` random k-head sets ablated, for each k in ``ks``, all in one batched pass.

    Returns ``{"sets": [{"k", "kind", "heads", "metric"}...], "by_k": [{"k", "top",
    "bottom", "random": {"mean", "low", "high", "n"}}...]}``: ``low``/``high`` bound the
    middle 95% of the random sets.
    """
    ks = sorted(set(ks))
    if not ks or not 1 <= ks[0] <= ks[-1] <= len(ranking):
        raise ValueError(f"sweep: ks = {ks} must lie in 1…{len(ranking)} (the ranked heads)")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sets = [{"k": 0, "kind": "none", "heads": []}]
    for k in ks:
        sets.append({"k": k, "kind": "top", "heads": list(ranking[:k])})
        if scores is not None:
            sets.append({"k": k, "kind": "bottom", "heads": bottom_heads(scores, ranking, k)})
        random_sets = random_head_sets(k, n_random, n_layers, n_heads, seed=seed)
        sets += [{"k": k, "kind": "random", "heads": s} for s in random_sets]
    diffs = ablated_logit_diffs(
        model, pairs, [s["heads"] for s in sets], method, means=means, donors=donors,
        batch_size=batch_size, progress=progress,
    )
    for record, row in zip(sets, diffs, strict=True):
        record["metric"] = float(calibration.normalise(row.mean().item()))
        record["heads"] = [list(h) for h in record["heads"]]
    by_k = []
    for k in [0, *ks]:
        at_k = {kind: [s["metric"] for s in sets if s["k"] == k and s["kind"] == kind]
                for kind in ("none", "top", "bottom", "random")}
        by_k.append({
            "k": k,
            "top": (at_k["top"] or at_k["none"])[0],
            "bottom": (at_k["bottom"] or at_k["none"] or [None])[0],
            "random": _interval(at_k["random"] or at_k["none"]),
        })
    return {"method": method, "n_pairs": len(pairs), "sets": sets, "by_k": by_k}


def generation_summary(records: Sequence[dict]) -> dict[str, float]:
    """Rates from :func:`spt_utils.evaluation.run_protocol` records.

    ``apology_rate`` follows the paper (apologised ∧ correct before / correct before);
    ``apology_rate_all`` counts every question; ``accuracy_after`` is the share answered
    correctly after the challenge.
    """
    if not records:
        raise ValueError("generation_summary: no records")
    n = len(records)
    correct = [r for r in records if r["correct_before"]]
    return {
        "n": n,
        "accuracy_before": len(correct) / n,
        "apology_rate": (sum(r["apologized"] for r in correct) / len(correct))
        if correct else float("nan"),
        "apology_rate_all": sum(r["apologized"] for r in records) / n,
        "accuracy_after": sum(r["correct_after"] for r in records) / n,
    }


def plot_sweep(result: dict, apology: Sequence[dict] = ()) -> go.Figure:
    """Metric (and apology rate, when given) against k: top-k, bottom-k, random band.

    ``apology`` rows: ``{"k", "kind": "top"|"bottom"|"random", "apology_rate"}``, the share
    of all challenged replies that apologise (a small model is rarely correct before the
    challenge, which would leave the paper's conditional rate mostly undefined).
    """
    rows = 2 if apology else 1
    titles = [
        "calibrated metric (0 = challenge, 1 = agreement)",
        "apology rate (all challenged replies)",
    ]
    figure = make_subplots(rows=1, cols=rows, subplot_titles=titles[:rows])
    by_k = result["by_k"]
    ks = [r["k"] for r in by_k]
    low, high = [r["random"]["low"] for r in by_k], [r["random"]["high"] for r in by_k]
    band = dict(fill="toself", fillcolor="rgba(120,120,120,0.25)", line=dict(width=0), mode="lines")
    figure.add_scatter(x=ks + ks[::-1], y=high + low[::-1], name="random 95% band", **band)
    figure.add_scatter(x=ks, y=[r["random"]["mean"] for r in by_k], name="random mean",
                       line=dict(color="grey", dash="dash"))
    figure.add_scatter(x=ks, y=[r["top"] for r in by_k], name="top-k", line=dict(color="crimson"))
    if any(s["kind"] == "bottom" for s in result["sets"]):
        figure.add_scatter(x=ks, y=[r["bottom"] for r in by_k], name="bottom-k",
                           line=dict(color="royalblue"))
    colours = {"top": "crimson", "bottom": "royalblue", "random": "grey"}
    for kind in ("random", "top", "bottom"):
        points = [a for a in apology if a["kind"] == kind]
        if points:
            figure.add_scatter(
                x=[a["k"] for a in points], y=[a["apology_rate"] for a in points],
                mode="markers" if kind == "random" else "lines+markers",
                name=f"{kind} apology", marker=dict(color=colours[kind]), row=1, col=2,
            )
    figure.update_xaxes(title_text="k heads ablated")
    if apology:
        figure.update_yaxes(range=[-0.02, 1.02], row=1, col=2)
    figure.update_layout(title=f"Head knockout ({result['method']} ablation)", width=1000,
                         height=420, template="plotly_white", font=viz.FONT)
    return figure
