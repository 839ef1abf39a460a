"""The candidates an evaluation compares: the base model, tuned folders (SPT, SFT, LoRA,
prompt tuning) and few-shot prompting, each as an :class:`spt_utils.evaluation.Candidate`.

Evaluate them one at a time (:func:`iter_candidates` or :func:`open_candidate`): each tuned
model is built around the base model's unchanged tensors (``models.load_model(...,
share_with=base)``), so it costs only what its method changed (SPT: the q/o matrices of the
heads' layers; LoRA: the attention matrices; SFT: a whole model), and it is freed before the
next one loads. Peak memory is then the base model plus one candidate's own tensors.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import models, tuning
from spt_utils.evaluation import Candidate

METHODS = ("base", "spt", "sft", "lora_attn", "lora_heads", "prompt_tuning", "few_shot")

log = logging.getLogger(__name__)


def _load(
    run_dir: Path, base: TransformerBridge, method: str, n_shots: int, expect: dict | None
) -> Candidate | None:
    """One candidate (``None``, with a logged warning, when its artifact is missing); with
    ``expect`` a tuned folder's provenance must match it (``tuning.load_tuned``)."""
    train = run_dir / "data" / "train.jsonl"
    folder = run_dir / "tuned" / method
    if method == "base":
        return Candidate("base", base, drifts=False)
    if method == "few_shot":
        if not train.exists():
            log.warning("few_shot: skipped (needs %s)", train)
            return None
        demonstrations = tuning.load_training_conversations(train)
        transform = partial(tuning.few_shot_conversation, demonstrations=demonstrations,
                            k=n_shots)
        return Candidate("few_shot", base, transform=transform, drifts=False)
    if not folder.is_dir():
        log.warning("%s: skipped (%s does not exist)", method, folder)
        return None
    if (folder / tuning.TUNING_FILE).exists():
        bridge, hf_model = tuning.load_tuned(folder, base=base, expect=expect)
        return Candidate(method, bridge,
                         hf_model=None if hf_model is bridge.original_model else hf_model)
    if (folder / "adapter_config.json").exists():
        log.warning("%s: skipped (a peft adapter without %s)", method, tuning.TUNING_FILE)
        return None
    return Candidate(method, models.load_model(str(folder), share_with=base))


def release(candidate: Candidate, base: TransformerBridge) -> None:
    """Free what ``candidate`` holds beyond ``base``: a tuned model's own tensors go to the
    ``meta`` device (the shared ones stay the base's), so the candidate is unusable after."""
    if candidate.bridge is not base:
        candidate.bridge.original_model.to_empty(device="meta")
    candidate.hf_model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def open_candidate(
    run_dir: str | Path, base: TransformerBridge, method: str, *, n_shots: int = 2,
    expect: dict | None = None,
) -> Iterator[Candidate | None]:
    """``with open_candidate(run_dir, base, "spt") as candidate:`` loads one candidate (see
    :func:`load_candidates`; ``None`` when its artifact is missing) and releases it on exit."""
    candidate = _load(Path(run_dir), base, method, n_shots, expect)
    try:
        yield candidate
    finally:
        if candidate is not None:
            release(candidate, base)


def iter_candidates(
    run_dir: str | Path,
    base: TransformerBridge,
    methods: Sequence[str] = METHODS,
    *,
    n_shots: int = 2,
    expect: dict | None = None,
) -> Iterator[Candidate]:
    """The candidates one at a time: each is released when the loop asks for the next one,
    so never hold on to a candidate past its iteration."""
    for method in methods:
        with open_candidate(run_dir, base, method, n_shots=n_shots, expect=expect) as candidate:
            if candidate is not None:
                yield candidate


def load_candidates(
    run_dir: Path,
    base: TransformerBridge,
    methods: Sequence[str] = METHODS,
    *,
    n_shots: int = 2,
    expect: dict | None = None,
) -> list[Candidate]:
    """Every candidate at once (memory: the base plus every candidate's own tensors; prefer
    :func:`iter_candidates`). A method whose artifact is missing is skipped with a note.

    ``base`` is the loaded base model. Tuned methods load ``run_dir/tuned/<method>/`` with
    ``tuning.load_tuned`` (a folder written by notebook 04) or as a plain Hugging Face
    folder, around ``base``'s tensors; ``few_shot`` puts ``n_shots`` demonstrations from
    ``run_dir/data/train.jsonl`` in front of every conversation
    (``tuning.few_shot_conversation``). With ``expect`` (:func:`spt_utils.io.provenance` of
    the base model) a tuned folder made from another model or tokenizer raises
    :class:`spt_utils.io.ProvenanceError`.
    """
    loaded = (_load(Path(run_dir), base, method, n_shots, expect) for method in methods)
    return [candidate for candidate in loaded if candidate is not None]
