"""Head knockout: ablate chosen attention heads and measure what the model loses (notebook 03).

An ablation replaces a head's output ``z`` (the input to the output projection, hook
``blocks.{l}.attn.hook_z``) at **every position**. Heads are (layer, query-head) pairs, so a
grouped-query model ablates single query heads, never a whole kv group. Three methods:

* ``zero``: ``z = 0``.
* ``mean``: ``z`` = the head's **position-specific** mean over a reference set of prompts,
  positions **aligned from the end** (:class:`HeadMeans`, computed once, saved and loaded):
  the last position gets the mean of every prompt's last position, and so on; positions before
  the longest prompt's start reuse its first mean. Built from reference and counterfactual
  prompts together, so it carries neither side's challenge. During cached generation each new
  token gets the last position's mean (the end of the generation prompt).
* ``interchange``: ``z`` from the input's **matched counterfactual twin** (:class:`Interchange`):
  the same tokens with the challenge reworded (``"I don't think that's right"`` →
  ``"I don't doubt that's right"``, the same token count, one word apart), position by
  position. Patching between matched inputs, not ablation (Heimersheim & Nanda): the heads
  see the counterfactual conversation of the *same* question and first answer, everything
  else sees the doubting one. Each batch runs with its twin rows appended (one forward pass
  of twice the rows), and in cached generation every new token is fed to the twin too, so a
  generated position's ``z`` is the head's output on the counterfactual conversation
  continued by the *same* reply tokens (teacher-forced): the heads never see the doubt, in
  any turn. An input without the challenge is its own twin (nothing changes there).
* ``resample``: ``z`` from another prompt (:class:`ResampleDonors`). Each batch row draws one
  donor prompt (seeded; the same donor for every layer and every decoding step), and the donor
  is **aligned from the end**: the row's last position gets the donor's last position, the one
  before it the donor's one before, and so on; positions before the donor's start reuse its
  first position. During cached generation each new token therefore gets the donor's last
  position (the end of its generation prompt). Use donors from counterfactual prompts of other
  questions (a reference donor would carry the same challenge back in).

Knockout tests causation on **both sides of each pair** (:func:`sweep`): the heads are ablated
in the reference and in the counterfactual run, and the share of the challenge effect that
remains is ``(LD_ref_ablated − LD_cf_ablated) / (LD_ref − LD_cf)`` (1 = intact, 0 =
removed), so a generic shift of the answer logits does not read as removal.

Alignment from the end needs the inputs' real tokens to end at the last position, so every
measurement here runs **left-padded** with an attention mask and mask-derived position ids,
exactly as :func:`spt_utils.chat.generate` does. Pad positions are masked as keys in every
layer, so whatever an ablation writes there never reaches a real token (a test checks this).

The knockout's hooks sit on the Hugging Face output projections (their input is ``z``, the
heads side by side), so they act through the bridge and in its plain model alike:
:func:`spt_utils.chat.generate` and :func:`spt_utils.evaluation.run_protocol` called inside
``with knockout(...)`` generate with the heads ablated (in every turn of the conversation) at
a plain transformers model's speed; the notebooks compose the two, so neither module imports
the other. ``hook_z`` itself records ``z`` before the knockout edits it.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat, stats
from spt_utils.data import (
    MATCHED_COUNTERFACTUAL_CHALLENGE,
    REFERENCE_CHALLENGE,
    PatchingPairs,
    build_patching_pairs,
    challenge_conversation,
)
from spt_utils.grading import grade, judge_admission
from spt_utils.io import atomic_write, check_provenance
from spt_utils.models import attn_linear
from spt_utils.patching import (
    AnswerTokens,
    Head,
    answer_logit_diff,
    cache_before_unembed,
    validate_heads,
    z_name,
)

METHODS = ("zero", "mean", "resample", "interchange")
SIDES = ("reference", "counterfactual")


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
    """Each head's mean ``z`` per position counted from the end of a reference set of prompts
    (``z[-1]``: the mean over every prompt's last position); ``counts[i]`` prompts reach
    position ``i``."""

    z: Float[Tensor, "pos n_layers n_heads d_head"]
    counts: Int[Tensor, " pos"]
    n_prompts: int
    provenance: dict | None = None  # saved with the means (spt_utils.io.provenance)

    @classmethod
    def from_activations(
        cls, activations: Sequence[Float[Tensor, "pos n_layers n_heads d_head"]]
    ) -> HeadMeans:
        if not activations:
            raise ValueError("HeadMeans: no prompts")
        width = max(len(a) for a in activations)
        sums = torch.zeros(width, *activations[0].shape[1:], dtype=torch.float64)
        counts = torch.zeros(width, dtype=torch.long)
        for prompt in activations:  # aligned from the end
            sums[width - len(prompt) :] += prompt
            counts[width - len(prompt) :] += 1
        z = (sums / counts[:, None, None, None]).to(activations[0].dtype)
        return cls(z, counts=counts, n_prompts=len(activations))

    def save(self, path: str | Path, *, provenance: dict | None = None) -> None:
        """Write the means with ``provenance`` (default: the one they hold)."""
        record = self.__dict__ | ({"provenance": provenance} if provenance else {})
        with atomic_write(path, "wb") as handle:
            torch.save(record, handle)

    @classmethod
    def load(cls, path: str | Path, *, expect: dict | None = None) -> HeadMeans:
        """Read :meth:`save`'s file; with ``expect`` its provenance must match."""
        record = torch.load(path, weights_only=True)
        try:
            means = cls(**record)
        except (TypeError, KeyError) as error:
            raise ValueError(f"{path}: not a HeadMeans file ({error})") from error
        if means.z.dim() != 4:
            raise ValueError(f"{path}: not a position-specific HeadMeans file (z has shape "
                             f"{tuple(means.z.shape)})")
        check_provenance(means.provenance, expect, str(path))
        return means

    def values(self, layer: int, z: Tensor, rows: Tensor) -> Tensor:
        pos = z.shape[1]
        means = self.z[-pos:, layer]  # [≤ pos, head, d_head], aligned from the end
        if pos > len(means):
            means = torch.cat([means[:1].expand(pos - len(means), -1, -1), means])
        return means.to(z)[None]  # [1, pos, head, d_head]


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


@dataclass(frozen=True)
class Interchange:
    """Where an interchange knockout takes the heads' ``z``: each input's **twin**, its tokens
    with every occurrence of ``find`` replaced by ``replace`` (spans of one length, so every
    position of the twin stands where it does in the input).

    :meth:`from_challenges` builds it from two challenges (default: the doubting one into its
    matched counterfactual; swapped, the doubting side is carried into a counterfactual
    conversation)."""

    find: Int[Tensor, " span"]
    replace: Int[Tensor, " span"]

    def __post_init__(self) -> None:
        if self.find.shape != self.replace.shape or self.find.dim() != 1 or not len(self.find):
            raise ValueError(f"Interchange: find and replace must be token spans of one length, "
                             f"got {tuple(self.find.shape)} and {tuple(self.replace.shape)}")

    @classmethod
    def from_challenges(
        cls, tokenizer, challenge: str = REFERENCE_CHALLENGE,
        source: str = MATCHED_COUNTERFACTUAL_CHALLENGE,
    ) -> Interchange:
        """``z`` from the conversation in which ``challenge`` reads ``source`` (they must have
        the same token count: an error names both otherwise)."""
        find, replace = chat.encode(tokenizer, challenge), chat.encode(tokenizer, source)
        if find.shape != replace.shape:
            raise ValueError(f"Interchange: {challenge!r} is {len(find)} tokens and {source!r} "
                             f"{len(replace)}; an interchange needs a matched wording")
        return cls(find, replace)

    def reversed(self) -> Interchange:
        """The other direction: ``replace`` into ``find``."""
        return Interchange(self.replace, self.find)

    def _hits(self, ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch start"]:
        """Whether a ``find`` span starts at each position of each row."""
        span = len(self.find)
        if ids.shape[1] < span:
            return ids.new_zeros((len(ids), 0), dtype=torch.bool)
        return ids.unfold(1, span, 1).eq(self.find.to(ids.device)).all(-1)

    def first_span(self, ids: Int[Tensor, " pos"]) -> int | None:
        """Where the first ``find`` span of one prompt starts (None: it holds none)."""
        starts = self._hits(ids[None])[0].nonzero()
        return int(starts[0]) if len(starts) else None

    def twin(self, ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """``ids`` with every (non-overlapping, leftmost first) ``find`` span replaced."""
        span = len(self.find)
        twin = ids.clone()
        for row, start in self._hits(ids).nonzero().tolist():
            if twin[row, start : start + span].equal(self.find.to(ids.device)):
                twin[row, start : start + span] = self.replace.to(ids.device)
        return twin


TWIN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _append_twins(
    _module: torch.nn.Module, args: tuple, kwargs: dict, *, interchange: Interchange,
    state: dict,
) -> tuple[tuple, dict]:
    """Forward pre-hook: append each row's twin to the batch (``state["batch"]``: the rows
    the caller sent)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None or args[1:]:
        raise ValueError("interchange knockout: the model must be called with input_ids as "
                         "keywords (not inputs_embeds: a soft prompt has no twin)")
    batch, cache = len(ids), kwargs.get("past_key_values")
    held, twin = chat.cache_rows(cache), interchange.twin(ids)
    kwargs = {**kwargs, "input_ids": ids}
    state["batch"], state["twins"] = batch, held == 2 * batch or not torch.equal(twin, ids)
    if held not in (None, batch, 2 * batch):
        raise RuntimeError(f"interchange knockout: the KV cache holds {held} rows for a batch "
                           f"of {batch}, neither its rows nor its rows and their twins")
    if not state["twins"]:  # no span and no twins so far: the batch is its own twin
        return (), kwargs
    if held == batch:  # a past without the span (e.g. a shared system prefix) is the twins' too
        cache.batch_select_indices(torch.arange(batch).repeat(2).to(ids.device))
    doubled = {key: torch.cat([kwargs[key], twin if key == "input_ids" else kwargs[key]])
               for key in TWIN_INPUTS if torch.is_tensor(kwargs.get(key))}
    return (), {**kwargs, **doubled}


def _drop_twins(_module: torch.nn.Module, args: tuple, *, state: dict) -> tuple | None:
    """Forward pre-hook of the unembedding: only the caller's rows of the final residual
    stream are unembedded (the twins' logits are never read)."""
    residual, = args  # [rows, pos, d_model]: the batch, then its twins
    if not state.get("twins") or len(residual) != 2 * state["batch"]:
        return None
    return (residual[: state["batch"]],)


def _interchange_z(
    z: Float[Tensor, "rows pos head d_head"],
    *,
    mask: Bool[Tensor, "batch_or_1 head"],
    state: dict,
) -> Float[Tensor, "rows pos head d_head"]:
    """The masked heads' ``z`` of each row from its twin (rows ``batch`` on), position by
    position; the twins run on as they are (a batch that runs alone is left as it is)."""
    if not state["twins"]:
        return z
    batch = state["batch"]
    rows, twins = z[:batch], z[batch:]  # [batch, pos, head, d_head] each
    mask = mask.to(z.device)[:, None, :, None]
    return torch.cat([torch.where(mask, twins, rows), twins])


class _Zero:
    def values(self, layer: int, z: Tensor, rows: Tensor) -> Tensor:
        return z.new_zeros(())


def _source(
    method: str, means: HeadMeans | None, donors: ResampleDonors | None,
    interchange: Interchange | None = None,
) -> _Zero | HeadMeans | ResampleDonors | Interchange:
    if method == "interchange":
        if interchange is None:
            raise ValueError("knockout(method='interchange') needs interchange=Interchange")
        return interchange
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
    *,
    layer: int,
    mask: Bool[Tensor, "batch_or_1 head"],
    source: _Zero | HeadMeans | ResampleDonors,
    rows: Int[Tensor, " batch"] | None,
) -> Float[Tensor, "batch pos head d_head"]:
    """Replace the masked heads' ``z`` with the source's values; ``rows`` numbers each batch
    row's prompt (default: its place in the batch it was generated in, which
    :func:`spt_utils.chat.decoding_rows` gives while finished rows are dropped), which picks
    its resample donor."""
    if rows is None:  # a pass of another batch than decoding's (e.g. with twins) has none
        rows = chat.decoding_rows()
        rows = rows if rows is not None and len(rows) == len(z) else None
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
    if isinstance(source, HeadMeans) and tuple(source.z.shape[1:]) != expected:
        raise ValueError(f"HeadMeans.z ends in {tuple(source.z.shape[1:])}, not {expected}")
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
    if isinstance(source, Interchange):
        with _twin_knockout(model, mask, source):
            yield
        return
    edits = {layer: partial(_ablate_z, layer=layer, mask=mask[:, layer], source=source,
                            rows=rows)
             for layer in range(model.cfg.n_layers) if mask[:, layer].any()}
    with _z_edits(model, edits):
        yield


@contextlib.contextmanager
def _twin_knockout(
    model: TransformerBridge, mask: Bool[Tensor, "batch_or_1 n_layers n_heads"],
    interchange: Interchange,
) -> Iterator[None]:
    """Interchange ``mask``'s heads from each row's twin (:class:`Interchange`) in every
    forward pass of the bridge's Hugging Face model."""
    state: dict = {}
    edits = {layer: partial(_interchange_z, mask=mask[:, layer], state=state)
             for layer in range(model.cfg.n_layers) if mask[:, layer].any()}
    hf_model = model.original_model
    with contextlib.ExitStack() as stack:
        stack.callback(hf_model.register_forward_pre_hook(
            partial(_append_twins, interchange=interchange, state=state),
            with_kwargs=True).remove)
        unembed = hf_model.get_output_embeddings()
        unembed = getattr(unembed, "_original_component", unembed)
        stack.callback(unembed.register_forward_pre_hook(
            partial(_drop_twins, state=state)).remove)
        stack.enter_context(_z_edits(model, edits))
        yield


def _edit_projection_input(
    _module: torch.nn.Module, args: tuple, *, edit: Callable[[Tensor], Tensor], n_heads: int
) -> tuple[Tensor]:
    """Forward pre-hook of an output projection: ``edit`` its input, every head's ``z``."""
    heads_side_by_side, = args  # [batch, pos, head * d_head]
    z = heads_side_by_side.unflatten(-1, (n_heads, -1))  # z: [batch, pos, head, d_head]
    return (edit(z).flatten(-2),)


@contextlib.contextmanager
def _z_edits(
    model: TransformerBridge, edits: Mapping[int, Callable[[Tensor], Tensor]]
) -> Iterator[None]:
    """Each layer's ``z`` (``[batch, pos, head, d_head]``, what ``hook_z`` records) edited by
    ``edits[layer]`` as it enters the layer's output projection. The hooks sit on the Hugging
    Face projection itself, so they act through the bridge and in its plain model alike
    (:func:`spt_utils.chat.plain_hf_model`: generation at a plain model's speed), and go away
    on exit, also after an exception. ``hook_z`` itself still records the unedited ``z``."""
    with contextlib.ExitStack() as stack:
        for layer, edit in edits.items():
            projection = attn_linear(model.original_model, layer, "o_proj")
            stack.callback(projection.register_forward_pre_hook(partial(
                _edit_projection_input, edit=edit, n_heads=model.cfg.n_heads)).remove)
        yield


@dataclass
class _GivenZ:
    """``z`` computed beforehand for the batch that runs next (layer → [batch, pos, head,
    d_head])."""

    z: dict[int, Tensor]

    def values(self, layer: int, z: Tensor, rows: Tensor) -> Tensor:
        return self.z[layer].to(z)


@contextlib.contextmanager
def from_twins(
    model: TransformerBridge,
    heads: Bool[Tensor, "batch n_layers n_heads"],
    twins: Int[Tensor, "batch pos"],
) -> Iterator[None]:
    """In the block, each row of a batch of the twins' shape (right-padded like them) runs
    with ``heads[row]``'s ``z`` taken from ``twins[row]`` (its own tokens with one span
    changed: an interchange), position by position. The twins run once, here, without
    gradient: the interchange training's source is fixed while the model learns from it."""
    layers = [layer for layer in range(model.cfg.n_layers) if heads[:, layer].any()]
    store = cache_before_unembed(model, twins, [z_name(layer) for layer in layers])
    given = _GivenZ({layer: store[z_name(layer)] for layer in layers})
    with _masked_knockout(model, heads, given):
        yield


@contextlib.contextmanager
def knockout(
    model: TransformerBridge,
    heads: Sequence[Head],
    method: str = "mean",
    *,
    means: HeadMeans | None = None,
    donors: ResampleDonors | None = None,
    interchange: Interchange | None = None,
) -> Iterator[None]:
    """Ablate ``heads`` (``[(layer, query_head), ...]``) inside the ``with`` block.

    Every forward pass of the bridge's HF model (so also generation) sees the heads ablated
    (``interchange``: its Hugging Face model, called with ``input_ids``); the hooks are
    removed on exit, also after an exception. An empty set is the identity (no hooks at all).
    """
    source = _source(method, means, donors, interchange)
    mask = head_mask(heads, model.cfg.n_layers, model.cfg.n_heads)
    if not mask.any():
        yield
        return
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
    interchange: Interchange | None = None,
    side: str = "reference",
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, "n_sets n_pairs"]:
    """The last-position logit difference of one side of the pairs (``"reference"`` or
    ``"counterfactual"``) with each head set ablated.

    Head sets are batched together: each row of a forward pass carries its own head mask. A
    pair's two sides get the same resample donor.
    """
    if side not in SIDES:
        raise ValueError(f"side: {side!r} is not one of {SIDES}")
    source = _source(method, means, donors, interchange)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    masks = torch.stack([head_mask(s, n_layers, n_heads) for s in head_sets])
    ids, attention, positions = _left_padded(
        getattr(pairs, side), getattr(pairs, f"{side}_last"), model.tokenizer.pad_token_id
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
            logits = chat.forward_model(model)(
                input_ids=ids[prompts].to(device),
                attention_mask=attention[prompts].to(device),
                position_ids=positions[prompts].to(device),
                logits_to_keep=1,  # left-padded: the last position is every prompt's own
            ).logits[:, -1]  # [batch, d_vocab]
        diffs[sets, prompts] = answer_logit_diff(
            logits.float().cpu(), pairs.apology_ids, pairs.confirm_ids
        )
    return diffs


@dataclass
class CleanPrefixes:
    """One side of the pairs ready for interchange knockouts that run only what changes.

    Each prompt is cut where its first interchanged span begins. What precedes the cut is
    the same in the prompt and its twin, so every head's ``z`` there is its own under any
    interchange: it runs once, clean, and its KV cache (``cache``, left-padded) serves every
    knockout. The twins' clean ``z`` from the cut on (``twin_z``, every layer) is computed
    once too, so a knockout runs only the prompts' own rest (``ids``, left-padded, at
    ``positions``, the padding masked by ``attention``) with the chosen heads' ``z`` taken
    from it (:func:`interchanged_logit_diffs`). A prompt with no span keeps all but its last
    token in the prefix. (The padding inside a sequence counts towards a sliding attention
    window: on a sliding-window model, prompts longer than the window may differ slightly
    from their full runs.)"""

    side: str
    ids: Int[Tensor, "pair rest"]
    positions: Int[Tensor, "pair rest"]
    attention: Int[Tensor, "pair prefix_and_rest"]
    cache: Any
    twin_z: dict[int, Float[Tensor, "pair rest head d_head"]]

    @classmethod
    @torch.no_grad()
    def build(
        cls, model: TransformerBridge, pairs: PatchingPairs, interchange: Interchange,
        side: str = "reference",
    ) -> CleanPrefixes:
        if side not in SIDES:
            raise ValueError(f"side: {side!r} is not one of {SIDES}")
        tokens, last = getattr(pairs, side), getattr(pairs, f"{side}_last")
        prompts = [row[: end + 1] for row, end in zip(tokens, last.tolist(), strict=True)]
        spans = [interchange.first_span(prompt) for prompt in prompts]
        cuts = [len(prompt) - 1 if span is None else span
                for prompt, span in zip(prompts, spans, strict=True)]
        if 0 in cuts:
            raise ValueError("CleanPrefixes: a prompt begins with its span: no clean prefix")
        pad, device = model.tokenizer.pad_token_id, model.cfg.device
        cut_prompts = list(zip(prompts, cuts, strict=True))
        prefix, prefix_mask = chat.pad_left([p[:cut] for p, cut in cut_prompts], pad)
        rest, rest_mask = chat.pad_left([p[cut:] for p, cut in cut_prompts], pad)
        twins, _ = chat.pad_left([interchange.twin(p[None])[0, cut:] for p, cut in cut_prompts],
                                 pad)
        # positions follow the mask: the rest continues where each prompt's prefix ends
        positions = torch.tensor(cuts)[:, None] + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        attention = torch.cat([prefix_mask, rest_mask], dim=-1)
        hf_model = chat.plain_hf_model(model)
        cache = hf_model(input_ids=prefix.to(device), attention_mask=prefix_mask.to(device),
                         position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device),
                         use_cache=True, logits_to_keep=1).past_key_values
        twin_z: dict[int, Tensor] = {}
        with _z_edits(model, {layer: partial(_record_z, store=twin_z, layer=layer)
                              for layer in range(model.cfg.n_layers)}):
            hf_model(input_ids=twins.to(device), attention_mask=attention.to(device),
                     position_ids=positions.to(device), past_key_values=copy.deepcopy(cache),
                     use_cache=True, logits_to_keep=1)
        return cls(side, rest, positions, attention, cache, twin_z)


def _record_z(
    z: Float[Tensor, "batch pos head d_head"], *, store: dict[int, Tensor], layer: int
) -> Float[Tensor, "batch pos head d_head"]:
    store[layer] = z.detach().clone()
    return z


@torch.no_grad()
def interchanged_logit_diffs(
    model: TransformerBridge, pairs: PatchingPairs, head_sets: Sequence[Sequence[Head]],
    prefixes: CleanPrefixes, *, batch_size: int = 16, progress: bool = False,
) -> Float[Tensor, "n_sets n_pairs"]:
    """:func:`ablated_logit_diffs` of ``prefixes.side`` under an interchange knockout of each
    of ``head_sets``, batched (each row carries its own set): only each prompt's rest runs,
    from the clean prefix's cache (the rows a batch needs, copied, so it serves every call),
    with the heads' ``z`` from the twins' (:class:`CleanPrefixes`)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    masks = torch.stack([head_mask(validate_heads(list(s), n_layers, n_heads), n_layers, n_heads)
                         for s in head_sets])
    rows = [(s, p) for s in range(len(head_sets)) for p in range(len(pairs))]
    diffs = torch.empty(len(head_sets), len(pairs))
    device = model.cfg.device
    for start in tqdm(range(0, len(rows), batch_size), desc="knockout", disable=not progress):
        chunk = rows[start : start + batch_size]
        sets = torch.tensor([s for s, _ in chunk])
        prompts = torch.tensor([p for _, p in chunk])
        cache = copy.deepcopy(prefixes.cache)
        cache.batch_select_indices(prompts.to(device))
        # twin_z: layer → [pair, rest, head, d_head]; each row takes its prompt's twin
        given = _GivenZ({layer: z[prompts.to(z.device)] for layer, z in prefixes.twin_z.items()})
        with _masked_knockout(model, masks[sets], given):
            logits = chat.forward_model(model)(
                input_ids=prefixes.ids[prompts].to(device),
                attention_mask=prefixes.attention[prompts].to(device),
                position_ids=prefixes.positions[prompts].to(device), past_key_values=cache,
                use_cache=True, logits_to_keep=1,  # left-padded: every prompt's own last
            ).logits[:, -1]  # [batch, d_vocab]
        diffs[sets, prompts] = answer_logit_diff(logits.float().cpu(), pairs.apology_ids,
                                                 pairs.confirm_ids)
    return diffs


def random_head_sets(
    k: int, n: int, n_layers: int, n_heads: int, *, seed: int = 0,
    exclude: Sequence[Head] = (),
) -> list[list[Head]]:
    """``n`` seeded sets of ``k`` distinct heads drawn uniformly from the heads not in
    ``exclude`` (e.g. the selection under test)."""
    excluded = {tuple(h) for h in exclude}
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads)
            if (layer, head) not in excluded]
    if k > len(pool):
        raise ValueError(f"random_head_sets: k = {k} but only {len(pool)} heads to draw from")
    rng = random.Random(f"{seed}-{k}")
    return [sorted(rng.sample(pool, k)) for _ in range(n)]


def layer_matched_sets(
    heads: Sequence[Head], n: int, n_heads: int, *, seed: int = 0,
    exclude: Sequence[Head] = (),
) -> list[list[Head]]:
    """``n`` seeded sets with as many heads in each layer as ``heads``, drawn from the other
    heads of those layers (none in ``exclude`` or ``heads``); empty when a layer has no
    other heads enough."""
    excluded = {tuple(h) for h in (*exclude, *heads)}
    per_layer: dict[int, int] = {}
    for layer, _ in heads:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    pools = {layer: [(layer, h) for h in range(n_heads) if (layer, h) not in excluded]
             for layer in per_layer}
    if any(len(pools[layer]) < count for layer, count in per_layer.items()):
        return []
    rng = random.Random(f"{seed}-layers-{sorted(per_layer.items())}")
    return [sorted(h for layer, count in sorted(per_layer.items())
                   for h in rng.sample(pools[layer], count)) for _ in range(n)]


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


def remaining_effect(
    reference: Float[Tensor, " pair"], counterfactual: Float[Tensor, " pair"],
    clean_reference: Float[Tensor, " pair"], clean_counterfactual: Float[Tensor, " pair"],
) -> float:
    """Share of the challenge effect left under an ablation: (LD_ref_ablated − LD_cf_ablated)
    / (LD_ref − LD_cf), means over pairs (1 = intact, 0 = removed)."""
    clean = (clean_reference - clean_counterfactual).mean()
    if clean.abs() < 1e-6:
        raise ValueError("remaining_effect: the clean challenge effect is 0 on these pairs")
    return float((reference - counterfactual).mean() / clean)


def _spread(values: Sequence[float]) -> dict[str, float]:
    tensor = torch.tensor(list(values), dtype=torch.float64)
    return {
        "mean": tensor.mean().item(),
        "low": torch.quantile(tensor, 0.025).item(),
        "high": torch.quantile(tensor, 0.975).item(),
        "n": len(tensor),
    }


def _bootstrap_remaining(
    diffs: dict[str, Tensor], index: int, n_boot: int, seed: int
) -> tuple[float, float]:
    """Percentile 95% interval of a set's remaining share, resampling pairs (row 0 of each
    side is the clean run)."""
    generator = torch.Generator().manual_seed(seed)
    n_pairs = diffs["reference"].shape[1]
    samples = torch.randint(0, n_pairs, (n_boot, n_pairs), generator=generator)
    ref, cf = (diffs[side][:, samples] for side in SIDES)  # [sets, boot, pairs]
    clean = (ref[0] - cf[0]).mean(-1)
    ratios = (ref[index] - cf[index]).mean(-1) / clean
    low, high = torch.quantile(ratios[clean.abs() > 1e-6].double(), torch.tensor([0.025, 0.975],
                                                                                  dtype=torch.double))
    return low.item(), high.item()


def _untouched(
    pairs: PatchingPairs, side: str, method: str, interchange: Interchange | None
) -> bool:
    """Whether an interchange leaves ``side`` of the pairs as it is: its prompts hold no
    ``find`` span, so each is its own twin (whatever the heads)."""
    return method == "interchange" and interchange is not None and torch.equal(
        interchange.twin(getattr(pairs, side)), getattr(pairs, side))


def sweep(
    model: TransformerBridge,
    pairs: PatchingPairs,
    ranking: Sequence[Head],
    *,
    ks: Sequence[int],
    n_random: int = 100,
    n_layer_matched: int = 50,
    scores: Float[Tensor, "n_layers n_heads"] | None = None,
    method: str = "mean",
    means: HeadMeans | None = None,
    donors: ResampleDonors | None = None,
    interchange: Interchange | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Ablate the top-k heads of ``ranking`` on both sides of every pair, against
    ``n_random`` random k-sets of heads outside the ranking's top ``max(ks)``, layer-matched
    sets (the top-k's layers, other heads) and, given ``scores``, the bottom-k heads.

    For each set: ``remaining`` (the share of the challenge effect left, see
    :func:`remaining_effect`) and each side's raw mean shift of the logit difference. For
    each k: the top-k's bootstrap 95% interval over pairs, the random and layer-matched sets'
    spread, and permutation p-values: the share of random (layer-matched) sets removing at
    least as much, ``(1 + #{remaining ≤ top}) / (1 + n)``.
    """
    ks = sorted(set(ks))
    if not ks or not 1 <= ks[0] <= ks[-1] <= len(ranking):
        raise ValueError(f"sweep: ks = {ks} must lie in 1…{len(ranking)} (the ranked heads)")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    selection = list(ranking[: ks[-1]])
    sets = [{"k": 0, "kind": "none", "heads": []}]
    for k in ks:
        sets.append({"k": k, "kind": "top", "heads": list(ranking[:k])})
        if scores is not None:
            sets.append({"k": k, "kind": "bottom", "heads": bottom_heads(scores, ranking, k)})
        sets += [{"k": k, "kind": "random", "heads": s} for s in random_head_sets(
            k, n_random, n_layers, n_heads, seed=seed, exclude=selection)]
        sets += [{"k": k, "kind": "layer_matched", "heads": s} for s in layer_matched_sets(
            ranking[:k], n_layer_matched, n_heads, seed=seed, exclude=selection)]
    diffs = {}
    for side in SIDES:
        untouched = _untouched(pairs, side, method, interchange)  # runs once, with no set
        if method == "interchange" and not untouched:  # only what follows the clean prefixes
            diffs[side] = interchanged_logit_diffs(
                model, pairs, [s["heads"] for s in sets],
                CleanPrefixes.build(model, pairs, interchange, side), batch_size=batch_size,
                progress=progress)
            continue
        diffs[side] = ablated_logit_diffs(
            model, pairs, [[]] if untouched else [s["heads"] for s in sets], method, means=means,
            donors=donors, interchange=interchange, side=side, batch_size=batch_size,
            progress=progress).expand(len(sets), -1)
    clean = {side: diffs[side][0] for side in SIDES}
    for index, record in enumerate(sets):
        ref, cf = diffs["reference"][index], diffs["counterfactual"][index]
        record.update(
            remaining=remaining_effect(ref, cf, clean["reference"], clean["counterfactual"]),
            shift_reference=float((ref - clean["reference"]).mean()),
            shift_counterfactual=float((cf - clean["counterfactual"]).mean()),
            heads=[list(h) for h in record["heads"]],
        )
    by_k = []
    for k in ks:
        at_k = {kind: [(i, s) for i, s in enumerate(sets) if s["k"] == k and s["kind"] == kind]
                for kind in ("top", "bottom", "random", "layer_matched")}
        (top_index, top), = at_k["top"]
        low, high = _bootstrap_remaining(diffs, top_index, n_boot, seed)
        row = {"k": k, "top": {**{key: top[key] for key in
                                   ("remaining", "shift_reference", "shift_counterfactual")},
                                "low": low, "high": high}}
        row["bottom"] = at_k["bottom"][0][1]["remaining"] if at_k["bottom"] else None
        for kind in ("random", "layer_matched"):
            values = [s["remaining"] for _, s in at_k[kind]]
            row[kind] = _spread(values) if values else None
            row[f"p_{kind}"] = stats.permutation_p(
                sum(v <= top["remaining"] for v in values), len(values)) if values else None
        by_k.append(row)
    return {"method": method, "n_pairs": len(pairs), "clean_effect": float(
        (clean["reference"] - clean["counterfactual"]).mean()), "sets": sets, "by_k": by_k}


# --- what the head lab shows (viz.HeadLab): one knockout set, both sides, one reply ---------


def _bootstrap_mean(values: Float[Tensor, " pair"], n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of the mean over pairs, resampling pairs with the same draws as
    :func:`_bootstrap_remaining` (the same ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randint(0, len(values), (n_boot, len(values)), generator=generator)
    means = values[samples].double().mean(-1)  # [boot]
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.double))
    return low.item(), high.item()


def clean_logit_diffs(
    model: TransformerBridge, pairs: PatchingPairs, *, batch_size: int = 16
) -> dict[str, Float[Tensor, " pair"]]:
    """Each side's logit difference per pair with nothing ablated (as
    :func:`ablated_logit_diffs` measures it)."""
    return {side: ablated_logit_diffs(model, pairs, [[]], "zero", side=side,
                                      batch_size=batch_size)[0] for side in SIDES}


def pair_metrics(
    model: TransformerBridge,
    pairs: PatchingPairs,
    heads: Sequence[Head],
    method: str = "mean",
    *,
    means: HeadMeans | None = None,
    donors: ResampleDonors | None = None,
    interchange: Interchange | None = None,
    clean: Mapping[str, Float[Tensor, " pair"]] | None = None,
    prefixes: Mapping[str, CleanPrefixes] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Both sides of every pair, clean and with ``heads`` ablated (:func:`summarize_pairs`).
    ``clean`` (side → the clean logit difference per pair, :func:`clean_logit_diffs`) saves
    the clean runs when given; a side an interchange leaves as it is is its clean run, and
    one with ``prefixes`` (side → :class:`CleanPrefixes`) runs from them."""
    heads = validate_heads(list(heads), model.cfg.n_layers, model.cfg.n_heads)
    clean = clean_logit_diffs(model, pairs, batch_size=batch_size) if clean is None else clean
    prefixes = prefixes if method == "interchange" else None

    def ablated_side(side: str) -> Float[Tensor, " pair"]:
        if _untouched(pairs, side, method, interchange):
            return clean[side]
        if prefixes and side in prefixes:
            if prefixes[side].side != side:
                raise ValueError(f"pair_metrics: the prefixes given for the {side} side were "
                                 f"built on the {prefixes[side].side} side")
            return interchanged_logit_diffs(model, pairs, [heads], prefixes[side],
                                            batch_size=batch_size)[0]
        return ablated_logit_diffs(model, pairs, [heads], method, means=means, donors=donors,
                                   interchange=interchange, side=side,
                                   batch_size=batch_size)[0]

    ablated = clean if not heads else {side: ablated_side(side) for side in SIDES}
    return summarize_pairs(pairs, clean, ablated, heads=heads, method=method, n_boot=n_boot,
                           seed=seed)


def summarize_pairs(
    pairs: PatchingPairs,
    clean: Mapping[str, Float[Tensor, " pair"]],
    intervened: Mapping[str, Float[Tensor, " pair"]],
    *,
    heads: Sequence[Head],
    method: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Both sides of every pair, clean and under an intervention on ``heads`` (a knockout,
    or a steering: :class:`spt_utils.steering.SteeringProbe`); each side → its logit
    difference per pair.

    ``per_pair``: each pair's logit differences (``clean_reference``,
    ``clean_counterfactual``, ``reference``, ``counterfactual``: intervened) and the share of
    its own challenge effect that remains (NaN where that effect is 0). Over the pairs:
    ``reference`` and ``counterfactual`` (the intervened sides' means) and ``remaining``
    (:func:`remaining_effect`) as ``{"value", "low", "high"}`` with percentile bootstrap 95%
    intervals over pairs, and the clean sides' means.
    """
    diffs = {side: torch.stack([clean[side], intervened[side]]) for side in SIDES}  # [2, pair]
    clean_ref, clean_cf = diffs["reference"][0], diffs["counterfactual"][0]
    ref, cf = diffs["reference"][1], diffs["counterfactual"][1]
    clean_effect = clean_ref - clean_cf
    own_share = torch.where(clean_effect.abs() > 1e-6, (ref - cf) / clean_effect,
                            torch.full_like(clean_effect, float("nan")))
    low, high = _bootstrap_remaining(diffs, 1, n_boot, seed)
    summary = {"value": remaining_effect(ref, cf, clean_ref, clean_cf), "low": low, "high": high}
    sides = {}
    for name, values in (("reference", ref), ("counterfactual", cf)):
        side_low, side_high = _bootstrap_mean(values, n_boot, seed)
        sides[name] = {"value": float(values.mean()), "low": side_low, "high": side_high}
    return {
        "heads": [list(h) for h in heads], "method": method, "n_pairs": len(pairs),
        "clean_reference": float(clean_ref.mean()),
        "clean_counterfactual": float(clean_cf.mean()),
        **sides, "remaining": summary,
        "per_pair": [
            {"question_id": ident, "clean_reference": float(clean_ref[i]),
             "clean_counterfactual": float(clean_cf[i]), "reference": float(ref[i]),
             "counterfactual": float(cf[i]), "remaining": float(own_share[i])}
            for i, ident in enumerate(pairs.question_ids)
        ],
    }


class KnockoutProbe:
    """What the head lab (:class:`spt_utils.viz.HeadLab`) shows for a knockout set.

    ``questions`` are held-out questions the model answered correctly in its own words
    (``answers``: question id → ``{"answer", "correct"}``, the base model's own first
    answers). :meth:`reply` is one question's greedy reply to the challenge (KV cache) with
    the heads ablated while it replies, judged; :meth:`pair_metrics` measures both sides of
    every question's pair (:func:`pair_metrics`), its answer tokens ``answer_tokens``
    (default: the pairs' words). Zero ablation is always available, mean, resample and
    interchange given ``means``, ``donors`` and ``interchange``. A knockout has no strength:
    ``scaled_methods`` (the methods that take an ``alpha``,
    :class:`spt_utils.steering.SteeringProbe`'s) is empty here.
    """

    scaled_methods: tuple[str, ...] = ()
    # methods whose value at a position does not depend on how a sequence is split into
    # forward passes: a reply is checked against a draft in one pass only under these (mean
    # and resample values are aligned from each pass's end, so generation, token by token,
    # sees other values than one pass over the draft would)
    split_invariant_methods: tuple[str, ...] = ("zero", "interchange")

    def __init__(
        self,
        model: TransformerBridge,
        questions: Sequence[dict],
        answers: Mapping[str, dict],
        *,
        protocol: str = "free_form",
        means: HeadMeans | None = None,
        donors: ResampleDonors | None = None,
        interchange: Interchange | None = None,
        max_new_tokens: int = 40,
        n_boot: int = 1000,
        seed: int = 0,
        batch_size: int = 16,
        answer_tokens: AnswerTokens | None = None,
    ) -> None:
        self.model = model
        self.questions = list(questions)
        self.answers = answers
        self.protocol = protocol
        self.means, self.donors, self.interchange = means, donors, interchange
        self.max_new_tokens, self.n_boot, self.seed = max_new_tokens, n_boot, seed
        self.batch_size = batch_size
        # raises naming the questions without a correct first answer
        self.pairs = build_patching_pairs(self.questions, model.tokenizer, answers=answers,
                                          protocol=protocol)
        if answer_tokens is not None:
            self.pairs = answer_tokens.apply(self.pairs)
        self._clean: dict[str, Tensor] | None = None  # the pairs' clean runs, once
        self._prefixes: dict[str, CleanPrefixes] | None = None  # interchange's, once
        self._replies: dict[int, Tensor] = {}  # question → its latest reply's tokens

    @property
    def methods(self) -> tuple[str, ...]:
        """The ablation methods this probe has values for."""
        available = {"zero": True, "mean": self.means is not None,
                     "resample": self.donors is not None,
                     "interchange": self.interchange is not None}
        return tuple(m for m in METHODS if available[m])

    def conversation(self, question: int) -> chat.Conversation:
        """Question ``question``'s conversation up to the challenge (the first answer is the
        base model's own)."""
        row = self.questions[question]
        return challenge_conversation(row, REFERENCE_CHALLENGE,
                                      answer=self.answers[row["id"]]["answer"],
                                      protocol=self.protocol)

    def _check_alpha(self, method: str, alpha: float | None) -> None:
        if (alpha is None) != (method not in self.scaled_methods):
            raise ValueError(f"{type(self).__name__}: method {method!r} takes "
                             + ("an alpha" if alpha is None else f"no alpha (got {alpha})"))

    def intervention(
        self, heads: Sequence[Head], method: str, alpha: float | None = None
    ) -> contextlib.AbstractContextManager:
        """The context in which the model runs with ``heads`` intervened on: ablated by
        ``method`` (:func:`knockout`)."""
        self._check_alpha(method, alpha)
        return knockout(self.model, heads, method, means=self.means, donors=self.donors,
                        interchange=self.interchange)

    def reply(
        self, heads: Sequence[Head], method: str, question: int, alpha: float | None = None
    ) -> dict:
        """The reply to question ``question``'s challenge with ``heads`` intervened on
        (:meth:`intervention`): ``{"reply", "admitted"}`` (the judge of admitted mistakes)
        and ``"kept"`` (the reply still names the correct answer and no other). The greedy
        reply, checked against the question's last reply (:func:`chat.greedy_from_draft`)
        under :attr:`split_invariant_methods`: where a click leaves it as it was, one forward
        pass instead of one per token."""
        row = self.questions[question]
        prompt = chat.tokens(self.model.tokenizer, self.conversation(question))
        with self.intervention(heads, method, alpha):
            # checked against this question's last reply: a click seldom changes much of it
            self._replies[question] = chat.greedy_from_draft(
                self.model, prompt, self._draft(question, heads, method, prompt),
                max_new_tokens=self.max_new_tokens)
        reply = self.model.tokenizer.decode(self._replies[question],
                                            skip_special_tokens=True).strip()
        first = self.answers[row["id"]]["answer"]
        policy = "free_form" if self.protocol == "free_form" else "consistent"
        return {"reply": reply, "admitted": judge_admission(row, first, reply),
                "kept": grade(reply, row, policy)}

    def _draft(
        self, question: int, heads: Sequence[Head], method: str, prompt: Int[Tensor, " pos"]
    ) -> Int[Tensor, " new"] | None:
        """Question ``question``'s last reply as the draft of its next (:meth:`reply`), where
        one pass over it sees what generation token by token would: none under a method
        outside :attr:`split_invariant_methods`, nor under an interchange where the draft
        holds the challenge's span (its twin would change it there; a generated token alone
        never holds a span)."""
        draft = self._replies.get(question)
        if draft is None or not heads:
            return draft
        if method not in self.split_invariant_methods:
            return None
        if method == "interchange":
            twin = self.interchange.twin  # [batch, pos] → [batch, pos]
            alone = torch.cat([twin(prompt[None])[0], draft])
            if not twin(torch.cat([prompt, draft])[None])[0].equal(alone):
                return None
        return draft

    def clean(self) -> dict[str, Tensor]:
        """:func:`clean_logit_diffs` of every question's pair, computed once."""
        if self._clean is None:
            self._clean = clean_logit_diffs(self.model, self.pairs, batch_size=self.batch_size)
        return self._clean

    def pair_metrics(
        self, heads: Sequence[Head], method: str, alpha: float | None = None
    ) -> dict:
        """:func:`pair_metrics` of every question's pair (the clean runs computed once; under
        interchange, each changed side from its clean prefixes, computed once)."""
        self._check_alpha(method, alpha)
        if method == "interchange" and heads and self._prefixes is None:
            self._prefixes = {
                side: CleanPrefixes.build(self.model, self.pairs, self.interchange, side)
                for side in SIDES if not _untouched(self.pairs, side, method, self.interchange)}
        return pair_metrics(self.model, self.pairs, heads, method, means=self.means,
                            donors=self.donors, interchange=self.interchange,
                            clean=self.clean(), prefixes=self._prefixes, n_boot=self.n_boot,
                            seed=self.seed, batch_size=self.batch_size)
