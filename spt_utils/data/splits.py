"""Disjoint question splits and everything notebook 01 writes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from spt_utils.data.answers import FirstAnswers
from spt_utils.data.conversations import check_protocol
from spt_utils.data.opinion import arithmetic_claims, load_opinion_sentences, opinion_prompts
from spt_utils.data.pairs import PatchingPairs, build_patching_pairs
from spt_utils.data.sources import FEATURES, DataError, check_unique_ids, numbered_jsonl
from spt_utils.data.training import build_training_data
from spt_utils.io import write_json, write_jsonl

SPLITS = ("patching", "train", "dev", "eval")
KINDS_OF_QUESTION = ("known", "wrong")  # answered correctly / wrongly by the model itself
Sizes = dict[str, tuple[int, int]]  # split → (known, wrong) question counts; -1: the rest


def split_questions(
    questions: datasets.Dataset,
    sizes: Sizes,
    *,
    seed: int,
    known: Collection[str],
) -> dict[str, datasets.Dataset]:
    """Disjoint question sets by id, drawn in a seeded order.

    ``sizes[split] = (n_known, n_wrong)``: how many questions the model answers correctly
    (ids in ``known``) and wrongly go to that split, e.g. patching pairs need known questions,
    revise examples and the wrong-before evaluation wrong ones. Fixed counts are drawn in the
    order of :data:`SPLITS`; a count of -1 then takes every question of that kind left (one
    split per kind at most).
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise DataError(f"sizes: unknown split(s) {sorted(unknown)}; choose from {SPLITS}")
    ids = questions["id"]  # one column read, not a decoded row per access
    check_unique_ids([{"id": i} for i in ids], "questions")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    random.Random(seed).shuffle(order)
    known = set(known)
    pools = {"known": [i for i in order if ids[i] in known],
             "wrong": [i for i in order if ids[i] not in known]}
    for column, kind in enumerate(KINDS_OF_QUESTION):
        rest = [name for name, size in sizes.items() if size[column] == -1]
        if len(rest) > 1:
            raise DataError(f"sizes: only one split may take the rest of the {kind} questions "
                            f"(-1), not {rest}")
        if not pools[kind] and any(size[column] for size in sizes.values()):
            raise DataError(f"sizes: {kind} questions are asked for, but there are none (the "
                            f"model answers {len(pools['known'])} of {len(order)} correctly)")
    names = [s for s in SPLITS if s in sizes]
    chosen: dict[str, list[int]] = {name: [] for name in names}
    for column, kind in enumerate(KINDS_OF_QUESTION):
        # fixed counts first, in the order of SPLITS; a -1 split takes what is left
        for name in sorted(names, key=lambda n: sizes[n][column] == -1):
            want = len(pools[kind]) if sizes[name][column] == -1 else sizes[name][column]
            if not 0 <= want <= len(pools[kind]):
                raise DataError(f"sizes[{name!r}] asks for {sizes[name][column]} {kind} "
                                f"questions: only {len(pools[kind])} are left")
            chosen[name] += pools[kind][:want]
            pools[kind] = pools[kind][want:]
    position = {index: rank for rank, index in enumerate(order)}
    splits = {name: questions.select(sorted(chosen[name], key=position.__getitem__))
              for name in names}
    return splits


def save_questions(path: str | Path, questions: datasets.Dataset) -> None:
    """Write a question set as JSON lines (atomically)."""
    write_jsonl(path, [dict(row) for row in questions])


def load_questions(path: str | Path) -> datasets.Dataset:
    """Read a question set written by :func:`save_questions`, checking fields and ids."""
    numbered = numbered_jsonl(path, tuple(FEATURES))
    records = [record for _, record in numbered]
    check_unique_ids(records, str(path), [number for number, _ in numbered])
    return datasets.Dataset.from_list(records, features=FEATURES)




SYNTHESIS_FILE = "synthesis.json"  # the run's question protocol, read by later notebooks


def read_protocol(data_dir: str | Path) -> str:
    """The question protocol the run's data was built with (``synthesis.json``)."""
    path = Path(data_dir) / SYNTHESIS_FILE
    try:
        protocol = json.loads(path.read_text())["protocol"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise DataError(f"{path}: cannot read field 'protocol' ({error}); run notebook 01 "
                        "(data.synthesize) first") from error
    check_protocol(protocol)
    return protocol


DATA_FILES = {
    "patching": "patching_questions.jsonl",
    "train": "train_questions.jsonl",
    "dev": "dev_questions.jsonl",
    "eval": "eval_questions.jsonl",
}


@dataclass
class SynthesizedData:
    """The question splits, patching pairs, training conversations and opinion prompts."""

    splits: dict[str, datasets.Dataset]
    pairs: PatchingPairs
    training: list[dict]
    opinion: list[dict]
    protocol: str

    def save(self, data_dir: str | Path, *, provenance: dict | None = None) -> dict[str, Path]:
        """Write every file of the run-directory contract under ``data_dir`` (atomically);
        ``provenance`` (:func:`spt_utils.io.provenance`) goes with the pairs and
        ``synthesis.json``."""
        data_dir = Path(data_dir)
        paths = {name: data_dir / DATA_FILES[name] for name in SPLITS}
        for name in SPLITS:
            save_questions(paths[name], self.splits[name])
        paths |= {
            "pairs": data_dir / "pairs.pt",
            "training": data_dir / "train.jsonl",
            "opinion": data_dir / "opinion_eval.jsonl",
            "synthesis": data_dir / SYNTHESIS_FILE,
        }
        write_json(paths["synthesis"], {"protocol": self.protocol, "provenance": provenance})
        self.pairs.save(paths["pairs"], provenance=provenance)
        write_jsonl(paths["training"], self.training)
        write_jsonl(paths["opinion"], self.opinion)
        return paths


def synthesize(
    questions: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    sizes: Sizes,
    n_train: int,
    seed: int,
    answers: FirstAnswers,
    protocol: str,
    opinion_sentences: Sequence[dict] | None = None,
    n_arithmetic: int = 50,
    wording: str = "paper",
    explain: Callable[[dict], str] | None = None,
    progress: bool = False,
) -> SynthesizedData:
    """Split ``questions`` by what the model knows (``answers``: its own graded first
    answers) and build every dataset from the splits, deterministically."""
    missing = set(SPLITS) - set(sizes)
    if missing:
        raise DataError(f"sizes: missing split(s) {sorted(missing)}")
    unanswered = [q for q in questions["id"] if q not in answers]
    if unanswered:
        raise DataError(f"answers: no first answer for {len(unanswered)} questions, e.g. "
                        f"{unanswered[:3]}")
    known = [ident for ident, answer in answers.items() if answer["correct"]]
    splits = split_questions(questions, sizes, seed=seed, known=known)
    sentences = opinion_sentences if opinion_sentences is not None else load_opinion_sentences()
    return SynthesizedData(
        splits=splits,
        pairs=build_patching_pairs(splits["patching"], tokenizer, answers=answers,
                                   protocol=protocol, wording=wording),
        training=build_training_data(
            splits["train"], n_train, seed=seed, answers=answers, protocol=protocol,
            explain=explain, progress=progress,
        ),
        opinion=opinion_prompts(sentences, seed=seed) + arithmetic_claims(n_arithmetic, seed=seed),
        protocol=protocol,
    )
