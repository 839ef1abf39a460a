"""The challenge → apology metric and the head-finding methods (path, activation, attribution
and knockout-attribution patching, greedy knockout and their rank fusion).

Convention for the calibrated metric: **reference = 0, counterfactual = 1**. The reference run
is the challenge ("I don't think that's right…"), the counterfactual the agreement ("I do
think…"). A patch or ablation scoring 1 fully removes the challenge's push toward apologising;
0.5 is the midpoint.

The submodules, lowest first:

* :mod:`~spt_utils.patching.metrics`: the answer logit difference, its calibration and the
  paper's ratio metric;
* :mod:`~spt_utils.patching.answer_tokens`: the answer tokens, from the model's own replies;
* :mod:`~spt_utils.patching.heads`: head selections and their files, :class:`HeadScores`
  and the top-k ranking;
* :mod:`~spt_utils.patching.hooks`: hook names and functions, the generic patching loop and
  the cached clean runs;
* one file per head-finding method: :mod:`~spt_utils.patching.path` (with its per-sender
  oracle and the receivers), :mod:`~spt_utils.patching.activation`,
  :mod:`~spt_utils.patching.attribution`, :mod:`~spt_utils.patching.knockout_attribution`,
  :mod:`~spt_utils.patching.greedy` and :mod:`~spt_utils.patching.fusion` (the default
  ranking);
* :mod:`~spt_utils.patching.sequence`: the sequence-level metric (the model's own caving
  reply against its own keeping reply, teacher-forced) beside the first-token one, as
  :class:`MetricRuns`; :mod:`~spt_utils.patching.integrated`: integrated-gradients
  attribution (EAP-IG style) and the greedy search under interchange;
* :mod:`~spt_utils.patching.registry`: :data:`FINDERS`, every head-finding method by name
  with a ``[layer, head]`` score each (notebook 02, ``benchmarks/bench_recovery.py``).
"""

from spt_utils.patching.activation import activation_patch_heads
from spt_utils.patching.answer_tokens import (
    AnswerTokens,
    answer_tokens_from_replies,
    reply_openings,
)
from spt_utils.patching.attribution import attribution_patch_heads
from spt_utils.patching.fusion import combined_head_scores
from spt_utils.patching.greedy import GreedyKnockout, greedy_knockout_heads
from spt_utils.patching.heads import (
    SIGNS,
    Head,
    HeadScores,
    HeadUncertainty,
    load_heads,
    save_heads,
    top_heads,
    validate_heads,
)
from spt_utils.patching.hooks import Hooks, cache_before_unembed, check_pairs, z_name
from spt_utils.patching.hooks import _store_hook as _store_hook  # used by spt_utils.opinion
from spt_utils.patching.integrated import (
    greedy_interchange_heads,
    integrated_gradients_heads,
    interchanged_effect,
)
from spt_utils.patching.knockout_attribution import _zero_hooks as _zero_hooks  # used by the tests
from spt_utils.patching.knockout_attribution import knockout_attribution_heads
from spt_utils.patching.metrics import (
    RATIO_EPSILON,
    Calibration,
    answer_logit_diff,
    apology_ratio,
    calibrate,
    calibrate_token_sets,
    gather_last,
    last_position_logits,
    ratio_score,
)
from spt_utils.patching.path import (
    BLOCK_TOLERANCE,
    UnsupportedArchitecture,
    answer_unembed,
    check_sequential_blocks,
    path_patch_heads,
    path_patch_heads_oracle,
    path_patch_receivers,
)
from spt_utils.patching.path import _block_hook_names as _block_hook_names  # used by the tests
from spt_utils.patching.registry import FINDERS, METRICS, Finder, Found, metric_runs
from spt_utils.patching.sequence import (
    MetricRuns,
    ReplyPairs,
    calibrate_runs,
    first_token_runs,
    reply_log_odds,
    reply_pairs,
    run_side,
    sequence_runs,
    with_replies,
)

__all__ = [
    "BLOCK_TOLERANCE",
    "FINDERS",
    "METRICS",
    "RATIO_EPSILON",
    "SIGNS",
    "AnswerTokens",
    "Calibration",
    "Finder",
    "Found",
    "GreedyKnockout",
    "Head",
    "HeadScores",
    "HeadUncertainty",
    "Hooks",
    "MetricRuns",
    "ReplyPairs",
    "UnsupportedArchitecture",
    "activation_patch_heads",
    "answer_logit_diff",
    "answer_tokens_from_replies",
    "answer_unembed",
    "apology_ratio",
    "attribution_patch_heads",
    "cache_before_unembed",
    "calibrate",
    "calibrate_runs",
    "calibrate_token_sets",
    "check_pairs",
    "check_sequential_blocks",
    "combined_head_scores",
    "first_token_runs",
    "gather_last",
    "greedy_interchange_heads",
    "greedy_knockout_heads",
    "integrated_gradients_heads",
    "interchanged_effect",
    "knockout_attribution_heads",
    "last_position_logits",
    "load_heads",
    "metric_runs",
    "path_patch_heads",
    "path_patch_heads_oracle",
    "path_patch_receivers",
    "ratio_score",
    "reply_log_odds",
    "reply_openings",
    "reply_pairs",
    "run_side",
    "save_heads",
    "sequence_runs",
    "top_heads",
    "validate_heads",
    "with_replies",
    "z_name",
]
