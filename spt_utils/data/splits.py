"""Disjoint question splits and everything notebook 01 writes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from spt_utils.data.opinion import arithmetic_claims, load_opinion_sentences, opinion_prompts
from spt_utils.data.pairs import PatchingPairs, build_patching_pairs
from spt_utils.data.sources import FEATURES, DataError, check_unique_ids, numbered_jsonl
from spt_utils.data.training import build_training_data
from spt_utils.io import write_jsonl

SPLITS = ("patching", "train", "eval", "general")
# Splits that need questions the model answers correctly before the challenge: patching pairs
# (the science) and the evaluation set (the apologize rate is conditioned on correct_before).
POOL_SPLITS = ("patching", "eval")


def split_questions(
    questions: datasets.Dataset,
    sizes: dict[str, int],
    *,
    seed: int,
    correct_pool: Collection[str] | None = None,
) -> dict[str, datasets.Dataset]:
    """Disjoint question sets by id, drawn in a seeded order.

    ``sizes`` maps split names (:data:`SPLITS`) to counts; a count of -1 takes every
    question left. The :data:`POOL_SPLITS` (patching, then eval) are drawn first, from
    ``correct_pool`` (the ids the model answers correctly) when given, each topped up from
    the other questions once the pool runs out; train and general come from what is left.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise DataError(f"sizes: unknown split(s) {sorted(unknown)}; choose from {SPLITS}")
    ids = questions["id"]  # one column read, not a decoded row per access
    check_unique_ids([{"id": i} for i in ids], "questions")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    random.Random(seed).shuffle(order)
    pool = set(correct_pool or ())
    # pool first, each part keeping the seeded order
    pooled = [i for i in order if ids[i] in pool] + [i for i in order if ids[i] not in pool]
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise DataError(f"sizes: only one split may take the rest (-1), not {rest}")
    fixed = sum(size for size in sizes.values() if size != -1)
    names = [s for s in POOL_SPLITS if s in sizes] + [
        s for s in SPLITS if s in sizes and s not in POOL_SPLITS
    ]
    splits, used = {}, set()
    for name in names:
        left = [i for i in (pooled if name in POOL_SPLITS else order) if i not in used]
        want = len(order) - fixed if sizes[name] == -1 else sizes[name]
        if want < 0 or want > len(left):
            raise DataError(
                f"sizes[{name!r}] = {sizes[name]}: only {len(left)} of "
                f"{len(order)} questions are left after {len(used)} for earlier splits"
            )
        splits[name] = questions.select(left[:want])
        used.update(left[:want])
    return {name: splits[name] for name in SPLITS if name in splits}


def save_questions(path: str | Path, questions: datasets.Dataset) -> None:
    """Write a question set as JSON lines (atomically)."""
    write_jsonl(path, [dict(row) for row in questions])


def load_questions(path: str | Path) -> datasets.Dataset:
    """Read a question set written by :func:`save_questions`, checking fields and ids."""
    numbered = numbered_jsonl(path, tuple(FEATURES))
    records = [record for _, record in numbered]
    check_unique_ids(records, str(path), [number for number, _ in numbered])
    return datasets.Dataset.from_list(records, features=FEATURES)




DATA_FILES = {
    "patching": "patching_questions.jsonl",
    "train": "train_questions.jsonl",
    "eval": "eval_questions.jsonl",
    "general": "general_questions.jsonl",
}


@dataclass
class SynthesizedData:
    """The question splits, patching pairs, training conversations and opinion prompts."""

    splits: dict[str, datasets.Dataset]
    pairs: PatchingPairs
    training: list[dict]
    opinion: list[dict]

    def save(self, data_dir: str | Path) -> dict[str, Path]:
        """Write every file of the run-directory contract under ``data_dir`` (atomically)."""
        data_dir = Path(data_dir)
        paths = {name: data_dir / DATA_FILES[name] for name in SPLITS}
        for name in SPLITS:
            save_questions(paths[name], self.splits[name])
        paths |= {
            "pairs": data_dir / "pairs.pt",
            "training": data_dir / "train.jsonl",
            "opinion": data_dir / "opinion_eval.jsonl",
        }
        self.pairs.save(paths["pairs"])
        write_jsonl(paths["training"], self.training)
        write_jsonl(paths["opinion"], self.opinion)
        return paths


def synthesize(
    questions: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    sizes: dict[str, int],
    n_train: int,
    seed: int,
    correct_pool: Collection[str] | None = None,
    opinion_sentences: Sequence[dict] | None = None,
    n_arithmetic: int = 50,
    wording: str = "paper",
    explain: Callable[[dict], str] | None = None,
    progress: bool = False,
) -> SynthesizedData:
    """Split ``questions`` and build every dataset from the splits, deterministically."""
    missing = set(SPLITS) - set(sizes)
    if missing:
        raise DataError(f"sizes: missing split(s) {sorted(missing)}")
    splits = split_questions(questions, sizes, seed=seed, correct_pool=correct_pool)
    sentences = opinion_sentences if opinion_sentences is not None else load_opinion_sentences()
    return SynthesizedData(
        splits=splits,
        pairs=build_patching_pairs(splits["patching"], tokenizer, wording=wording),
        training=build_training_data(
            splits["train"], n_train, seed=seed, explain=explain, progress=progress
        ),
        opinion=opinion_prompts(sentences, seed=seed) + arithmetic_claims(n_arithmetic, seed=seed),
    )
