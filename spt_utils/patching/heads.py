"""Heads and their scores: a (layer, head) selection and its file, the per-head
:class:`HeadScores` every patching method returns with their bootstrap uncertainty, and the
top-k ranking."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.utilities.statistics import bootstrap_ci

from spt_utils.io import atomic_write, check_provenance, write_json
from spt_utils.patching.metrics import Calibration

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


SIGNS = ("positive", "negative", "both")


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


def _scatter(
    values: Float[Tensor, "n batch"], heads: list[Head], n_layers: int, n_heads: int
) -> Float[Tensor, "layer head batch"]:
    grid = torch.full((n_layers, n_heads, values.shape[-1]), float("nan"))
    for (layer, head), value in zip(heads, values, strict=True):
        grid[layer, head] = value
    return grid
