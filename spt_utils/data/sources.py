"""Question sources in one schema (:data:`FEATURES`): the offline starter bank, the hub
sources of the paper's training mix (MMLU, AQuA, MATH, TriviaQA) and SycophancyEval files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from spt_utils.grading import LETTERS, normalise

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "correct_letter": datasets.Value("string"),  # "" for free-form questions
        "correct_answer": datasets.Value("string"),
        "incorrect_answer": datasets.Value("string"),
        "explanation": datasets.Value("string"),  # "" when the source has none
        "aliases": datasets.Sequence(datasets.Value("string")),  # other texts of the answer
        "category": datasets.Value("string"),  # "" when the source has none
    }
)


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


def resource(name: str) -> Path:
    return Path(str(resources.files("spt_utils") / "resources" / name))


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict]:
    """Read a JSON-lines file; errors name the file, line and missing field."""
    return [record for _, record in numbered_jsonl(path, required)]


def numbered_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a JSON-lines file; blank lines are skipped."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            for key in required:
                if key not in record:
                    raise DataError(f"{path}:{number}: missing field {key!r}")
            records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records (empty source)")
    return records


def check_unique_ids(
    rows: Sequence[dict], where: str, numbers: Sequence[int] | None = None
) -> None:
    """A duplicate id is an error naming ``where``:line (``numbers``: each row's line in the
    file; default: its position)."""
    seen: dict[str, int] = {}
    for number, row in zip(numbers or range(1, len(rows) + 1), rows, strict=True):
        if row["id"] in seen:
            raise DataError(
                f"{where}:{number}: field 'id': duplicate id {row['id']!r} "
                f"(first at line {seen[row['id']]})"
            )
        seen[row["id"]] = number


def load_starter(path: Path | None = None) -> datasets.Dataset:
    """The offline starter bank of easy multiple-choice questions shipped in the package.

    Optional fields: ``explanation``, ``category`` and ``aliases`` (other texts of the correct
    answer, e.g. "eight" for "8", for free-form grading; none may name another choice).
    """
    path = path or resource("starter_questions.jsonl")
    rows, numbers = [], []
    for number, record in numbered_jsonl(path, ("id", "question", "choices", "answer")):
        where = f"{path}:{number}"
        choices, letter = record["choices"], record["answer"]
        if letter not in LETTERS[: len(choices)]:
            raise DataError(f"{where}: field 'answer': {letter!r} is not a choice letter")
        texts = [normalise(c) for c in choices]
        if not all(texts) or len(set(texts)) != len(texts):
            raise DataError(f"{where}: field 'choices': {choices!r} are not distinct texts "
                            "(compared without case and punctuation)")
        aliases = record.get("aliases", [])
        if check_aliases(aliases, where, "aliases") != aliases:
            raise DataError(f"{where}: field 'aliases': an alias holds no word ({aliases!r})")
        correct = LETTERS.index(letter)
        for alias in aliases:
            if normalise(alias) in texts[:correct] + texts[correct + 1 :]:
                raise DataError(f"{where}: field 'aliases': {alias!r} names another choice")
        category = record.get("category", "")
        if not isinstance(category, str):
            raise DataError(f"{where}: field 'category': expected a string")
        rows.append(_mc_row(record["id"], "starter", record["question"], choices, correct,
                            record.get("explanation", ""), aliases, category))
        numbers.append(number)
    check_unique_ids(rows, str(path), numbers)
    return datasets.Dataset.from_list(rows, features=FEATURES)



# --- Hub question sources --------------------------------------------------------------------

OFFLINE_HINT = (
    "The Hugging Face hub may be unreachable (offline?). Use source='starter' "
    "(data.load_starter()), the question bank that ships with the package."
)
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])\s*\)\s*")


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    return record[key]


def check_aliases(aliases: Any, where: str, field: str) -> list[str]:
    """The aliases that hold a word (others could never be named), from a list of strings;
    anything else is an error naming the field."""
    if not isinstance(aliases, list) or not all(isinstance(alias, str) for alias in aliases):
        raise DataError(f"{where}: field {field!r}: expected a list of strings, got {aliases!r}")
    return [alias for alias in aliases if normalise(alias)]


def free_form_answer(answer: Any, where: str, field: str) -> str:
    """The correct text of a question without choices; an error when it holds no word."""
    if not isinstance(answer, str) or not normalise(answer):
        raise DataError(f"{where}: field {field!r}: {answer!r} is no correct text; a free-form "
                        "question needs one")
    return answer


def _other_choice(choices: Sequence[str], correct: int) -> str:
    """The distractor used as the wrong first answer: the next choice, cyclically."""
    return choices[(correct + 1) % len(choices)]


def _mc_row(ident: str, source: str, question: str, choices: list[str], correct: int,
            explanation: str = "", aliases: Sequence[str] = (), category: str = "") -> dict:
    return {
        "id": ident, "source": source, "question": question, "choices": choices,
        "correct_letter": LETTERS[correct], "correct_answer": choices[correct],
        "incorrect_answer": _other_choice(choices, correct), "explanation": explanation,
        "aliases": list(aliases), "category": category,
    }


def mmlu_row(record: dict, index: int, where: str = "mmlu") -> dict:
    """A ``cais/mmlu`` row (question, subject, choices, answer index) in the FEATURES schema.

    The ``auxiliary_train`` config nests each row under a ``train`` key; both layouts work.
    """
    if isinstance(record.get("train"), dict):
        record = record["train"]
    choices = list(_field(record, "choices", where))
    answer = _field(record, "answer", where)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: field 'answer': {answer!r} is not a choice index")
    return _mc_row(f"mmlu-{index:06d}", "mmlu", _field(record, "question", where), choices,
                   answer, category=record.get("subject") or "")


def aqua_row(record: dict, index: int, where: str = "aqua") -> dict:
    """An AQuA-RAT row (question, options ["A)…"], rationale, correct) in the FEATURES schema."""
    options = list(_field(record, "options", where))
    choices = [_OPTION_PREFIX.sub("", option, count=1) for option in options]
    letter = _field(record, "correct", where)
    if letter not in LETTERS[: len(choices)]:
        raise DataError(f"{where}: field 'correct': {letter!r} is not a choice letter")
    return _mc_row(
        f"aqua-{index:06d}", "aqua", _field(record, "question", where), choices,
        LETTERS.index(letter), _field(record, "rationale", where).strip(),
    )


def last_boxed(solution: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in a MATH solution."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", solution)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for position in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[position], 0)
        if depth == 0:
            return solution[start:position].strip()
    return None


def perturbed_answer(answer: str) -> str:
    """A wrong but plausible free-form answer: the answer's last integer plus one.

    Returns "" when the answer holds no number (an LLM can supply one instead).
    """
    numbers = list(re.finditer(r"\d+", answer))
    if not numbers:
        return ""
    last = numbers[-1]
    return f"{answer[: last.start()]}{int(last.group()) + 1}{answer[last.end():]}"


def math_row(record: dict, index: int, where: str = "math") -> dict:
    """A MATH row (problem, level, type, solution with ``\\boxed{}``) in the FEATURES schema."""
    solution = _field(record, "solution", where)
    answer = last_boxed(solution)
    if answer is None:
        raise DataError(f"{where}: field 'solution': no \\boxed{{…}} answer")
    free_form_answer(answer, where, "solution")
    return {
        "id": f"math-{index:06d}", "source": "math", "question": _field(record, "problem", where),
        "choices": [], "correct_letter": "", "correct_answer": answer,
        "incorrect_answer": perturbed_answer(answer), "explanation": solution.strip(),
        "aliases": [], "category": record.get("type") or "",
    }


def trivia_qa_row(record: dict, index: int, where: str = "trivia_qa") -> dict:
    """A TriviaQA row (question, question_id, answer{value, aliases, …}) in the schema.

    TriviaQA has no wrong answers; ``incorrect_answer`` stays "" (revise examples skip it).
    ``answer.aliases`` become the row's ``aliases``.
    """
    answer = _field(record, "answer", where)
    if not isinstance(answer, dict) or not answer.get("value"):
        raise DataError(f"{where}: field 'answer.value' is missing")
    return {
        "id": f"trivia_qa-{_field(record, 'question_id', where)}", "source": "trivia_qa",
        "question": _field(record, "question", where), "choices": [], "correct_letter": "",
        "correct_answer": free_form_answer(answer["value"], where, "answer.value"),
        "incorrect_answer": "", "explanation": "",
        "aliases": check_aliases(answer.get("aliases", []), where, "answer.aliases"),
        "category": "",
    }


@dataclass(frozen=True)
class HubSource:
    """Where a hub dataset lives and how its rows map to FEATURES."""

    path: str
    config: str | None
    split: str
    row: Callable[[dict, int, str], dict]


HUB_SOURCES: dict[str, HubSource] = {
    "mmlu": HubSource("cais/mmlu", "auxiliary_train", "train", mmlu_row),
    "aqua": HubSource("aqua_rat", "raw", "train", aqua_row),
    "math": HubSource("hendrycks/competition_math", None, "train", math_row),
    "trivia_qa": HubSource("trivia_qa", "rc.nocontext", "train", trivia_qa_row),
}
SOURCES = ("starter", *HUB_SOURCES)


def map_rows(
    records: Iterable[dict], row: Callable[[dict, int, str], dict], where: str
) -> datasets.Dataset:
    """Map raw source records to a FEATURES dataset; errors name ``where``, the row and field."""
    rows = [row(dict(record), index, f"{where}:{index + 1}") for index, record in
            enumerate(records)]
    if not rows:
        raise DataError(f"{where}: no records (empty source)")
    check_unique_ids(rows, where)
    return datasets.Dataset.from_list(rows, features=FEATURES)


def load_hub(path: str, config: str | None, split: str, what: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, config, split=split)
    except (ConnectionError, OSError) as error:
        raise DataError(f"{what}: could not load {path!r} ({error}). {OFFLINE_HINT}") from error


def load_hub_source(
    name: str, *, split: str | None = None, n: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """A hub question source (``mmlu``, ``aqua``, ``math``, ``trivia_qa``) in the schema;
    ``n`` subsamples that many rows with ``seed`` before mapping."""
    if name not in HUB_SOURCES:
        raise DataError(f"source: unknown source {name!r}; choose one of {list(SOURCES)}")
    hub = HUB_SOURCES[name]
    raw = load_hub(hub.path, hub.config, split or hub.split, f"source {name!r}")
    if n is not None and n < len(raw):
        raw = raw.shuffle(seed=seed).select(range(n))
    return map_rows(raw, hub.row, f"{hub.path}[{split or hub.split}]")


def load_source(
    name: str, *, n: int | None = None, seed: int = 0, **kwargs: Any
) -> datasets.Dataset:
    """Any question source by name: ``starter`` (offline) or a hub source; ``n`` subsamples
    that many questions with ``seed``."""
    if name != "starter":
        return load_hub_source(name, n=n, seed=seed, **kwargs)
    questions = load_starter(**kwargs)
    if n is not None and n < len(questions):
        questions = questions.shuffle(seed=seed).select(range(n))
    return questions


# --- SycophancyEval (meg-tong/sycophancy-eval) -----------------------------------------------

SYCOPHANCY_FILES = ("are_you_sure", "answer", "feedback")
PROMPT_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "messages": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.Value("string")}
        ),
        "template": datasets.Value("string"),
        "question": datasets.Value("string"),
        "correct_answer": datasets.Value("string"),
        "incorrect_answer": datasets.Value("string"),
    }
)
_ROLES = {"human": "user", "ai": "assistant"}


def _sycophancy_messages(prompt: Any, where: str) -> list[dict]:
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt': expected a non-empty list of turns")
    messages = []
    for turn, message in enumerate(prompt):
        role = message.get("type") if isinstance(message, dict) else None
        if role not in _ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: field 'prompt[{turn}]': expected type human/ai + content")
        messages.append({"role": _ROLES[role], "content": message["content"]})
    return messages


def _are_you_sure_row(record: dict, number: int, where: str, stem: str = "are_you_sure") -> dict:
    base = _field(record, "base", where)
    dataset = _field(base, "dataset", f"{where}: base")
    question = _field(base, "question", f"{where}: base")
    ident = f"{stem}-{number:05d}"
    if "correct_letter" in base:
        choices = list(_field(base, "answers_list", f"{where}: base"))
        letter = base["correct_letter"]
        if letter not in LETTERS[: len(choices)]:
            raise DataError(f"{where}: field 'base.correct_letter': {letter!r} is not a choice")
        return _mc_row(ident, dataset, question, choices, LETTERS.index(letter))
    correct = _field(base, "correct_answer", f"{where}: base")
    aliases = base.get("answer", [])
    return {
        "id": ident, "source": dataset, "question": question, "choices": [],
        "correct_letter": "", "correct_answer": free_form_answer(correct, where,
                                                                 "base.correct_answer"),
        "incorrect_answer": base.get("incorrect_answer", ""), "explanation": "",
        "aliases": check_aliases([aliases] if isinstance(aliases, str) else aliases, where,
                                 "base.answer"),
        "category": "",
    }


def _prompt_row(record: dict, number: int, where: str, stem: str) -> dict:
    base = _field(record, "base", where)
    metadata = record.get("metadata") or {}
    template = metadata.get("prompt_template_type") or metadata.get("prompt_template", "")
    return {
        "id": f"{stem}-{number:05d}",
        "source": str(base.get("dataset", stem)),
        "messages": _sycophancy_messages(_field(record, "prompt", where), where),
        "template": template,
        "question": base.get("question", base.get("text", "")),
        "correct_answer": str(base.get("correct_answer", "")),
        "incorrect_answer": str(base.get("incorrect_answer", "")),
    }


def load_sycophancy_eval(path: str | Path) -> datasets.Dataset:
    """One SycophancyEval file from a local path.

    ``are_you_sure.jsonl`` becomes questions in the FEATURES schema (its ``dataset`` is the
    ``source``; the challenge turn is not stored in the data; a free-form row's ``base.answer``,
    the list of TriviaQA aliases, becomes its ``aliases``). ``answer.jsonl`` and
    ``feedback.jsonl`` become prompts in :data:`PROMPT_FEATURES` (the stored turns as chat
    messages, the template, and the answers where the base has them).
    """
    path = Path(path)
    stem = path.name.removesuffix(".jsonl")
    if stem not in SYCOPHANCY_FILES:
        raise DataError(f"{path}: unknown SycophancyEval file; expected one of "
                        f"{[f + '.jsonl' for f in SYCOPHANCY_FILES]}")
    numbered = numbered_jsonl(path, ("prompt", "base"))
    if stem == "are_you_sure":
        rows = []
        for number, record in numbered:
            where = f"{path}:{number}"
            _sycophancy_messages(record["prompt"], where)
            rows.append(_are_you_sure_row(record, number, where))
        return datasets.Dataset.from_list(rows, features=FEATURES)
    rows = [_prompt_row(r, n, f"{path}:{n}", stem) for n, r in numbered]
    return datasets.Dataset.from_list(rows, features=PROMPT_FEATURES)


def sycophancy_questions(path: str | Path) -> datasets.Dataset:
    """The questions of a SycophancyEval file for the "Are you sure?" protocol, in the
    FEATURES schema: ``are_you_sure.jsonl`` as :func:`load_sycophancy_eval` loads it;
    ``answer.jsonl``'s distinct questions (first occurrence; the templates that add the
    user's suggested answer are dropped), free-form, its ``base.answer`` list as aliases."""
    path = Path(path)
    stem = path.name.removesuffix(".jsonl")
    if stem == "are_you_sure":
        return load_sycophancy_eval(path)
    if stem != "answer":
        raise DataError(f"{path}: the 'Are you sure?' protocol reads are_you_sure.jsonl or "
                        "answer.jsonl")
    rows, seen = [], set()
    for number, record in numbered_jsonl(path, ("prompt", "base")):
        row = _are_you_sure_row(record, number, f"{path}:{number}", stem)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return datasets.Dataset.from_list(rows, features=FEATURES)
