"""Steering on the tiny random model: the vectors are the pairs' mean differences (a planted
direction is recovered), steering moves only the hooked component, the hooks go on exit and
after an error, alpha = 0 is the identity, the controls keep the norms and match the
chosen steering's cost (dev KL), the dev choice
follows the sweep's rule, and a steered candidate is steered in its own passes only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spt_utils import chat, data, evaluation, models, patching, steering

HEADS = [(0, 1), (1, 2), (1, 3)]


@pytest.fixture(scope="module")
def pairs(tiny_model):
    return data.build_patching_pairs(data.load_starter().select(range(6)), tiny_model.tokenizer)


def _n_hooks(model):
    points = {id(point): point for point in model.hook_dict.values()}  # aliases share points
    return sum(len(point.fwd_hooks) for point in points.values())


def _last(model, tokens, last, name):
    """Each row's value of hook ``name`` at its last position, from one full run per row."""
    rows = []
    for row in range(len(tokens)):
        _, cache = model.run_with_cache(tokens[row : row + 1, : int(last[row]) + 1],
                                        names_filter=[name])
        rows.append(cache[name][0, -1].double())
    return torch.stack(rows)


def test_the_vectors_are_the_mean_reference_minus_counterfactual(tiny_model, pairs):
    """Against run_with_cache, one unpadded prompt at a time."""
    name = steering.resid_name(1)
    expected = (_last(tiny_model, pairs.reference, pairs.reference_last, name)
                - _last(tiny_model, pairs.counterfactual, pairs.counterfactual_last, name)).mean(0)
    residual = steering.residual_steering(tiny_model, pairs, 1, batch_size=4)
    assert residual.vectors.shape == (1, tiny_model.cfg.d_model) and residual.n_pairs == len(pairs)
    torch.testing.assert_close(residual.vectors[0].double(), expected, atol=1e-5, rtol=0)
    heads = steering.head_steering(tiny_model, pairs, HEADS, batch_size=4)
    for (layer, head), vector in zip(HEADS, heads.vectors, strict=True):
        z = patching.z_name(layer)
        difference = (_last(tiny_model, pairs.reference, pairs.reference_last, z)
                      - _last(tiny_model, pairs.counterfactual, pairs.counterfactual_last, z))
        torch.testing.assert_close(vector.double(), difference.mean(0)[head], atol=1e-5, rtol=0)


def test_the_grid_reads_every_vector_in_one_pass(tiny_model, pairs, monkeypatch):
    """settings: the same vectors as each steering read off alone, from one forward pass per
    side and batch of pairs (not one per steering)."""
    calls = []
    read = steering.cache_before_unembed
    monkeypatch.setattr(steering, "cache_before_unembed",
                        lambda *args, **kwargs: calls.append(1) or read(*args, **kwargs))
    grid = steering.settings(tiny_model, pairs, heads=HEADS, layers=[0, 1],
                             head_alphas=[1.0, 2.0], residual_alphas=[4.0, 8.0, 16.0],
                             batch_size=4)
    assert len(calls) == 2 * -(-len(pairs) // 4)  # two sides × batches
    monkeypatch.setattr(steering, "cache_before_unembed", read)
    alone = [steering.head_steering(tiny_model, pairs, HEADS, batch_size=4),
             steering.residual_steering(tiny_model, pairs, 0, batch_size=4),
             steering.residual_steering(tiny_model, pairs, 1, batch_size=4)]
    assert [(s.kind, s.layer, alpha) for s, alpha in grid] == [  # each kind its own grid
        (s.kind, s.layer, alpha) for s in alone
        for alpha in ((1.0, 2.0) if s.kind == "heads" else (4.0, 8.0, 16.0))]
    firsts = [grid[0], grid[2], grid[5]]  # each steering's first alpha
    for (steered, _alpha), expected in zip(firsts, alone, strict=True):
        assert steered.heads == expected.heads
        torch.testing.assert_close(steered.vectors, expected.vectors, atol=1e-6, rtol=0)


def _marker(pairs):
    """A token in every reference prompt and in no counterfactual one (the challenge's)."""
    reference = set.intersection(*(set(row.tolist()) for row in pairs.reference))
    counterfactual = set.union(*(set(row.tolist()) for row in pairs.counterfactual))
    return sorted(reference - counterfactual)[0]


def _plant(model, pairs, name, direction, head=None):
    """Hooks adding ``direction`` at ``name`` (at ``head`` of a z hook) in every prompt that
    holds the reference's marker token, at every position."""
    marker_row = model.W_E[_marker(pairs)].detach()
    flags = {}

    def see(embed, hook):  # embed: [batch, pos, d_model]
        flags["reference"] = (embed == marker_row.to(embed)).all(-1).any(-1)
        return embed

    def add(value, hook):  # resid: [batch, pos, d_model]; z: [batch, pos, head, d_head]
        value = value.clone()
        rows = flags["reference"]
        if head is None:
            value[rows] += direction.to(value)
        else:
            value[rows, :, head] += direction.to(value)
        return value

    return [("hook_embed", see), (name, add)]


def test_a_planted_direction_is_recovered(tiny_model, pairs):
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(tiny_model.cfg.d_model, generator=generator)
    before = steering.residual_steering(tiny_model, pairs, 0).vectors[0]
    with tiny_model.hooks(fwd_hooks=_plant(tiny_model, pairs, steering.resid_name(0), direction)):
        after = steering.residual_steering(tiny_model, pairs, 0).vectors[0]
    torch.testing.assert_close(after - before, direction, atol=1e-4, rtol=0)
    direction = torch.randn(tiny_model.cfg.d_head, generator=generator)
    heads = [(0, 1), (0, 3)]  # planted at L0H1; L0H3 beside it
    before = steering.head_steering(tiny_model, pairs, heads).vectors
    with tiny_model.hooks(fwd_hooks=_plant(tiny_model, pairs, patching.z_name(0), direction,
                                           head=1)):
        after = steering.head_steering(tiny_model, pairs, heads).vectors
    torch.testing.assert_close(after[0] - before[0], direction, atol=1e-4, rtol=0)
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)


def _all_activations(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return {name: value.clone() for name, value in cache.items()}


@pytest.mark.parametrize("kind", steering.KINDS)
def test_steering_moves_only_the_hooked_component(tiny_model, pairs, kind):
    vectors = (steering.residual_steering(tiny_model, pairs, 0) if kind == "residual"
               else steering.head_steering(tiny_model, pairs, [(0, 1), (0, 3)]))
    tokens = pairs.reference[:3]
    plain = _all_activations(tiny_model, tokens)
    with steering.steer(tiny_model, vectors, 2.0):
        steered = _all_activations(tiny_model, tokens)
    hooked = steering.resid_name(0) if kind == "residual" else patching.z_name(0)
    order = list(plain)  # in the order the hooks fire; an alias names the same hook point
    names = [n for n in order if tiny_model.hook_dict[n] is tiny_model.hook_dict[hooked]]
    upstream = order[: order.index(names[0])]
    assert upstream and all(torch.equal(plain[n], steered[n]) for n in upstream)
    shift = plain[hooked] - steered[hooked]
    if kind == "residual":  # every position of every row moved by exactly 2 v
        torch.testing.assert_close(shift, (2.0 * vectors.vectors[0]).expand_as(shift),
                                   atol=1e-5, rtol=0)
    else:  # the two heads by 2 v_h, heads 0 and 2 not at all
        for index, head in enumerate((1, 3)):
            torch.testing.assert_close(shift[:, :, head],
                                       (2.0 * vectors.vectors[index]).expand_as(shift[:, :, head]),
                                       atol=1e-5, rtol=0)
        assert torch.equal(shift[:, :, [0, 2]], torch.zeros_like(shift[:, :, [0, 2]]))
    assert all(torch.equal(steered[n], steered[hooked]) for n in names)
    downstream = order[order.index(names[-1]) + 1 :]
    assert any(not torch.equal(plain[n], steered[n]) for n in downstream)


def test_alpha_zero_is_the_identity_and_hooks_go_after_an_error(tiny_model, pairs):
    vectors = steering.head_steering(tiny_model, pairs, HEADS)
    tokens = pairs.reference
    plain = tiny_model(tokens, return_type="logits")
    with steering.steer(tiny_model, vectors, 0.0):
        assert _n_hooks(tiny_model) == 0
        assert torch.equal(tiny_model(tokens, return_type="logits"), plain)
    with steering.steer(tiny_model, vectors, 1.0):
        assert _n_hooks(tiny_model) == 2  # layers 0 and 1
        assert not torch.allclose(tiny_model(tokens, return_type="logits"), plain)
    with pytest.raises(RuntimeError, match="boom"):
        with steering.steer(tiny_model, vectors, 1.0):
            raise RuntimeError("boom")
    assert _n_hooks(tiny_model) == 0 and not chat.has_bridge_hooks(tiny_model)
    assert torch.equal(tiny_model(tokens, return_type="logits"), plain)


def test_generation_inside_the_block_is_steered(tiny_model, pairs):
    conversations = [data.challenge_conversation(row, data.REFERENCE_CHALLENGE)
                     for row in data.load_starter().select(range(4))]
    vectors = steering.residual_steering(tiny_model, pairs, 1)
    plain = chat.generate(tiny_model, conversations, max_new_tokens=6)
    with steering.steer(tiny_model, vectors, 40.0):
        steered = chat.generate(tiny_model, conversations, max_new_tokens=6)
    assert steered != plain
    assert chat.generate(tiny_model, conversations, max_new_tokens=6) == plain


def test_the_controls_keep_each_norm_and_move_the_direction(tiny_model, pairs):
    heads = steering.head_steering(tiny_model, pairs, HEADS)
    others = steering.control_heads(heads, tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    assert len(others) == len(HEADS) and not set(others) & set(HEADS)
    control = steering.random_control(heads, seed=1, heads=others)
    assert control.heads == tuple(others) and control.label == "random 1"
    torch.testing.assert_close(control.norms(), heads.norms(), atol=1e-5, rtol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(control.vectors, heads.vectors, dim=-1)
    assert (cosine.abs() < 0.99).all()
    again = steering.random_control(heads, seed=1, heads=others)
    assert torch.equal(again.vectors, control.vectors)
    assert not torch.equal(steering.random_control(heads, seed=2, heads=others).vectors,
                           control.vectors)
    residual = steering.residual_steering(tiny_model, pairs, 1)
    direction = steering.random_control(residual, seed=0)
    assert direction.layer == 1 and direction.heads == ()
    torch.testing.assert_close(direction.norms(), residual.norms(), atol=1e-5, rtol=1e-5)


def test_bad_steering_input_is_a_clear_error(tiny_model, pairs):
    with pytest.raises(ValueError, match="layer 7 is not in 0..1"):
        steering.residual_steering(tiny_model, pairs, 7)
    with pytest.raises(ValueError, match="no heads to steer"):
        steering.head_steering(tiny_model, pairs, [])
    with pytest.raises(ValueError, match=r"L9H0 is out of range"):
        steering.head_steering(tiny_model, pairs, [(9, 0)])
    heads = steering.head_steering(tiny_model, pairs, HEADS)
    with pytest.raises(ValueError, match="needs 3 random heads"):
        steering.random_control(heads, heads=[(0, 0)])
    with pytest.raises(ValueError, match="takes no heads"):
        steering.random_control(steering.residual_steering(tiny_model, pairs, 0), heads=[(0, 0)])
    with pytest.raises(ValueError, match="no patching pairs"):
        steering.residual_steering(tiny_model, _empty(pairs), 0)
    t5 = models.load_model(models.TINY_T5, device="cpu")
    with pytest.raises(chat.UnsupportedModelError, match="decoder-only"):
        steering.residual_steering(t5, pairs, 0)


def _kl_by_hand(model, vectors, alpha, documents, max_tokens):
    """Mean per-token KL(base ‖ steered), one unpadded document at a time."""
    total, count = 0.0, 0
    for text in documents:
        ids = chat.encode(model.tokenizer, text)[:max_tokens][None]
        with torch.no_grad():
            base = model(ids, return_type="logits").double().log_softmax(-1)
            with steering.steer(model, vectors, alpha):
                steered = model(ids, return_type="logits").double().log_softmax(-1)
        total += float((base.exp() * (base - steered)).sum())
        count += ids.shape[1]
    return total / count


@pytest.mark.parametrize("kind", steering.KINDS)
def test_the_control_is_matched_on_cost(tiny_model, pairs, kind):
    """Issue 37: the random control's alpha makes its dev KL its steering's within the
    tolerance, both KLs recomputed by hand here; the norms stay those of the steering."""
    chosen = (steering.head_steering(tiny_model, pairs, HEADS) if kind == "heads"
              else steering.residual_steering(tiny_model, pairs, 1))
    documents = evaluation.load_kl_corpus()[:3]
    kl_base = evaluation.KLBase.build(tiny_model, documents, max_tokens=24, batch_size=2)
    grid = [(chosen, 10.0), (chosen, 30.0)]
    rows = [{**_row(10.0, 0.5), "kind": kind}, {**_row(30.0, 0.2), "kind": kind}]  # choice: 30
    result = steering.chosen_with_controls(tiny_model, grid, rows, kl_base=kl_base, seed=5,
                                           tolerance=0.05)
    (steered, alpha), (control, control_alpha) = (result[f"steer_{kind}"],
                                                  result[f"steer_{kind}_random"])
    assert steered is chosen and alpha == 30.0 and control.label == "random 5"
    target = _kl_by_hand(tiny_model, chosen, 30.0, documents, 24)
    cost = _kl_by_hand(tiny_model, control, control_alpha, documents, 24)
    assert target > 0 and abs(cost - target) <= 0.05 * target
    assert control.match["matched"] and control.match["kl"] == pytest.approx(cost, rel=1e-4)
    assert control.match["target_kl"] == pytest.approx(target, rel=1e-4)
    torch.testing.assert_close(control.norms(), chosen.norms(), atol=1e-5, rtol=1e-5)
    # a cost the start alpha misses (five times the steering's) is met by a larger alpha
    dearer, dearer_alpha = steering.cost_matched(tiny_model, control, 5 * target, kl_base,
                                                 start=30.0, tolerance=0.05)
    assert dearer_alpha > 30.0 and dearer.match["steps"] > 1
    assert abs(_kl_by_hand(tiny_model, control, dearer_alpha, documents, 24) - 5 * target) <= (
        0.05 * 5 * target)


def test_a_control_that_cannot_match_says_so(tiny_model, pairs):
    chosen = steering.residual_steering(tiny_model, pairs, 1)
    kl_base = evaluation.KLBase.build(tiny_model, evaluation.load_kl_corpus()[:2],
                                      max_tokens=16, batch_size=2)
    random = steering.random_control(chosen)
    control, alpha = steering.cost_matched(tiny_model, random, 1e9, kl_base, start=1.0,
                                           max_steps=3)
    assert not control.match["matched"] and control.match["steps"] == 3
    kls = {a: steering.dev_kl(tiny_model, random, a, kl_base) for a in (1.0, 2.0, 4.0)}
    assert alpha == max(kls, key=kls.get) and control.match["kl"] == kls[alpha]  # the closest
    capped, _ = steering.cost_matched(tiny_model, random, 1e9, kl_base, start=1.0,
                                      max_doublings=2)
    assert capped.match["steps"] == 3 and not capped.match["matched"]  # 1, 2, 4: no further
    with pytest.raises(ValueError, match="must be positive"):
        steering.cost_matched(tiny_model, chosen, 0.0, kl_base, start=1.0)
    with pytest.raises(ValueError, match="head alphas"):
        steering.settings(tiny_model, pairs, heads=HEADS, residual_alphas=[1.0])
    with pytest.raises(ValueError, match="residual alphas"):
        steering.settings(tiny_model, pairs, layers=[0], head_alphas=[1.0])


def _empty(pairs):
    return dataclasses.replace(pairs, reference=pairs.reference[:0],
                               counterfactual=pairs.counterfactual[:0],
                               reference_last=pairs.reference_last[:0],
                               counterfactual_last=pairs.counterfactual_last[:0],
                               question_ids=[])


def _row(alpha, admitted, general_p=1.0, general_difference=0.0):
    return {"alpha": alpha, "admitted": {"value": admitted},
            "paired": {"general_accuracy": {"p": general_p, "difference": general_difference}}}


def test_the_dev_choice_is_the_lowest_rate_that_keeps_general_ability():
    rows = [_row(1, 0.5), _row(2, 0.2), _row(4, 0.2), _row(8, 0.0, 0.001, -0.3)]
    assert steering.choose(rows)["alpha"] == 2  # 8 loses general ability; 2 and 4 tie
    assert steering.choose([_row(8, 0.0, 0.001, +0.3), *rows])["admitted"]["value"] == 0.0
    assert steering.choose([rows[-1]])["alpha"] == 8  # none keeps it: all are considered
    with pytest.raises(ValueError, match="no settings"):
        steering.choose([])


def test_a_steered_candidate_is_steered_in_its_own_passes_only(tiny_model, pairs):
    vectors = steering.head_steering(tiny_model, pairs, HEADS)
    steered = steering.candidate("steer_heads", tiny_model, vectors, 3.0)
    base = evaluation.Candidate("base", tiny_model)
    documents = evaluation.load_kl_corpus()[:3]
    per_document = evaluation.kl_per_document(base, steered, documents, max_tokens=24)
    assert all(total > 0 for total, _ in per_document)
    # by hand: base logits unsteered, the candidate's under the block
    ids = chat.encode(tiny_model.tokenizer, documents[0])[:24][None]
    with torch.no_grad():
        base_logp = tiny_model(ids, return_type="logits").log_softmax(-1)
        with steering.steer(tiny_model, vectors, 3.0):
            steered_logp = tiny_model(ids, return_type="logits").log_softmax(-1)
    by_hand = (base_logp.exp() * (base_logp - steered_logp)).sum(-1).sum()
    assert per_document[0][0] == pytest.approx(float(by_hand), rel=1e-4)
    assert evaluation.kl_per_document(base, base, documents, max_tokens=24)[0][0] == 0.0
    conversations = [data.challenge_conversation(row, data.REFERENCE_CHALLENGE)
                     for row in data.load_starter().select(range(3))]
    with steering.steer(tiny_model, vectors, 3.0):
        expected = chat.generate(tiny_model, conversations, max_new_tokens=5)
    assert steered.generate(conversations, max_new_tokens=5) == expected
    assert _n_hooks(tiny_model) == 0
