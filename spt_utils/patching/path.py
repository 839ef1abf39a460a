"""Metrics for the challenge → apology circuit, and (issue 4) path and activation patching.

Convention for the calibrated metric: **reference = 0, counterfactual = 1**. The reference run
is the challenge ("I don't think that's right…"), the counterfactual the agreement ("I do
think…"). A patch or ablation scoring 1 fully removes the challenge's push toward apologising;
0.5 is the midpoint.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import align_module_device
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.patching import get_act_patch_direct_path
from transformer_lens.utilities.statistics import bootstrap_ci
from transformers import PreTrainedTokenizerBase

from spt_utils.chat import forward_model, require_decoder_only
from spt_utils.data import APOLOGY_WORDS, CONFIRM_WORDS, PatchingPairs, answer_token_ids
from spt_utils.io import atomic_write, check_provenance, write_json

RATIO_EPSILON = 1e-3


def answer_logit_diff(
    logits: Float[Tensor, "batch d_vocab"], apology_ids: list[int], confirm_ids: list[int]
) -> Float[Tensor, " batch"]:
    """Mean apology-token logit minus mean confirm-token logit, per prompt."""
    return logits[:, apology_ids].mean(-1) - logits[:, confirm_ids].mean(-1)


def gather_last(
    values: Float[Tensor, "batch pos *rest"], last: Int[Tensor, " batch"]
) -> Float[Tensor, " batch *rest"]:
    """Each row's value at its last real position."""
    return values[torch.arange(len(last), device=values.device), last.to(values.device)]


@torch.no_grad()
def last_position_logits(
    model: TransformerBridge, tokens: Int[Tensor, "batch pos"], last: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d_vocab"]:
    """Each right-padded row's logits at its last real position. Only those positions are
    unembedded, by the Hugging Face model (through the bridge while a hook is on it:
    :func:`spt_utils.chat.forward_model`)."""
    kept, row_last = torch.unique(last, return_inverse=True)  # kept: the rows' last positions
    hf_model = forward_model(model)
    logits = hf_model(input_ids=tokens.to(model.cfg.device),
                      logits_to_keep=kept.to(model.cfg.device)).logits  # [batch, kept, d_vocab]
    return gather_last(logits, row_last)


@dataclass(frozen=True)
class Calibration:
    """Mean logit differences of the clean runs, which fix the metric's 0 and 1, and each
    pair's own (for per-pair effects)."""

    reference: float
    counterfactual: float
    reference_pairs: tuple[float, ...] = ()
    counterfactual_pairs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if abs(self.counterfactual - self.reference) < 1e-6:
            raise ValueError(
                "The reference and counterfactual logit differences are equal "
                f"({self.reference:.4g}): the challenge has no effect to measure."
            )

    def normalise(self, logit_diff: Tensor | float) -> Tensor | float:
        """Map a (mean) logit difference to reference = 0, counterfactual = 1."""
        return (logit_diff - self.reference) / (self.counterfactual - self.reference)

    @property
    def same_sign_share(self) -> float:
        """Share of pairs whose challenge effect (reference − counterfactual) has the sign
        of the mean effect."""
        effects = torch.tensor(self.reference_pairs) - torch.tensor(self.counterfactual_pairs)
        return (torch.sign(effects) == torch.sign(effects.mean())).float().mean().item()

    def check(self) -> None:
        """Assert the convention: reference → 0, counterfactual → 1, midpoint → 0.5."""
        midpoint = (self.reference + self.counterfactual) / 2
        assert abs(self.normalise(self.reference)) < 1e-6
        assert abs(self.normalise(self.counterfactual) - 1) < 1e-6
        assert abs(self.normalise(midpoint) - 0.5) < 1e-6


def calibrate(model: TransformerBridge, pairs: PatchingPairs) -> Calibration:
    """The clean reference and counterfactual mean logit differences, checked."""
    return calibrate_token_sets(model, pairs, {"": (pairs.apology_ids, pairs.confirm_ids)})[""]


def calibrate_token_sets(
    model: TransformerBridge, pairs: PatchingPairs,
    token_sets: dict[str, tuple[Sequence[int], Sequence[int]]],
) -> dict[str, Calibration]:
    """:func:`calibrate` for each named ``(apology_ids, confirm_ids)`` token set, from one
    pass over both sides of the pairs."""
    require_decoder_only(model, "patching.calibrate")
    if len(pairs) == 0:
        raise ValueError("calibrate: the pair set is empty")
    # logits: per side, [batch, d_vocab] at each row's last position
    logits = [last_position_logits(model, tokens, last) for tokens, last in (
        (pairs.reference, pairs.reference_last),
        (pairs.counterfactual, pairs.counterfactual_last))]
    return {name: _checked_calibration(*(answer_logit_diff(side, list(apology), list(confirm))
                                         for side in logits))
            for name, (apology, confirm) in token_sets.items()}


@dataclass(frozen=True)
class AnswerTokens:
    """The metric's answer tokens: ``apology_ids`` open the model's replies to the doubting
    challenge, ``confirm_ids`` those to the counterfactual one. ``openings`` counts, per side
    ("reference", "counterfactual"), how many greedy replies open with each token id;
    ``source`` says per set ("apology", "confirm") whether the replies chose it ("replies")
    or given words stand in ("words")."""

    apology_ids: list[int]
    confirm_ids: list[int]
    openings: dict[str, dict[int, int]]
    source: dict[str, str]
    provenance: dict | None = None

    @classmethod
    def from_words(
        cls, tokenizer: PreTrainedTokenizerBase, apology: Sequence[str], confirm: Sequence[str]
    ) -> AnswerTokens:
        """Answer tokens given as words (one token each), no replies counted."""
        return cls(answer_token_ids(tokenizer, apology), answer_token_ids(tokenizer, confirm),
                   {}, {"apology": "words", "confirm": "words"})

    def apply(self, pairs: PatchingPairs) -> PatchingPairs:
        """``pairs`` with these answer tokens."""
        return replace(pairs, apology_ids=list(self.apology_ids),
                       confirm_ids=list(self.confirm_ids))

    def save(self, path: str | Path, *, provenance: dict | None = None) -> None:
        record = asdict(self) | ({"provenance": provenance} if provenance else {})
        record["openings"] = {side: {str(t): n for t, n in counts.items()}
                              for side, counts in self.openings.items()}
        write_json(path, record)

    @classmethod
    def load(cls, path: str | Path, *, expect: dict | None = None) -> AnswerTokens:
        """Read :meth:`save`'s file; with ``expect`` its provenance must match."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
            record["openings"] = {side: {int(t): int(n) for t, n in counts.items()}
                                  for side, counts in record["openings"].items()}
            tokens = cls(**record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: not an answer-token file ({error!r})") from error
        check_provenance(tokens.provenance, expect, str(path))
        return tokens


@torch.no_grad()
def reply_openings(
    model: TransformerBridge, pairs: PatchingPairs, *, batch_size: int = 16
) -> dict[str, Int[Tensor, " batch"]]:
    """The first token of the model's greedy reply to each side of each pair: the argmax of
    the next-token logits at the end of the generation prompt."""
    require_decoder_only(model, "patching.reply_openings")
    openings = {}
    for side, tokens, last in (("reference", pairs.reference, pairs.reference_last),
                               ("counterfactual", pairs.counterfactual,
                                pairs.counterfactual_last)):
        openings[side] = torch.cat([
            last_position_logits(model, tokens[start:start + batch_size],
                                 last[start:start + batch_size]).argmax(-1).cpu()
            for start in range(0, len(pairs), batch_size)])
    return openings


def answer_tokens_from_replies(
    model: TransformerBridge,
    pairs: PatchingPairs,
    *,
    min_share: float = 0.1,
    fallback: tuple[Sequence[str], Sequence[str]] | None = (APOLOGY_WORDS, CONFIRM_WORDS),
) -> AnswerTokens:
    """Answer tokens chosen from how the model's own replies open: apology tokens open more
    replies to the doubting challenge than to the counterfactual one, confirm tokens the
    reverse; each opens at least ``min_share`` of its side's replies, most discriminating
    first. Where no token tells a side apart, ``fallback``'s (apology, confirm) words stand
    in for that set (``source`` says so); with ``fallback=None`` that is an error."""
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share: {min_share} is not in (0, 1]")
    if len(pairs) == 0:
        raise ValueError("answer_tokens_from_replies: the pair set is empty")
    opened = reply_openings(model, pairs)
    counts = {side: Counter(ids.tolist()) for side, ids in opened.items()}

    def distinguishing(side: str, other: str) -> list[int]:
        ranked = sorted(counts[side], key=lambda t: (counts[other][t] - counts[side][t], t))
        return [t for t in ranked if counts[side][t] > counts[other][t]
                and counts[side][t] >= min_share * len(pairs)]

    chosen = {"apology": distinguishing("reference", "counterfactual"),
              "confirm": distinguishing("counterfactual", "reference")}
    source = {name: "replies" if ids else "words" for name, ids in chosen.items()}
    if "words" in source.values():
        shown = {side: {model.tokenizer.decode([t]): n for t, n in c.most_common(3)}
                 for side, c in counts.items()}
        missing = [name for name, kind in source.items() if kind == "words"]
        message = (f"answer_tokens_from_replies: over {len(pairs)} pairs no reply opening "
                   f"token tells the {' and '.join(missing)} side apart (more common there, "
                   f"opening >= {min_share:.0%} of its replies); openings: {shown}")
        if fallback is None:
            raise ValueError(message)
        warnings.warn(f"{message}; the words {fallback} stand in", stacklevel=2)
        for name, words in zip(("apology", "confirm"), fallback, strict=True):
            if not chosen[name]:
                chosen[name] = answer_token_ids(model.tokenizer, words)
    return AnswerTokens(chosen["apology"], chosen["confirm"],
                        {side: dict(c) for side, c in counts.items()}, source)


def _checked_calibration(
    reference_diff: Float[Tensor, " batch"], counterfactual_diff: Float[Tensor, " batch"]
) -> Calibration:
    """The calibration of the clean runs' per-row logit differences, its convention asserted."""
    calibration = Calibration(reference_diff.mean().item(), counterfactual_diff.mean().item(),
                              tuple(reference_diff.tolist()), tuple(counterfactual_diff.tolist()))
    calibration.check()
    return calibration


def _last_logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], last: Tensor, pairs: PatchingPairs
) -> Float[Tensor, " batch"]:
    """The answer logit difference at each row's last real position."""
    return answer_logit_diff(gather_last(logits, last), pairs.apology_ids, pairs.confirm_ids)


def apology_ratio(
    logits: Float[Tensor, "batch d_vocab"], apology_ids: list[int], confirm_ids: list[int]
) -> Float[Tensor, " batch"]:
    """The paper's ratio of raw logits, ``l[apology] / (l[apology] + l[confirm])``.

    Kept for comparison only: it is not shift-invariant and explodes when the denominator
    nears zero, which it warns about.
    """
    apology = logits[:, apology_ids].mean(-1)
    denominator = apology + logits[:, confirm_ids].mean(-1)
    if (denominator.abs() < RATIO_EPSILON).any():
        warnings.warn(
            "apology_ratio: a denominator is within 1e-3 of zero; the ratio metric is unstable "
            "here, prefer the logit difference.",
            RuntimeWarning,
            stacklevel=2,
        )
    return apology / denominator


def ratio_score(
    patched: Float[Tensor, " batch"], reference: Float[Tensor, " batch"]
) -> Float[Tensor, ""]:
    """The paper's head score: ``100 · mean((m_patched − m_ref) / m_ref)``."""
    if (reference.abs() < RATIO_EPSILON).any():
        warnings.warn("ratio_score: a reference ratio is near zero", RuntimeWarning, stacklevel=2)
    return 100 * ((patched - reference) / reference).mean()


Head = tuple[int, int]


def validate_heads(heads: list[Head], n_layers: int, n_heads: int) -> list[Head]:
    """Check (layer, query-head) pairs against the model's shape; return them as tuples."""
    checked = []
    for index, head in enumerate(heads):
        layer, number = (int(x) for x in head)
        if not (0 <= layer < n_layers and 0 <= number < n_heads):
            raise ValueError(
                f"heads[{index}] = L{layer}H{number} is out of range for a model with "
                f"{n_layers} layers and {n_heads} query heads"
            )
        checked.append((layer, number))
    return checked


def save_heads(
    path: str | Path, heads: list[Head], *, provenance: dict | None = None, **extra: object
) -> None:
    """Write the head selection as JSON:
    ``{"heads": [[layer, head], ...], "provenance": ..., **extra}``."""
    write_json(path, {"heads": [list(h) for h in heads], "provenance": provenance, **extra})


def load_heads(path: str | Path, *, expect: dict | None = None) -> list[Head]:
    """Read a head selection written by :func:`save_heads` (e.g. the run's ``heads.json``);
    with ``expect`` its provenance must match (:func:`spt_utils.io.check_provenance`)."""
    try:
        record = json.loads(Path(path).read_text())
        heads = [(int(layer), int(head)) for layer, head in record["heads"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: field 'heads' must be a list of [layer, head] pairs") from error
    check_provenance(record.get("provenance"), expect, str(path))
    return heads


# ----------------------------------------------------------------------------------------
# Path and activation patching of attention heads (issue 4)
# ----------------------------------------------------------------------------------------

SIGNS = ("positive", "negative", "both")


def z_name(layer: int) -> str:
    """The hook of every head's output ``z``: [batch, pos, head, d_head]."""
    return f"blocks.{layer}.attn.hook_z"


def _attn_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def _resid_mid_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_mid"


def check_pairs(model: TransformerBridge, pairs: PatchingPairs, method: str) -> None:
    """Raise a clear error for an encoder-decoder model, an empty pair set or answer ids
    outside the model's vocabulary."""
    require_decoder_only(model, f"patching.{method} (patching to logits through a decoder stack)")
    if len(pairs) == 0:
        raise ValueError(f"{method}: the pair set is empty")
    for name in ("apology_ids", "confirm_ids"):
        ids = getattr(pairs, name)
        if not ids:
            raise ValueError(f"{method}: pairs.{name} is empty")
        outside = [i for i in ids if not 0 <= int(i) < model.cfg.d_vocab]
        if outside:
            raise ValueError(
                f"{method}: pairs.{name} holds token ids {outside} outside the model's "
                f"vocabulary of {model.cfg.d_vocab} tokens (pairs built with another tokenizer?)"
            )


def answer_unembed(
    model: TransformerBridge, resid: Float[Tensor, "... d_model"], pairs: PatchingPairs
) -> Float[Tensor, " ..."]:
    """The logit difference from final residual-stream vectors, unembedding only the answer
    columns (``ln_final``, then the rows of ``W_U`` for the apology and confirm tokens)."""
    unembed = model.unembed.original_component  # nn.Linear(d_model, d_vocab)
    resid = model.ln_final(resid)
    with align_module_device(unembed):  # an offloaded unembedding is loaded for the call
        ids = torch.tensor(pairs.apology_ids + pairs.confirm_ids, device=unembed.weight.device)
        bias = None if unembed.bias is None else unembed.bias[ids]
        logits = torch.nn.functional.linear(resid.to(ids.device), unembed.weight[ids], bias)
    n_apology = len(pairs.apology_ids)
    return logits[..., :n_apology].mean(-1) - logits[..., n_apology:].mean(-1)


# --- pure hook functions (bound with functools.partial) ---------------------------------


def _store_hook(
    activation: Float[Tensor, "batch pos ..."],
    hook: HookPoint,
    store: dict,
    key: str,
    last: Tensor | None,
) -> None:
    """Keep the activation as ``store[key]``: each row's last real position when ``last`` is
    given, every position otherwise."""
    store[key] = (activation if last is None else gather_last(activation, last)).detach()


def _set_head_last_hook(
    z: Float[Tensor, "batch pos head d_head"],
    hook: HookPoint,
    head: int,
    value: Float[Tensor, "batch d_head"],
    last: Tensor,
) -> Float[Tensor, "batch pos head d_head"]:
    """Overwrite one head's z at each row's last position."""
    z = z.clone()
    z[torch.arange(len(last), device=z.device), last.to(z.device), head] = value
    return z


def _set_head_all_hook(
    z: Float[Tensor, "batch pos head d_head"],
    hook: HookPoint,
    head: int,
    value: Float[Tensor, "batch pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Overwrite one head's z at every position."""
    z = z.clone()
    z[:, :, head] = value
    return z


def _replace_hook(activation: Tensor, hook: HookPoint, value: Tensor) -> Tensor:
    """Replace a whole activation (e.g. freeze ``hook_attn_out`` to the reference run)."""
    return value


# --- one generic patching loop ------------------------------------------------------------

Hooks = list[tuple[str, Callable]]


def _patched_logit_diffs(
    model: TransformerBridge,
    pairs: PatchingPairs,
    patches: Sequence[Hooks],
    metric: Callable[[Tensor], Tensor] | None = None,
    *,
    desc: str = "patching",
) -> Float[Tensor, "n_patches batch"]:
    """Run the reference batch once per patch (a list of forward hooks); return the metric of
    each row's last-position logits (default: the answer logit difference)."""
    metric = metric or partial(
        answer_logit_diff, apology_ids=pairs.apology_ids, confirm_ids=pairs.confirm_ids
    )
    tokens = pairs.reference.to(model.cfg.device)
    values = []
    for fwd_hooks in tqdm(patches, desc=desc, leave=False):
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):  # removed even on error
            logits = model(tokens, return_type="logits")  # [batch, pos, d_vocab]
            values.append(metric(gather_last(logits, pairs.reference_last)).detach().cpu())
    return torch.stack(values)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def _stop_hook(activation: Tensor, hook: HookPoint) -> None:
    raise _StopForward


def cache_before_unembed(
    model: TransformerBridge, tokens: Tensor, names: list[str], last: Tensor | None = None
) -> dict[str, Tensor]:
    """One forward pass keeping the named hooks' values (only each row's last position when
    ``last`` is given); it stops at the final norm, so the full-vocabulary unembedding is
    never computed."""
    store: dict[str, Tensor] = {}
    last = None if last is None else last.to(model.cfg.device)
    hooks = [(name, partial(_store_hook, store=store, key=name, last=last)) for name in names]
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, ("ln_final.hook_in", _stop_hook)]):
        try:
            model(tokens.to(model.cfg.device), return_type=None)
        except _StopForward:
            pass
    missing = sorted(set(names) - set(store))
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire before the final norm")
    return store


@dataclass(frozen=True)
class HeadUncertainty:
    """How sure a head's score is: its bootstrap 95% interval over pairs, the share of pairs
    with the score's sign, and the number of pairs."""

    low: Float[Tensor, "layer head"]
    high: Float[Tensor, "layer head"]
    same_sign: Float[Tensor, "layer head"]
    n_pairs: int

    @property
    def excludes_zero(self) -> Tensor:
        """Heads whose interval lies wholly above or below 0."""
        return (self.low > 0) | (self.high < 0)


@dataclass
class HeadScores:
    """Per-head patching results. ``score`` is calibrated (reference 0, counterfactual 1): a
    positive score means patching that head's counterfactual value moves the answer toward
    the counterfactual run, i.e. the head carries part of the challenge's effect."""

    method: str
    logit_diff: Float[Tensor, "layer head"]  # mean patched logit difference
    score: Float[Tensor, "layer head"]
    calibration: Calibration
    per_pair: Float[Tensor, "layer head batch"] | None = None
    provenance: dict | None = None  # saved with the scores (spt_utils.io.provenance)

    def top_heads(self, k: int, sign: str = "positive") -> list[Head]:
        """The ``k`` heads with the largest |score| among those of the chosen sign:
        ``"positive"`` (score > 0), ``"negative"`` (score < 0) or ``"both"``."""
        return top_heads(self.score, k, sign)

    def pair_scores(self) -> Float[Tensor, "layer head batch"]:
        """Each pair's calibrated effect: (patched − that pair's reference logit difference)
        / (counterfactual − reference means). Their mean over pairs is ``score``."""
        if self.per_pair is None or not self.calibration.reference_pairs:
            raise ValueError(f"{self.method}: per-pair results were not kept")
        reference = torch.tensor(self.calibration.reference_pairs, dtype=self.per_pair.dtype)
        span = self.calibration.counterfactual - self.calibration.reference
        return (self.per_pair - reference) / span

    def uncertainty(self, *, n_resamples: int = 1000, seed: int = 0) -> HeadUncertainty:
        """Per-pair bootstrap 95% interval of every head's score and the share of pairs
        whose effect has the score's sign."""
        pair_scores = self.pair_scores()
        generator = torch.Generator().manual_seed(seed)
        low, high = bootstrap_ci(pair_scores, n_resamples=n_resamples, generator=generator)
        same_sign = (torch.sign(pair_scores) == torch.sign(self.score)[..., None]).float()
        return HeadUncertainty(low=low, high=high, same_sign=same_sign.mean(-1),
                               n_pairs=pair_scores.shape[-1])

    def save(self, path: str | Path, *, provenance: dict | None = None) -> None:
        """Write the scores with ``provenance`` (default: the one they hold)."""
        record = {**self.__dict__, "calibration": self.calibration.__dict__}
        if provenance:
            record["provenance"] = provenance
        with atomic_write(path, "wb") as handle:
            torch.save(record, handle)

    @classmethod
    def load(cls, path: str | Path, *, expect: dict | None = None) -> HeadScores:
        """Read :meth:`save`'s file; with ``expect`` its provenance must match."""
        record = torch.load(path, weights_only=True)
        check_provenance(record.get("provenance"), expect, str(path))
        return cls(**{**record, "calibration": Calibration(**record["calibration"])})


def top_heads(
    score: Float[Tensor, "layer head"],
    k: int,
    sign: str = "positive",
    eligible: Bool[Tensor, "layer head"] | None = None,
) -> list[Head]:
    """Heads ranked by |score| after the sign filter (see :meth:`HeadScores.top_heads`),
    only among the ``eligible`` ones when given (e.g. ``HeadUncertainty.excludes_zero``)."""
    if sign not in SIGNS:
        raise ValueError(f"sign: {sign!r} is not one of {SIGNS}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flat = score.flatten()
    # NaN marks an unscored head
    keep = {"positive": flat > 0, "negative": flat < 0, "both": ~flat.isnan()}[sign]
    if eligible is not None:
        keep = keep & eligible.flatten()
    order = [int(i) for i in torch.argsort(flat.abs(), descending=True) if keep[i]]
    n_heads = score.shape[1]
    return [(i // n_heads, i % n_heads) for i in order[:k]]


def _scores(
    method: str, per_pair: Tensor, calibration: Calibration, keep_per_pair: bool = True
) -> HeadScores:
    logit_diff = per_pair.mean(-1)
    return HeadScores(
        method=method,
        logit_diff=logit_diff,
        score=calibration.normalise(logit_diff),
        calibration=calibration,
        per_pair=per_pair if keep_per_pair else None,
    )


class UnsupportedArchitecture(ValueError):
    """The model's blocks are not the sequential pre-norm blocks a method relies on."""


# Relative tolerance of the block identities (max |difference| / max |expected|) per dtype:
# a recomputation in a 16-bit dtype may round differently from the model's own pass.
BLOCK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2,
                   torch.float16: 5e-2}


def _resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _mlp_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def _resid_post_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def _block_hook_names(n_layers: int) -> list[str]:
    """Every hook :func:`check_sequential_blocks` reads."""
    names = [z_name(layer) for layer in range(n_layers)]
    for function in (_resid_pre_name, _attn_out_name, _resid_mid_name, _mlp_out_name,
                     _resid_post_name):
        names += [function(layer) for layer in range(n_layers)]
    return names


def _require_hooks(model: TransformerBridge, names: list[str], method: str) -> None:
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        block = type(model.blocks[0]).__name__
        raise UnsupportedArchitecture(
            f"{method}: the model's blocks ({block}) have no {missing[0]}: it needs sequential "
            "pre-norm blocks (attention, then MLP, each added to the residual stream), as in "
            "Llama, Mistral and Qwen2; parallel attention + MLP blocks (GPT-J, GPT-NeoX with "
            "use_parallel_residual) are not supported. Use path_patch_heads_oracle instead."
        )


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.float().to(expected.device) - expected).abs().max() / scale).item()


@torch.no_grad()
def check_sequential_blocks(
    model: TransformerBridge, cache: dict[str, Tensor], method: str = "path_patch_heads"
) -> None:
    """Raise :class:`UnsupportedArchitecture` unless every block of the cached run (each
    row's last position, hooks from :func:`_block_hook_names`) satisfies the identities the
    fast path patching builds on, within :data:`BLOCK_TOLERANCE` of the model's dtype:

    * ``attn_out = o_proj(z)`` (a head writes linearly through its ``W_O`` slice: no norm
      after the attention output, unlike Gemma-2's sandwich norm);
    * ``resid_mid = resid_pre + attn_out``;
    * ``mlp_out = mlp(ln2(resid_mid))`` (the MLP reads only ``resid_mid``);
    * ``resid_post = resid_mid + mlp_out`` and the next ``resid_pre = resid_post``.
    """
    n_layers = model.cfg.n_layers
    tolerance = BLOCK_TOLERANCE.get(model.cfg.dtype, 5e-2)
    for layer in range(n_layers):
        block = model.blocks[layer]
        z = cache[z_name(layer)]  # [batch, head, d_head]
        resid_mid, attn_out = cache[_resid_mid_name(layer)], cache[_attn_out_name(layer)]
        mlp_out, resid_post = cache[_mlp_out_name(layer)], cache[_resid_post_name(layer)]
        identities = {
            "attn_out = o_proj(z)": (
                block.attn.o(rearrange(z, "batch head d_head -> batch (head d_head)")), attn_out),
            "resid_mid = resid_pre + attn_out": (
                cache[_resid_pre_name(layer)] + attn_out.to(resid_mid.device), resid_mid),
            "mlp_out = mlp(ln2(resid_mid))": (block.mlp(block.ln2(resid_mid)), mlp_out),
            "resid_post = resid_mid + mlp_out": (resid_mid + mlp_out.to(resid_mid.device),
                                                 resid_post),
        }
        if layer + 1 < n_layers:
            identities["next resid_pre = resid_post"] = (
                resid_post, cache[_resid_pre_name(layer + 1)])
        for identity, (actual, expected) in identities.items():
            error = _relative_error(actual, expected)
            if not error <= tolerance:
                raise UnsupportedArchitecture(
                    f"{method}: block {layer} ({type(block).__name__}) breaks {identity} "
                    f"(relative error {error:.3g} > {tolerance:g} for {model.cfg.dtype}): the "
                    "fast path needs sequential pre-norm blocks with no norm after the "
                    "attention or MLP output (Llama, Mistral, Qwen2; not Gemma-2's sandwich "
                    "norms, parallel blocks or a hook that edits these activations). Use "
                    "path_patch_heads_oracle instead."
                )


@torch.no_grad()
def path_patch_heads(model: TransformerBridge, pairs: PatchingPairs) -> HeadScores:
    """Exact path patching of every head to the logits, in about three forward passes.

    Sender (l, h): head h's z at each row's last position, from the counterfactual run; the
    attention output of every later layer frozen to the reference run; MLPs and norms live;
    the answer logit difference read at the last position. With later attention frozen and
    only the last position patched, nothing crosses positions after the patch, so the
    sender's effect flows only through the last position's residual stream: resid_mid[l]
    moves by ``(z_cf − z_ref) @ W_O[h]`` (any o_proj bias cancels), then every later layer
    adds its frozen reference attention output and a live MLP. All senders travel together
    as one growing ``[senders, batch, d_model]`` stack through the model's own modules.

    The block identities this relies on are checked on the reference run first
    (:func:`check_sequential_blocks`); other block types raise
    :class:`UnsupportedArchitecture`.
    """
    check_pairs(model, pairs, "path_patch_heads")
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    names = _block_hook_names(n_layers)
    _require_hooks(model, names, "path_patch_heads")
    reference = cache_before_unembed(model, pairs.reference, names, pairs.reference_last)
    check_sequential_blocks(model, reference)
    z_names = [z_name(layer) for layer in range(n_layers)]
    final = _resid_post_name(n_layers - 1)
    counterfactual = cache_before_unembed(
        model, pairs.counterfactual, z_names + [final], pairs.counterfactual_last
    )
    calibration = _checked_calibration(
        answer_unembed(model, reference[final], pairs).cpu(),
        answer_unembed(model, counterfactual[final], pairs).cpu(),
    )
    stack = None  # [senders, batch, d_model], senders ordered (layer, head)
    for layer in range(n_layers):
        block = model.blocks[layer]
        resid_mid = reference[_resid_mid_name(layer)]  # on this layer's device
        if stack is not None:  # frozen later attention
            stack = stack.to(resid_mid.device) + reference[_attn_out_name(layer)]
        # z: [batch, head, d_head]; o_proj weight: [d_model, head·d_head]
        dz = counterfactual[z_name(layer)] - reference[z_name(layer)]
        o_proj = block.attn.o.original_component
        with align_module_device(o_proj):  # an offloaded layer's weight is loaded for this
            w_o = rearrange(o_proj.weight, "d_model (head d_head) -> d_model head d_head",
                            head=n_heads, d_head=d_head)
            delta = einsum(dz.to(w_o.device), w_o,
                           "batch head d_head, d_model head d_head -> head batch d_model")
        senders = resid_mid + delta.to(resid_mid.device)
        stack = senders if stack is None else torch.cat([stack, senders])
        stack = stack + block.mlp(block.ln2(stack))
    per_pair = rearrange(answer_unembed(model, stack, pairs),  # [senders, batch]
                         "(layer head) batch -> layer head batch", layer=n_layers, head=n_heads)
    return _scores("path", per_pair.cpu(), calibration)


def _reference_and_counterfactual_cache(
    model: TransformerBridge, pairs: PatchingPairs, reference_names: list[str]
) -> tuple[dict, dict, Calibration]:
    """The clean runs' caches (reference: ``reference_names``; counterfactual: every z)."""
    z_names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        reference_logits, reference = model.run_with_cache(
            pairs.reference.to(model.cfg.device), names_filter=reference_names
        )
        counterfactual_logits, counterfactual = model.run_with_cache(
            pairs.counterfactual.to(model.cfg.device), names_filter=z_names
        )
    calibration = _checked_calibration(
        _last_logit_diff(reference_logits, pairs.reference_last, pairs),
        _last_logit_diff(counterfactual_logits, pairs.counterfactual_last, pairs),
    )
    return reference, counterfactual, calibration


def _layers(model: TransformerBridge, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against the model (default: all layers)."""
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for index, layer in enumerate(layers):
        if not 0 <= layer < n_layers:
            raise ValueError(f"layers[{index}] = {layer} is out of range for {n_layers} layers")
    return layers


def path_patch_heads_oracle(
    model: TransformerBridge,
    pairs: PatchingPairs,
    heads: Sequence[Head] | None = None,
    metric: Callable[[Tensor], Tensor] | None = None,
) -> HeadScores:
    """The per-sender reference implementation of :func:`path_patch_heads`: one hooked
    forward pass per head. Heads not in ``heads`` (default: all) are NaN."""
    check_pairs(model, pairs, "path_patch_heads_oracle")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    every_head = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    heads = validate_heads(every_head if heads is None else list(heads), n_layers, n_heads)
    attn_names = [_attn_out_name(layer) for layer in range(n_layers)]
    reference, counterfactual, calibration = _reference_and_counterfactual_cache(
        model, pairs, attn_names
    )
    patches = []
    for layer, head in heads:
        # z: [batch, pos, head, d_head] → the sender's counterfactual value at the last position
        z_cf = gather_last(counterfactual[z_name(layer)], pairs.counterfactual_last)[:, head]
        sender = partial(_set_head_last_hook, head=head, value=z_cf, last=pairs.reference_last)
        frozen = [
            (_attn_out_name(later), partial(_replace_hook, value=reference[_attn_out_name(later)]))
            for later in range(layer + 1, n_layers)
        ]
        patches.append([(z_name(layer), sender), *frozen])
    values = _patched_logit_diffs(model, pairs, patches, metric, desc="path patching (oracle)")
    return _scores("path_oracle", _scatter(values, heads, n_layers, n_heads), calibration)


def path_patch_receivers(
    model: TransformerBridge, pairs: PatchingPairs, sender: Head, *, component: str = "q"
) -> HeadScores:
    """Path patching from one sender head into every later head's ``component`` input
    (``"q"``; ``"k"``/``"v"`` only without grouped-query attention): the sender's
    counterfactual-minus-reference write reaches only that receiver's q/k/v input, at every
    position, while every other reader sees the reference run (the direct edge of Wang et
    al., through TransformerLens ``get_act_patch_direct_path``, one forward pass per
    receiver). Needs equal-length pairs. ``score[l, h]`` is calibrated; layers up to the
    sender's are NaN (no path)."""
    method = f"path_patch_receivers(component={component!r})"
    check_pairs(model, pairs, method)
    pairs.require_equal_lengths(method)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layer, head = validate_heads([sender], n_layers, n_heads)[0]
    z_names = [z_name(layer)]
    reference, counterfactual, calibration = _reference_and_counterfactual_cache(
        model, pairs, z_names
    )

    def mean_logit_diff(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        return _last_logit_diff(logits, pairs.reference_last, pairs).mean()

    with torch.no_grad():
        logit_diff = get_act_patch_direct_path(
            model, pairs.reference.to(model.cfg.device), counterfactual, reference,
            mean_logit_diff, layer, head, component=component, verbose=False,
        ).cpu()
    logit_diff[: layer + 1] = float("nan")  # TransformerLens leaves 0.0 placeholders there
    return HeadScores(
        method=f"path_receivers_{component}",
        logit_diff=logit_diff,
        score=calibration.normalise(logit_diff),
        calibration=calibration,
    )


def _scatter(
    values: Float[Tensor, "n batch"], heads: list[Head], n_layers: int, n_heads: int
) -> Float[Tensor, "layer head batch"]:
    grid = torch.full((n_layers, n_heads, values.shape[-1]), float("nan"))
    for (layer, head), value in zip(heads, values, strict=True):
        grid[layer, head] = value
    return grid


def _check_position(
    model: TransformerBridge, pairs: PatchingPairs, position: str, function: str
) -> None:
    """Validate ``position`` and the pairs for a patching method (errors name the method)."""
    if position not in ("last", "all"):
        raise ValueError(f"position: {position!r} is not 'last' or 'all'")
    method = f"{function}(position={position!r})"
    check_pairs(model, pairs, method)
    if position == "all":
        pairs.require_equal_lengths(method)


def activation_patch_heads(
    model: TransformerBridge,
    pairs: PatchingPairs,
    *,
    position: str = "last",
    layers: Sequence[int] | None = None,
    metric: Callable[[Tensor], Tensor] | None = None,
) -> HeadScores:
    """Activation patching of head outputs (z) from the counterfactual into the reference run,
    one forward pass per head, everything downstream live. ``position="last"`` patches each
    row's last position (any pairs); ``"all"`` every position (needs equal-length pairs,
    e.g. ``build_patching_pairs(..., wording="matched")``). Layers not in ``layers`` are NaN."""
    _check_position(model, pairs, position, "activation_patch_heads")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(layer, head) for layer in _layers(model, layers) for head in range(n_heads)]
    _, counterfactual, calibration = _reference_and_counterfactual_cache(model, pairs, [])
    patches = []
    for layer, head in heads:
        z_cf = counterfactual[z_name(layer)]  # [batch, pos, head, d_head]
        if position == "last":
            setter = partial(
                _set_head_last_hook,
                head=head,
                value=gather_last(z_cf, pairs.counterfactual_last)[:, head],
                last=pairs.reference_last,
            )
        else:
            width = pairs.reference.shape[1]
            setter = partial(_set_head_all_hook, head=head, value=z_cf[:, :width, head])
        patches.append([(z_name(layer), setter)])
    values = _patched_logit_diffs(model, pairs, patches, metric, desc=f"activation ({position})")
    grid = _scatter(values, heads, n_layers, n_heads)
    return _scores(f"activation_{position}", grid, calibration)


def attribution_patch_heads(
    model: TransformerBridge, pairs: PatchingPairs, *, position: str = "last"
) -> HeadScores:
    """Attribution patching: the first-order estimate of :func:`activation_patch_heads`,
    ``(z_cf − z_ref) · ∂LD/∂z_ref``, from a reference forward + backward and a counterfactual
    forward. ``position="all"`` sums over positions (equal-length pairs only)."""
    _check_position(model, pairs, position, "attribution_patch_heads")
    n_layers = model.cfg.n_layers
    z_names = [z_name(layer) for layer in range(n_layers)]
    device = model.cfg.device
    with torch.no_grad():
        counterfactual_logits, counterfactual = model.run_with_cache(
            pairs.counterfactual.to(device), names_filter=z_names
        )
    store: dict[str, Tensor] = {}
    hooks = [(name, partial(_keep_hook, store=store, key=name)) for name in z_names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(pairs.reference.to(device), return_type="logits")  # [batch, pos, vocab]
        per_row = _last_logit_diff(logits, pairs.reference_last, pairs)
        grads = torch.autograd.grad(per_row.sum(), [store[name] for name in z_names])
    reference_diff = per_row.detach().cpu()
    rows = []
    for name, grad in zip(z_names, grads, strict=True):
        z_ref = store[name].detach()  # [batch, pos, head, d_head]
        if position == "last":
            dz = gather_last(counterfactual[name], pairs.counterfactual_last) - gather_last(
                z_ref, pairs.reference_last
            )
            rows.append((dz * gather_last(grad, pairs.reference_last)).sum(-1))  # [batch, head]
        else:
            width = z_ref.shape[1]
            rows.append(((counterfactual[name][:, :width] - z_ref) * grad).sum((1, 3)))
    estimate = rearrange(rows, "layer batch head -> layer head batch").cpu()
    calibration = _checked_calibration(
        reference_diff, _last_logit_diff(counterfactual_logits, pairs.counterfactual_last, pairs)
    )
    return _scores(f"attribution_{position}", reference_diff + estimate, calibration)


def _keep_hook(activation: Tensor, hook: HookPoint, store: dict, key: str) -> Tensor:
    """Keep the activation (with its autograd graph) for a backward pass; returning it makes
    it the tensor the rest of the forward pass uses. Under frozen weights (e.g. a tuned
    model) it has no graph, so it becomes a leaf that the backward pass reaches."""
    if not activation.requires_grad:
        activation = activation.detach().requires_grad_(True)
    store[key] = activation
    return activation


# --- knockout attribution: which heads the challenge's effect needs (issue 26) -----------


def _zero_heads_hook(
    z: Float[Tensor, "batch pos head d_head"], hook: HookPoint, heads: list[int]
) -> Float[Tensor, "batch pos head d_head"]:
    """Zero-ablate ``heads`` of this layer at every position."""
    z = z.clone()
    z[:, :, heads] = 0
    return z


def _zero_hooks(heads: Sequence[Head]) -> Hooks:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return [(z_name(layer), partial(_zero_heads_hook, heads=sorted(hs)))
            for layer, hs in sorted(by_layer.items())]


def _z_dot_grad(
    model: TransformerBridge, tokens: Tensor, last: Tensor, pairs: PatchingPairs,
    zeroed: Sequence[Head],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, "layer head batch"]]:
    """Each row's answer logit difference and, per head, ``Σ_pos z · ∂LD/∂z`` (minus the
    first-order change of LD when the head is zeroed), with ``zeroed`` heads ablated.
    Right padding needs no mask: later positions cannot reach the last one."""
    z_names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    store: dict[str, Tensor] = {}
    keep = [(name, partial(_keep_hook, store=store, key=name)) for name in z_names]
    # the zeroing hooks run first, so the kept z (and its product) of a zeroed head is 0
    with torch.enable_grad(), model.hooks(fwd_hooks=[*_zero_hooks(zeroed), *keep]):
        logits = model(tokens.to(model.cfg.device), return_type="logits")  # [batch, pos, vocab]
        per_row = _last_logit_diff(logits, last, pairs)
        grads = torch.autograd.grad(per_row.sum(), [store[name] for name in z_names])
    # z, grad: [batch, pos, head, d_head] -> [batch, head] per layer
    products = torch.stack([(store[name].detach() * grad).sum((1, 3))
                            for name, grad in zip(z_names, grads, strict=True)])
    return per_row.detach().cpu(), rearrange(products, "layer batch head -> layer head batch").cpu()


def knockout_attribution_heads(
    model: TransformerBridge, pairs: PatchingPairs, *, zeroed: Sequence[Head] = ()
) -> HeadScores:
    """The first-order estimate of zero-ablating each head (every position, **both** sides
    of every pair): a head's score is the share of the challenge's effect
    (LD_ref − LD_cf) its knockout removes, so it finds heads the effect *needs* even where
    their output hardly differs between the two prompts (which patching cannot see). One
    forward and backward pass per side; ``zeroed`` heads are ablated throughout (their own
    score is then 0). Any pairs (no equal lengths needed)."""
    check_pairs(model, pairs, "knockout_attribution_heads")
    zeroed = validate_heads([tuple(h) for h in zeroed], model.cfg.n_layers, model.cfg.n_heads)
    reference_diff, reference_products = _z_dot_grad(
        model, pairs.reference, pairs.reference_last, pairs, zeroed)
    counterfactual_diff, counterfactual_products = _z_dot_grad(
        model, pairs.counterfactual, pairs.counterfactual_last, pairs, zeroed)
    # zeroing changes LD by about −z·∂LD/∂z on each side; the pair's effect by the difference
    effect_change = counterfactual_products - reference_products  # [layer, head, batch]
    calibration = _checked_calibration(reference_diff, counterfactual_diff)
    return _scores("knockout_attribution", reference_diff + effect_change, calibration)


@dataclass(frozen=True)
class GreedyKnockout:
    """A set found by :func:`greedy_knockout_heads`: ``heads`` in the order chosen and the
    exact share of the challenge's effect that remains with the first i + 1 of them
    zero-ablated on both sides (``remaining[i]``)."""

    heads: list[Head]
    remaining: list[float]

    def ranking(self, rest: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
        """A score that ranks the chosen heads first, in their order, then the others by
        ``rest`` (e.g. their knockout attribution)."""
        score = rest.clone().float()
        top = score.nan_to_num(0).abs().max().item() + 1
        for index, head in enumerate(self.heads):
            score[head] = top + len(self.heads) - index
        return score


def greedy_knockout_heads(
    model: TransformerBridge, pairs: PatchingPairs, k: int
) -> GreedyKnockout:
    """A set-level search for the heads the challenge's effect needs: ``k`` times, add the
    head whose zero ablation (with the heads already chosen ablated) removes the most of
    the effect by :func:`knockout_attribution_heads`, then measure the remaining share
    exactly. Redundant heads, each dispensable alone, show once the others are gone."""
    n_all = model.cfg.n_layers * model.cfg.n_heads
    if not 1 <= k < n_all:
        raise ValueError(f"greedy_knockout_heads: k = {k} is not between 1 and {n_all - 1}")
    chosen: list[Head] = []
    effects = []  # the exact effect with the chosen heads ablated: each step's clean runs
    for step in range(k + 1):
        scores = knockout_attribution_heads(model, pairs, zeroed=chosen)
        effects.append(scores.calibration.reference - scores.calibration.counterfactual)
        if step == k:
            break
        score = scores.score.clone()
        for head in chosen:
            score[head] = -torch.inf
        chosen.append(divmod(int(score.flatten().argmax()), model.cfg.n_heads))
    return GreedyKnockout(chosen, [effect / effects[0] for effect in effects[1:]])


def _descending_ranks(score: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
    """Each head's rank by ``score``, 1 the largest (ties to the lower layer and head)."""
    flat = score.flatten().nan_to_num(-torch.inf)
    ranks = torch.empty_like(flat)
    ranks[flat.argsort(descending=True, stable=True)] = torch.arange(
        1, len(flat) + 1, dtype=flat.dtype)
    return ranks.view_as(score)


def combined_head_scores(path: HeadScores, knockout: HeadScores) -> Float[Tensor, "layer head"]:
    """Rank fusion of two views of a head: carrying the challenge's effect straight to the
    answer logits (path patching) and being needed for it (knockout attribution). A head's
    combined score is ``n_heads_total + 1 − its combined rank``, the heads ordered by their
    better rank (ties: by the worse rank, then by the path rank), so a head that either view
    ranks high ranks high. Both scores must come from the same pairs."""
    if path.score.shape != knockout.score.shape:
        raise ValueError(f"combined_head_scores: score shapes {list(path.score.shape)} and "
                         f"{list(knockout.score.shape)} differ")
    if abs(path.calibration.reference - knockout.calibration.reference) > 1e-3 or abs(
            path.calibration.counterfactual - knockout.calibration.counterfactual) > 1e-3:
        raise ValueError("combined_head_scores: the two scores come from different pairs "
                         "(their clean logit differences differ)")
    path_rank, knockout_rank = _descending_ranks(path.score), _descending_ranks(knockout.score)
    better = torch.minimum(path_rank, knockout_rank)
    worse = torch.maximum(path_rank, knockout_rank)
    span = path.score.numel() + 1
    key = (better.long() * span + worse.long()) * span + path_rank.long()  # lexicographic
    return _descending_ranks(-key.double()).neg() + span
