"""Question sources and the "Are you sure?" conversations built from them.

Every question source is a ``datasets.Dataset`` with the columns of :data:`FEATURES`. From
questions we build path-patching pairs (reference challenge against counterfactual, table 9
of the paper), insist/revise training data (tables 11-12) and opinion-sycophancy prompts.
The submodules follow the paper's data steps:

* :mod:`~spt_utils.data.sources`: the starter bank, hub sources and SycophancyEval files;
* :mod:`~spt_utils.data.conversations`: the turns of a challenged conversation;
* :mod:`~spt_utils.data.knowledge`: which questions the model answers correctly;
* :mod:`~spt_utils.data.pairs`: path-patching pairs and their token-level view;
* :mod:`~spt_utils.data.training`: insist/revise training conversations;
* :mod:`~spt_utils.data.opinion`: opinion-sycophancy prompts;
* :mod:`~spt_utils.data.splits`: disjoint splits and the files notebook 01 writes.
"""

from spt_utils.data.conversations import (
    ANSWER_INSTRUCTION,
    ANSWER_PREFILL,
    COUNTERFACTUAL_CHALLENGE,
    MATCHED_COUNTERFACTUAL_CHALLENGE,
    REFERENCE_CHALLENGE,
    SYSTEM_PROMPT,
    answer_text,
    challenge_conversation,
    question_conversation,
    question_prompt,
)
from spt_utils.data.knowledge import ACCURACY_PROTOCOLS, CLOZE_PREFILL, first_turn_correct
from spt_utils.data.opinion import (
    OPINION_CHOICES,
    OPINION_PREFILL,
    OPINION_SOURCES,
    OPINIONS,
    arithmetic_claims,
    load_opinion_sentences,
    load_opinion_source,
    opinion_prompts,
)
from spt_utils.data.pairs import (
    APOLOGY_WORDS,
    CONFIRM_WORDS,
    PatchingPairs,
    TokenSpan,
    aligned_tokens,
    answer_token_ids,
    build_patching_pairs,
    differing_token_spans,
)
from spt_utils.data.sources import (
    FEATURES,
    HUB_SOURCES,
    OFFLINE_HINT,
    PROMPT_FEATURES,
    SOURCES,
    SYCOPHANCY_FILES,
    DataError,
    HubSource,
    aqua_row,
    last_boxed,
    load_hub_source,
    load_source,
    load_starter,
    load_sycophancy_eval,
    map_rows,
    math_row,
    mmlu_row,
    perturbed_answer,
    read_jsonl,
    resource,
    trivia_qa_row,
)
from spt_utils.data.splits import (
    DATA_FILES,
    POOL_SPLITS,
    SPLITS,
    SynthesizedData,
    load_questions,
    save_questions,
    split_questions,
    synthesize,
)
from spt_utils.data.training import (
    CHALLENGES,
    INSIST_CLOSING,
    KINDS,
    REPLY_OPENERS,
    REVISE_CLOSING,
    build_training_data,
    explanation_for,
    llm_explainer,
    template_explanation,
    training_conversation,
)
from spt_utils.grading import LETTERS

__all__ = [
    "ACCURACY_PROTOCOLS",
    "CLOZE_PREFILL",
    "first_turn_correct",
    "ANSWER_INSTRUCTION",
    "ANSWER_PREFILL",
    "APOLOGY_WORDS",
    "CHALLENGES",
    "CONFIRM_WORDS",
    "COUNTERFACTUAL_CHALLENGE",
    "DATA_FILES",
    "DataError",
    "FEATURES",
    "HUB_SOURCES",
    "HubSource",
    "INSIST_CLOSING",
    "KINDS",
    "LETTERS",
    "MATCHED_COUNTERFACTUAL_CHALLENGE",
    "OFFLINE_HINT",
    "OPINION_CHOICES",
    "OPINION_PREFILL",
    "OPINION_SOURCES",
    "OPINIONS",
    "POOL_SPLITS",
    "PROMPT_FEATURES",
    "PatchingPairs",
    "REFERENCE_CHALLENGE",
    "REPLY_OPENERS",
    "REVISE_CLOSING",
    "SOURCES",
    "SPLITS",
    "SYCOPHANCY_FILES",
    "SYSTEM_PROMPT",
    "SynthesizedData",
    "TokenSpan",
    "aligned_tokens",
    "answer_text",
    "answer_token_ids",
    "aqua_row",
    "arithmetic_claims",
    "build_patching_pairs",
    "build_training_data",
    "challenge_conversation",
    "differing_token_spans",
    "explanation_for",
    "last_boxed",
    "llm_explainer",
    "load_hub_source",
    "load_opinion_sentences",
    "load_opinion_source",
    "load_questions",
    "load_source",
    "load_starter",
    "load_sycophancy_eval",
    "map_rows",
    "math_row",
    "mmlu_row",
    "opinion_prompts",
    "perturbed_answer",
    "question_conversation",
    "question_prompt",
    "read_jsonl",
    "resource",
    "save_questions",
    "split_questions",
    "synthesize",
    "template_explanation",
    "training_conversation",
    "trivia_qa_row",
]
