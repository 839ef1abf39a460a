"""The sequence-level metric, integrated gradients, the greedy search under interchange and
denoising (spt_utils.patching.sequence / .integrated / the registry), on the tiny model."""

from __future__ import annotations

import pytest
import torch

from spt_utils import ablation, chat, data, patching
from spt_utils.data import DataError

CAVING = "I'm sorry, I made a mistake. The answer is"
KEEPING = "Yes, I'm sure."


@pytest.fixture(scope="module")
def matched_pairs(tiny_model):
    questions = data.load_starter().select(range(3))
    return data.build_patching_pairs(questions, tiny_model.tokenizer, wording="matched")


@pytest.fixture(scope="module")
def replies(tiny_model, matched_pairs):
    """Given replies that differ (the random model's own greedy ones are alike)."""
    tokenizer = tiny_model.tokenizer
    caving = [chat.encode(tokenizer, CAVING + " x" * i) for i in range(len(matched_pairs))]
    keeping = [chat.encode(tokenizer, KEEPING) for _ in range(len(matched_pairs))]
    return patching.with_replies(tokenizer, matched_pairs, caving, keeping)


def log_probability(model, ids: torch.Tensor, n_reply: int) -> float:
    """The last ``n_reply`` tokens' log-probability, from one unpadded forward pass."""
    with torch.no_grad():
        log_probs = model(ids[None], return_type="logits")[0].log_softmax(-1)
    start = len(ids) - n_reply
    return sum(log_probs[position - 1, ids[position]].item()
               for position in range(start, len(ids)))


def test_the_sequence_metric_is_each_sides_log_odds_of_the_two_replies(tiny_model, replies,
                                                                      matched_pairs):
    calibration = patching.calibrate_runs(tiny_model, patching.sequence_runs(replies))
    tokenizer = tiny_model.tokenizer
    for index in range(len(matched_pairs)):
        caving = chat.encode(tokenizer, CAVING + " x" * index)
        keeping = chat.encode(tokenizer, KEEPING)
        for side, expected in (("reference", calibration.reference_pairs[index]),
                               ("counterfactual", calibration.counterfactual_pairs[index])):
            prompt = getattr(matched_pairs, side)[index][
                : int(getattr(matched_pairs, f"{side}_last")[index]) + 1]
            odds = (log_probability(tiny_model, torch.cat([prompt, caving]), len(caving))
                    - log_probability(tiny_model, torch.cat([prompt, keeping]), len(keeping)))
            assert expected == pytest.approx(odds, abs=2e-4), (index, side)


def test_the_first_token_runs_read_the_answer_logit_difference(tiny_model, matched_pairs):
    runs = patching.calibrate_runs(tiny_model, patching.first_token_runs(matched_pairs))
    expected = patching.calibrate(tiny_model, matched_pairs)
    torch.testing.assert_close(torch.tensor(runs.reference_pairs),
                               torch.tensor(expected.reference_pairs), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(runs.counterfactual_pairs),
                               torch.tensor(expected.counterfactual_pairs), atol=1e-4, rtol=0)


def test_reply_pairs_append_the_models_own_greedy_replies(tiny_model, matched_pairs):
    own = patching.reply_pairs(tiny_model, matched_pairs, n_tokens=3)
    prompt = matched_pairs.reference[0][: int(matched_pairs.reference_last[0]) + 1]
    ids = prompt
    with torch.no_grad():
        for _ in range(3):  # greedy, one token at a time, no cache
            next_id = tiny_model(ids[None], return_type="logits")[0, -1].argmax()
            ids = torch.cat([ids, next_id[None].cpu()])
            if next_id == tiny_model.tokenizer.eos_token_id:
                break
    assert own.caving[0] == tiny_model.tokenizer.decode(ids[len(prompt):])
    assert own.scored[0].sum() == len(ids) - len(prompt)


def test_bad_replies_are_clear_errors(tiny_model, matched_pairs, tiny_pairs_unequal):
    tokenizer = tiny_model.tokenizer
    one = [chat.encode(tokenizer, KEEPING)]
    with pytest.raises(ValueError, match="1 caving and 1 keeping replies for 3 pairs"):
        patching.with_replies(tokenizer, matched_pairs, one, one)
    empty = [torch.tensor([], dtype=torch.long)] * 3
    with pytest.raises(ValueError, match="is empty"):
        patching.with_replies(tokenizer, matched_pairs, one * 3, empty)
    with pytest.raises(DataError, match="equal-length pairs"):
        patching.reply_pairs(tiny_model, tiny_pairs_unequal)
    with pytest.raises(ValueError, match="n_tokens must be >= 1"):
        patching.reply_pairs(tiny_model, matched_pairs, n_tokens=0)
    with pytest.raises(ValueError, match="'logits' is not one of"):
        patching.metric_runs(tiny_model, matched_pairs, {}, "logits")


@pytest.fixture(scope="module")
def tiny_pairs_unequal(tiny_model):
    return data.build_patching_pairs(data.load_starter().select(range(2)), tiny_model.tokenizer)


@pytest.mark.parametrize("metric", ["sequence", "first_token"])
def test_interchanged_effect_equals_the_interchange_knockout(tiny_model, replies,
                                                           matched_pairs, metric):
    """Two implementations: z copied from the counterfactual rows' cache here, twin rows
    appended to each batch by the knockout."""
    runs = patching.sequence_runs(replies) if metric == "sequence" else \
        patching.first_token_runs(matched_pairs)
    heads = [(0, 1), (1, 2)]
    interchange = ablation.Interchange.from_challenges(tiny_model.tokenizer)
    with torch.no_grad():
        counterfactual = patching.run_side(tiny_model, runs, "counterfactual")
        with ablation.knockout(tiny_model, heads, "interchange", interchange=interchange):
            reference = patching.run_side(tiny_model, runs, "reference")
    expected = (reference - counterfactual).mean().item()
    assert patching.interchanged_effect(tiny_model, runs, heads) == pytest.approx(
        expected, abs=1e-4)


@pytest.mark.parametrize("metric", ["sequence", "first_token"])
def test_integrated_gradients_approach_the_exact_interchange_of_each_head(
        tiny_model, replies, matched_pairs, metric):
    runs = patching.sequence_runs(replies) if metric == "sequence" else \
        patching.first_token_runs(matched_pairs)
    calibration = patching.calibrate_runs(tiny_model, runs)
    effect = calibration.reference - calibration.counterfactual
    estimate = patching.integrated_gradients_heads(tiny_model, runs, steps=16, batch_size=2)
    assert estimate.score.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    exact = torch.tensor([[1 - patching.interchanged_effect(tiny_model, runs, [(layer, head)])
                           / effect for head in range(tiny_model.cfg.n_heads)]
                          for layer in range(tiny_model.cfg.n_layers)])
    spread = exact.abs().max().item()
    torch.testing.assert_close(estimate.score, exact.float(), atol=0.02 * spread, rtol=0)


def test_integrated_gradients_leave_interchanged_heads_out(tiny_model, matched_pairs):
    runs = patching.first_token_runs(matched_pairs)
    chosen = [(1, 3)]
    scores = patching.integrated_gradients_heads(tiny_model, runs, steps=2, interchanged=chosen)
    assert scores.score[1, 3] == 0
    effect = patching.interchanged_effect(tiny_model, runs, chosen)
    assert scores.calibration.reference - scores.calibration.counterfactual == pytest.approx(
        effect, abs=1e-4)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        patching.integrated_gradients_heads(tiny_model, runs, steps=0)


def test_greedy_interchange_adds_the_best_head_and_measures_what_remains(tiny_model,
                                                                        matched_pairs):
    runs = patching.first_token_runs(matched_pairs)
    greedy = patching.greedy_interchange_heads(tiny_model, runs, 2, steps=2)
    first = patching.integrated_gradients_heads(tiny_model, runs, steps=2).score
    assert greedy.heads[0] == divmod(int(first.flatten().argmax()), tiny_model.cfg.n_heads)
    second = patching.integrated_gradients_heads(tiny_model, runs, steps=2,
                                                 interchanged=greedy.heads[:1]).score
    second[greedy.heads[0]] = -torch.inf
    assert greedy.heads[1] == divmod(int(second.flatten().argmax()), tiny_model.cfg.n_heads)
    calibration = patching.calibrate_runs(tiny_model, runs)
    clean = calibration.reference - calibration.counterfactual
    for count, left in enumerate(greedy.remaining, start=1):
        assert left == pytest.approx(
            patching.interchanged_effect(tiny_model, runs, greedy.heads[:count]) / clean,
            abs=1e-4)
    with pytest.raises(ValueError, match="k = 8 is not between 1 and 7"):
        patching.greedy_interchange_heads(tiny_model, runs, 8)


@pytest.mark.parametrize(("finder", "side"), [("denoising", "counterfactual"),
                                             ("noising", "reference")])
def test_denoising_and_noising_are_each_heads_interchange_alone(tiny_model, matched_pairs,
                                                                finder, side):
    """Denoising: each head's z from the doubting twin in the counterfactual run (the
    knockout's reversed interchange), the share of the effect it restores; noising: from the
    counterfactual twin in the doubting run, the share it removes. Measured on the first
    token, both calibrated 0 doubting, 1 counterfactual."""
    score = patching.FINDERS[finder].score(tiny_model, matched_pairs)
    calibration = patching.calibrate(tiny_model, matched_pairs)
    interchange = ablation.Interchange.from_challenges(tiny_model.tokenizer)
    if side == "counterfactual":
        interchange = interchange.reversed()
    runs = patching.first_token_runs(matched_pairs)
    for layer, head in [(0, 0), (1, 2)]:
        with torch.no_grad(), ablation.knockout(tiny_model, [(layer, head)], "interchange",
                                                interchange=interchange):
            patched = patching.run_side(tiny_model, runs, side).mean().item()
        moved = calibration.normalise(patched)  # 0 doubting, 1 counterfactual
        expected = 1 - moved if side == "counterfactual" else moved
        assert score[layer, head].item() == pytest.approx(expected, abs=1e-3)


def test_noising_refuses_unmatched_pairs(tiny_model, tiny_pairs_unequal):
    with pytest.raises(ValueError, match="position='all'"):
        patching.FINDERS["noising"].score(tiny_model, tiny_pairs_unequal)


def test_swapped_pairs_exchange_the_sides(tiny_pairs_unequal):
    swapped = tiny_pairs_unequal.swapped()
    assert torch.equal(swapped.reference, tiny_pairs_unequal.counterfactual)
    assert torch.equal(swapped.counterfactual_last, tiny_pairs_unequal.reference_last)
    assert swapped.reference_text == tiny_pairs_unequal.counterfactual_text
    assert torch.equal(swapped.swapped().reference, tiny_pairs_unequal.reference)


def test_the_matched_pair_finders_share_one_set_of_replies(tiny_model, matched_pairs,
                                                           replies):
    """The sequence metric's replies in ``found`` are read, not generated again, by every
    method that uses them (the random model's own replies are alike: no effect)."""
    found: patching.Found = {"replies": replies}
    score = patching.FINDERS["greedy_interchange"].score(tiny_model, matched_pairs, found,
                                                         k=1, steps=1)
    assert found["replies"] is replies
    runs = patching.sequence_runs(replies)
    expected = patching.integrated_gradients_heads(tiny_model, runs, steps=8).score
    assert torch.equal(found["integrated_gradients"].score, expected)
    head = found["greedy_interchange"].heads[0]
    assert score[head] > score.flatten().sort().values[-2] - 1e-9
