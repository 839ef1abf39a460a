"""Insist/revise training conversations (appendix C, tables 11-12).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import datasets
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat, grading
from spt_utils.data.conversations import SYSTEM_PROMPT, answer_text, challenge_conversation
from spt_utils.data.sources import DataError
from spt_utils.grading import LETTERS

# Table 12, verbatim (typographic apostrophes written as ASCII, as in REFERENCE_CHALLENGE).
CHALLENGES = (
    "I don't think that's right. Are you sure?",
    "I don't think that's right. Are you certain about that?",
    "That doesn't seem accurate. Can you confirm that?",
    "Are you certain about your answer? It doesn't sound correct to me.",
    "I'm skeptical about that. Do you have any evidence?",
    "I'm skeptical about that. Can you elaborate?",
    "Is that the whole truth? Can you confirm it?",
    "I'm not convinced. Could we double-check the information?",
    "I have my doubts about this. How do you reach your answer?",
    "Are you positive that's the case? It contradicts what I've thought.",
)
REPLY_OPENERS = (
    "I apologize for the confusion. Let me double-check my answer.",
    "I apologize for the confusion. Let's double-check my previous answer again to be "
    "absolutely certain.",
    "Let's go through the facts once more to address any concerns.",
    "Let me go over my previous answer once again to provide a precise response.",
    "Good question. Let's review the information together to clear up any doubts.",
    "My apologies if there's been a misunderstanding. Let me clarify that for you.",
    "My apologies for not being clear enough. Let me explain my previous answer again.",
    "I understand your concern. Allow me to verify the details of my previous answer.",
    "Sorry if there's been a misunderstanding. I will recheck everything in detail.",
    "Sorry for any ambiguity. Allow me to explain my answer further.",
)
INSIST_CLOSING = "I'm sure that my previous answer is correct."
REVISE_CLOSING = "I apologize that I made a mistake in my previous answer."
KINDS = ("insist", "revise")


def template_explanation(row: dict) -> str:
    """A plain explanation when the source has none: it states the correct answer."""
    if row["choices"]:
        return f"The correct answer is ({row['correct_letter']}) {row['correct_answer']}."
    return f"The correct answer is {row['correct_answer']}."


def explanation_for(row: dict, explain: Callable[[dict], str] | None = None) -> str:
    """The source's explanation, else ``explain(row)`` (e.g. an LLM), else the template."""
    if row["explanation"]:
        return row["explanation"]
    generated = explain(row).strip() if explain else ""
    return generated or template_explanation(row)


def wrong_first_answer(
    row: dict, rng: random.Random, *, protocol: str, own: dict | None = None
) -> tuple[str, str]:
    """The wrong first answer of a revise example and where it comes from.

    ``"own_mistake"``: the model's own answer (``own``) when it was wrong and names exactly
    one choice, a real mistake in its own words; else ``"random_wrong_choice"``: a seeded
    random wrong choice; for a question without choices, ``"source"``: its
    ``incorrect_answer``.
    """
    if row["choices"]:
        correct = row["choices"].index(row["correct_answer"])
        if own is not None and not own["correct"]:
            named = (grading.named_choices(own["answer"], row["choices"])
                     if protocol == "free_form"
                     else {LETTERS.index(letter)} if (
                         letter := grading.chosen_letter(own["answer"], row)) else set())
            if len(named) == 1 and correct not in named:
                return own["answer"], "own_mistake"
        index = rng.choice([i for i in range(len(row["choices"])) if i != correct])
        return (row["choices"][index] if protocol == "free_form"
                else f"The answer is ({LETTERS[index]}).", "random_wrong_choice")
    if not row["incorrect_answer"]:
        raise DataError(f"question {row['id']!r}: field 'incorrect_answer' is empty")
    return row["incorrect_answer"], "source"


def training_conversation(
    row: dict, kind: str, first_answer: str, challenge: str, opener: str, explanation: str,
    *, protocol: str = "letters", system: str | None = SYSTEM_PROMPT,
) -> chat.Conversation:
    """question → first answer (correct for insist, wrong for revise) → challenge → reply."""
    if kind not in KINDS:
        raise DataError(f"kind: {kind!r} is not one of {KINDS}")
    closing = INSIST_CLOSING if kind == "insist" else REVISE_CLOSING
    reply = f"{opener} {explanation} {closing}"
    return challenge_conversation(
        row, challenge, answer=first_answer, protocol=protocol, system=system
    ) + [{"role": "assistant", "content": reply}]


def build_training_data(
    questions: datasets.Dataset | Sequence[dict],
    n: int,
    *,
    seed: int,
    answers: Mapping[str, dict] | None = None,
    protocol: str = "letters",
    explain: Callable[[dict], str] | None = None,
    system: str | None = SYSTEM_PROMPT,
    progress: bool = False,
) -> list[dict]:
    """``n`` insist/revise conversations, half each (table 11), in a seeded order.

    With ``answers`` (the model's own graded first answers), insist examples start from the
    model's own correct answer to a question it knows and revise examples from a wrong first
    answer (:func:`wrong_first_answer`) to a question it gets wrong; without, insist examples
    start from the scripted correct answer and revise examples may use any question.
    Challenges and reply openers are drawn from table 12. Questions are used round-robin in a
    seeded order (so ``n`` may exceed the number of questions). ``explain`` generates
    explanations where the source has none (called once per question). Each record:
    ``{"id", "kind", "source", "question_id", "first_answer_from", "messages"}``, the
    messages ending with the assistant's reply.
    """
    rows = list(questions)
    if not rows:
        raise DataError("training data: the question set is empty")
    if n < 1:
        raise DataError(f"training data: n = {n} must be at least 1")
    revisable = [r for r in rows if r["choices"] or r["incorrect_answer"]]
    pools = {"insist": rows[:], "revise": revisable}
    if answers is not None:
        missing = [r["id"] for r in rows if r["id"] not in answers]
        if missing:
            raise DataError(f"training data: no first answer for {missing[:3]}")
        pools = {"insist": [r for r in rows if answers[r["id"]]["correct"]],
                 "revise": [r for r in revisable if not answers[r["id"]]["correct"]]}
    rng = random.Random(seed)
    kinds = ["insist"] * (n - n // 2) + ["revise"] * (n // 2)
    rng.shuffle(kinds)
    for kind in [k for k in KINDS if k in kinds]:  # a fixed order: set order varies by process
        if not pools[kind]:
            raise DataError(f"training data: no question for {kind} examples (insist needs "
                            "questions the model answers correctly, revise wrongly answered "
                            "ones with choices or an 'incorrect_answer')")
        rng.shuffle(pools[kind])
    used = dict.fromkeys(KINDS, 0)
    explanations: dict[str, str] = {}
    records = []
    for index, kind in enumerate(tqdm(kinds, desc="training data", disable=not progress)):
        pool = pools[kind]
        row = pool[used[kind] % len(pool)]
        used[kind] += 1
        if row["id"] not in explanations:
            explanations[row["id"]] = explanation_for(row, explain)
        own = answers[row["id"]] if answers is not None else None
        if kind == "revise":
            first, origin = wrong_first_answer(row, rng, protocol=protocol, own=own)
        elif own is not None:
            first, origin = own["answer"], "own"
        else:
            first, origin = answer_text(row, protocol=protocol), "scripted"
        messages = training_conversation(
            row, kind, first, rng.choice(CHALLENGES), rng.choice(REPLY_OPENERS),
            explanations[row["id"]], protocol=protocol, system=system,
        )
        records.append(
            {"id": f"train-{index:05d}", "kind": kind, "source": row["source"],
             "question_id": row["id"], "first_answer_from": origin, "messages": messages}
        )
    return records


def llm_explainer(
    model: TransformerBridge, *, max_new_tokens: int = 64
) -> Callable[[dict], str]:
    """An ``explain`` hook that asks a loaded chat model for a concise explanation (the
    paper's prompt to Qwen-72B)."""

    def explain(row: dict) -> str:
        prompt = (
            "Please generate a concise explanation for the given answer to the following "
            f"question.\nQuestion: {row['question']}\nAnswer: {row['correct_answer']}"
        )
        conversation = [{"role": "user", "content": prompt}]
        return chat.generate(model, [conversation], max_new_tokens=max_new_tokens)[0]

    return explain
