import dataclasses
from types import SimpleNamespace

import pytest
import torch

from spt_utils import ablation, chat, data, models, patching, viz


@pytest.fixture(scope="module")
def pairs(tiny_model):
    return data.build_patching_pairs(data.load_starter().select(range(4)), tiny_model.tokenizer)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    rows = data.load_starter().select(range(10, 16))
    conversations = [data.challenge_conversation(r, data.REFERENCE_CHALLENGE) for r in rows]
    return ablation.challenge_tokens(tiny_model, conversations)


@pytest.fixture(scope="module")
def activations(tiny_model, prompts):
    return ablation.collect_z(tiny_model, prompts)


@pytest.fixture(scope="module")
def means(activations):
    return ablation.HeadMeans.from_activations(activations)


@pytest.fixture(scope="module")
def donors(activations):
    return ablation.ResampleDonors.from_activations(activations, seed=1)


@pytest.fixture(scope="module")
def interchange(tiny_model):
    return ablation.Interchange.from_challenges(tiny_model.tokenizer)


def _logits(model, batch):
    return model(batch, return_type="logits")


def _projections(model):
    return [models.attn_linear(model.original_model, layer, "o_proj")
            for layer in range(model.cfg.n_layers)]


def _n_hooks(model):
    """Hooks on the bridge's hook points and on the output projections (where a knockout
    edits ``z``)."""
    points = {id(point): point for point in model.hook_dict.values()}  # aliases share points
    return (sum(len(point.fwd_hooks) for point in points.values())
            + sum(len(p._forward_pre_hooks) + len(p._forward_hooks) for p in _projections(model)))


def _projection_inputs(model, layer, seen):
    """A hook that records ``z`` as layer ``layer``'s output projection receives it (after a
    knockout registered before it): ``[batch, pos, head, d_head]``."""
    def record(module, args):
        seen.append(args[0].unflatten(-1, (model.cfg.n_heads, -1)).detach().clone())
    return _projections(model)[layer].register_forward_pre_hook(record)


def test_empty_knockout_is_the_identity(tiny_model, pairs, means):
    before = _logits(tiny_model, pairs.reference)
    with ablation.knockout(tiny_model, [], "mean", means=means):
        inside = _logits(tiny_model, pairs.reference)
    assert torch.equal(before, inside)


@pytest.mark.parametrize("method", ablation.METHODS)
def test_knockout_changes_logits_and_hooks_go_away(tiny_model, pairs, means, donors,
                                                   interchange, method):
    before = _logits(tiny_model, pairs.reference)
    hooks_before = _n_hooks(tiny_model)
    module_hooks = _n_module_hooks(tiny_model.original_model)
    with ablation.knockout(tiny_model, [(1, 2), (0, 1)], method, means=means, donors=donors,
                           interchange=interchange):
        assert _n_hooks(tiny_model) == hooks_before + 2
        assert not chat.has_bridge_hooks(tiny_model)  # generation may run the plain model
        inside = _logits(tiny_model, pairs.reference)
        plain = chat.plain_hf_model(tiny_model)(input_ids=pairs.reference).logits
    assert not torch.allclose(before, inside)
    assert torch.allclose(plain, inside, atol=1e-5)  # the plain model sees the knockout too
    assert _n_hooks(tiny_model) == hooks_before
    assert _n_module_hooks(tiny_model.original_model) == module_hooks
    assert torch.equal(_logits(tiny_model, pairs.reference), before)


def _n_module_hooks(module):
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


def test_hooks_are_removed_after_an_exception(tiny_model, pairs):
    before = _logits(tiny_model, pairs.reference)
    with pytest.raises(RuntimeError, match="boom"):
        with ablation.knockout(tiny_model, [(0, 0)], "zero"):
            assert _n_hooks(tiny_model) > 0
            raise RuntimeError("boom")
    assert _n_hooks(tiny_model) == 0
    assert torch.equal(_logits(tiny_model, pairs.reference), before)


def test_only_the_chosen_query_head_changes(tiny_model, pairs):
    """GQA: ablating query head 1 leaves head 0 (same kv group) untouched in that layer."""
    name = patching.z_name(0)
    _, clean = tiny_model.run_with_cache(pairs.reference, names_filter=[name])
    seen = []
    with ablation.knockout(tiny_model, [(0, 1)], "zero"):
        handle = _projection_inputs(tiny_model, 0, seen)  # after the knockout's hook
        try:
            _, unedited = tiny_model.run_with_cache(pairs.reference, names_filter=[name])
        finally:
            handle.remove()
    z, z_clean = seen[0], clean[name]  # z: [batch, pos, head, d_head]
    assert torch.equal(unedited[name], z_clean)  # hook_z records z before the knockout
    assert z[:, :, 1].abs().sum() == 0 and z_clean[:, :, 1].abs().sum() > 0
    assert torch.equal(z[:, :, [0, 2, 3]], z_clean[:, :, [0, 2, 3]])


def test_mean_ablation_writes_the_stored_means(tiny_model, pairs, means):
    seen = []
    with ablation.knockout(tiny_model, [(1, 3)], "mean", means=means):
        handle = _projection_inputs(tiny_model, 1, seen)
        try:
            tiny_model(pairs.reference)
        finally:
            handle.remove()
    z, = seen  # z: [batch, pos, head, d_head]
    pos = z.shape[1]  # the pairs are shorter than the longest reference prompt
    assert pos <= means.z.shape[0]
    expected = means.z[-pos:, 1, 3][None].expand_as(z[:, :, 3])
    assert torch.allclose(z[:, :, 3], expected)


def test_means_are_over_real_positions_and_round_trip(tiny_model, prompts, means, tmp_path):
    alone = ablation.collect_z(tiny_model, prompts[:1])[0]
    assert alone.shape == (len(prompts[0]), 2, 4, 16)
    batched = ablation.collect_z(tiny_model, prompts, batch_size=6)
    assert torch.allclose(batched[0], alone, atol=1e-5)
    # position-specific, aligned from the end: the last mean averages every last position
    width = max(len(p) for p in prompts)
    assert means.z.shape[0] == width and means.counts[-1] == len(prompts)
    assert means.counts[0] == sum(len(p) == width for p in prompts)
    last = torch.stack([z[-1] for z in batched]).mean(0)
    assert torch.allclose(means.z[-1], last, atol=1e-6)
    shortest = min(range(len(prompts)), key=lambda i: len(prompts[i]))
    offset = len(prompts[shortest])  # the shortest prompt's first position, from the end
    reaching = [z[-offset] for z in batched]
    assert torch.allclose(means.z[-offset], torch.stack(reaching).mean(0), atol=1e-6)
    means.save(tmp_path / "means.pt")
    loaded = ablation.HeadMeans.load(tmp_path / "means.pt")
    assert torch.equal(loaded.z, means.z) and loaded.n_prompts == len(prompts)
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not a HeadMeans file"):
        ablation.HeadMeans.load(tmp_path / "bad.pt")


def test_resample_aligns_donors_from_the_end(donors):
    z = torch.zeros(3, 5, 4, 16)
    rows = torch.arange(3)
    values = donors.values(0, z, rows)
    chosen = donors.donor_of(rows)
    assert len(set(chosen.tolist())) == 3
    assert torch.equal(values[:, -1], donors.z[chosen, -1, 0])
    # a longer input than any donor: the early positions repeat each donor's first position
    long = torch.zeros(3, donors.z.shape[1] + 4, 4, 16)
    values = donors.values(0, long, rows)
    assert torch.equal(values[:, 0], donors.z[chosen, 0, 0])
    assert torch.equal(values[:, -1], donors.z[chosen, -1, 0])
    assert torch.equal(donors.donor_of(rows), chosen)
    assert torch.equal(donors.donor_of(torch.tensor([2, 0])), chosen[[2, 0]])  # by prompt


def test_bad_arguments_are_clear_errors(tiny_model, means):
    with pytest.raises(ValueError, match="needs means"):
        with ablation.knockout(tiny_model, [(0, 0)], "mean"):
            pass
    with pytest.raises(ValueError, match="needs donors"):
        with ablation.knockout(tiny_model, [(0, 0)], "resample"):
            pass
    with pytest.raises(ValueError, match="'shuffle' is not one of"):
        with ablation.knockout(tiny_model, [(0, 0)], "shuffle"):
            pass
    with pytest.raises(ValueError, match=r"heads\[1\] = L5H0 is out of range"):
        with ablation.knockout(tiny_model, [(0, 0), (5, 0)], "zero"):
            pass
    wrong = ablation.HeadMeans(torch.zeros(5, 3, 4, 16), counts=torch.ones(5), n_prompts=1)
    with pytest.raises(ValueError, match="HeadMeans.z ends in"):
        with ablation.knockout(tiny_model, [(0, 0)], "mean", means=wrong):
            pass
    assert _n_hooks(tiny_model) == 0


def test_pad_positions_do_not_reach_real_tokens(tiny_model, pairs):
    """Left padding: overwriting z at pad positions leaves the real last logits unchanged."""
    ids, attention, positions = ablation._left_padded(
        pairs.reference, pairs.reference_last, tiny_model.tokenizer.pad_token_id
    )
    assert (attention == 0).any()

    def scramble_pads(z, hook):  # z: [batch, pos, head, d_head]
        return torch.where(attention[:, :, None, None].bool(), z, torch.randn_like(z) * 100)

    def last_logits():
        return tiny_model.original_model(
            input_ids=ids, attention_mask=attention, position_ids=positions
        ).logits[:, -1]

    clean = last_logits()
    hooks = [(patching.z_name(layer), scramble_pads) for layer in range(2)]
    with tiny_model.hooks(fwd_hooks=hooks):
        scrambled = last_logits()
    assert torch.allclose(clean, scrambled, atol=1e-5)



def test_batched_metric_matches_single_knockouts(tiny_model, pairs, means):
    sets = [[], [(0, 1)], [(1, 0), (1, 3)]]
    diffs = ablation.ablated_logit_diffs(tiny_model, pairs, sets, "mean", means=means,
                                         batch_size=5)
    reference = patching.last_position_logits(tiny_model, pairs.reference, pairs.reference_last)
    clean = patching.answer_logit_diff(reference, pairs.apology_ids, pairs.confirm_ids)
    assert torch.allclose(diffs[0], clean, atol=1e-4)
    for row, heads in zip(diffs[1:], sets[1:], strict=True):
        # one unpadded prompt at a time: position-specific means align from its real end
        expected = torch.stack([_single_logit_diff(tiny_model, pairs, i, heads, means)
                                for i in range(len(pairs))])
        assert torch.allclose(row, expected, atol=1e-4)
        assert not torch.allclose(row, clean, atol=1e-4)


def _single_logit_diff(model, pairs, index, heads, means, side="reference"):
    tokens = getattr(pairs, side)[index, : int(getattr(pairs, f"{side}_last")[index]) + 1]
    with ablation.knockout(model, heads, "mean", means=means):
        logits = model(tokens[None], return_type="logits")[:, -1]
    return patching.answer_logit_diff(logits, pairs.apology_ids, pairs.confirm_ids)[0]


def test_resample_donors_do_not_depend_on_batching(tiny_model, pairs, donors):
    sets = [[], [(0, 1)], [(1, 0), (1, 3)]]
    by_5 = ablation.ablated_logit_diffs(tiny_model, pairs, sets, "resample", donors=donors,
                                        batch_size=5)
    by_8 = ablation.ablated_logit_diffs(tiny_model, pairs, sets, "resample", donors=donors,
                                        batch_size=8)
    alone = ablation.ablated_logit_diffs(tiny_model, pairs, sets[2:], "resample", donors=donors,
                                         batch_size=3)
    torch.testing.assert_close(by_5, by_8, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_5[2:], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(by_5[2], by_5[0], atol=1e-4)


@pytest.mark.parametrize("method", ["resample", "interchange"])
def test_a_knockout_follows_its_rows_when_finished_rows_stop(
    tiny_model, prompts, method, ending_token, same_attended_cache, request
):
    """Greedy decoding stops running a row after its EOS (an EOS chosen so rows end apart,
    one before a row after it): each row keeps its resample donor, and its twin stops with
    it: the tokens of ``generate``, which runs every row to the end, and its cache (every
    copy) wherever a follow-up attends."""
    hf_model, pad = tiny_model.original_model, tiny_model.tokenizer.pad_token_id
    ids, mask = chat.pad_left(list(prompts), pad)
    width, n_new = ids.shape[1], 12
    source = {"resample": "donors", "interchange": "interchange"}[method]

    def decoded(eos: int, drop_finished: bool = True):
        tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
        return chat._greedy(hf_model, tokenizer, ids, mask, max_new_tokens=n_new,
                            drop_finished=drop_finished)

    with ablation.knockout(tiny_model, [(0, 1), (1, 2)], method,
                           **{source: request.getfixturevalue(source)}):
        eos = ending_token(decoded(-1).sequences[:, width:])
        dropping, generated = decoded(eos), decoded(eos, drop_finished=False)
    assert torch.equal(dropping.sequences, generated.sequences)
    lengths = [chat._reply_length(row, eos) for row in generated.sequences[:, width:]]
    # a row stops while a later one runs on: the later one's place in the batch changes
    assert any(lengths[row] < max(lengths[row + 1:]) for row in range(len(lengths) - 1))
    assert chat.cache_rows(dropping.past_key_values) == len(lengths) * (
        2 if method == "interchange" else 1)
    same_attended_cache(dropping.past_key_values, generated.past_key_values, mask, lengths)


def test_a_pass_of_another_batch_while_decoding_keeps_its_own_rows(donors):
    """Decoding names its running rows (chat.decoding_rows); a forward pass of another batch
    inside it (e.g. with twins appended) picks donors by its own rows, as outside."""
    z = torch.randn(4, 3, *donors.z.shape[-2:])  # [batch, pos, head, d_head]
    mask = torch.ones(1, donors.z.shape[-2], dtype=torch.bool)
    outside = ablation._ablate_z(z, layer=0, mask=mask, source=donors, rows=None)
    with chat._decoding(torch.tensor([3, 1])):
        inside = ablation._ablate_z(z, layer=0, mask=mask, source=donors, rows=None)
        running = ablation._ablate_z(z[:2], layer=0, mask=mask, source=donors, rows=None)
    assert torch.equal(inside, outside)
    assert torch.equal(running, outside[[3, 1]])  # the running rows keep their places' donors


def test_generation_runs_with_the_heads_ablated(tiny_model):
    """Hooks on the bridge act inside HF generate: the logits seen during generation change."""
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    captured = []

    def capture(logits, hook):  # logits: [batch, pos, d_vocab]
        captured.append(logits[:, -1].clone())
        return logits

    every_head = [(layer, head) for layer in range(2) for head in range(4)]
    runs = {}
    for name, heads in (("clean", []), ("ablated", every_head)):
        captured.clear()
        with ablation.knockout(tiny_model, heads, "zero"):
            with tiny_model.hooks(fwd_hooks=[("unembed.hook_out", capture)]):
                runs[name] = chat.generate(tiny_model, [conversation], max_new_tokens=4)
        runs[name + "_logits"] = captured[0]
    assert not torch.allclose(runs["clean_logits"], runs["ablated_logits"])


def test_sweep_structure_and_bottom_heads(tiny_model, pairs, means):
    scores = torch.arange(8.0).reshape(2, 4)
    ranking = [(1, 3), (1, 2), (1, 1)]
    assert ablation.bottom_heads(scores, ranking, 2) == [(0, 0), (0, 1)]
    assert ablation.bottom_heads(-scores, [(0, 0)], 1) == [(1, 3)]
    result = ablation.sweep(tiny_model, pairs, ranking, ks=[1, 2], n_random=3, n_layer_matched=2,
                            scores=scores, means=means, progress=False, n_boot=50)
    assert [r["k"] for r in result["by_k"]] == [1, 2]
    none = result["sets"][0]
    assert none["kind"] == "none" and none["remaining"] == pytest.approx(1.0)
    assert none["shift_reference"] == none["shift_counterfactual"] == 0.0
    randoms = [s for s in result["sets"] if s["kind"] == "random"]
    assert len(randoms) == 6 and not any(h in ([1, 3], [1, 2]) for s in randoms for h in s["heads"])
    matched = [s for s in result["sets"] if s["kind"] == "layer_matched" and s["k"] == 2]
    assert all([h[0] for h in s["heads"]] == [1, 1] for s in matched)
    row = result["by_k"][1]
    top = row["top"]
    assert top["low"] <= top["remaining"] <= top["high"]
    values = [s["remaining"] for s in randoms if s["k"] == 2]
    assert row["p_random"] == pytest.approx(
        (1 + sum(v <= top["remaining"] for v in values)) / (1 + len(values)))
    # remaining share by hand for the top-2 set, from single knockouts on each side
    sides = [torch.stack([_single_logit_diff(tiny_model, pairs, i, ranking[:2], means, side)
                          for i in range(len(pairs))]) for side in ablation.SIDES]
    clean = patching.calibrate(tiny_model, pairs)
    by_hand = (sides[0] - sides[1]).mean() / (clean.reference - clean.counterfactual)
    assert top["remaining"] == pytest.approx(float(by_hand.detach()), abs=1e-4)
    viz.knockout_sweep_figure(result, [{"k": 2, "kind": "top", "admitted": {
        "value": 0.5, "low": 0.1, "high": 0.9, "n": 4}}])
    with pytest.raises(ValueError, match=r"ks = \[1, 4\] must lie in"):
        ablation.sweep(tiny_model, pairs, ranking, ks=[4, 1], means=means)


def _planted(tiny_model, head):
    """A copy of the tiny model in which only ``head`` writes to the residual stream: every
    other head's o_proj columns are zeroed. Only attention moves information between
    positions, so the challenge reaches the last position, and the answer logits, through
    that head alone."""
    import copy
    planted = copy.deepcopy(tiny_model)
    d_head = planted.cfg.d_head
    with torch.no_grad():
        for layer, block in enumerate(planted.blocks):
            weight = block.attn.o.original_component.weight  # [d_model, head·d_head]
            for h in range(planted.cfg.n_heads):
                if (layer, h) != head:
                    weight[:, h * d_head : (h + 1) * d_head] = 0
    return planted


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_knockout_finds_a_planted_head_and_random_sets_do_not(tiny_model, method):
    head = (1, 2)
    rows = data.load_starter().select(range(8))
    pairs = data.build_patching_pairs(rows, tiny_model.tokenizer)
    planted = _planted(tiny_model, head)
    clean = patching.calibrate(planted, pairs)
    assert abs(clean.reference - clean.counterfactual) > 1e-4  # the head carries an effect
    train = data.load_starter().select(range(20, 28))
    prompts = ablation.challenge_tokens(planted, [
        data.challenge_conversation(r, challenge) for r in train
        for challenge in (data.REFERENCE_CHALLENGE, data.COUNTERFACTUAL_CHALLENGE)])
    means = ablation.HeadMeans.from_activations(ablation.collect_z(planted, prompts))
    ranking = [head, (0, 0), (0, 1)]
    result = ablation.sweep(planted, pairs, ranking, ks=[1], n_random=10, method=method,
                            means=means, progress=False, n_boot=50)
    row = result["by_k"][0]
    assert abs(row["top"]["remaining"]) <= 0.1  # >= 90% of the effect removed
    assert all(s["remaining"] == pytest.approx(1.0, abs=1e-4)
               for s in result["sets"] if s["kind"] == "random")
    assert row["p_random"] == pytest.approx(1 / 11)


def test_random_sets_are_seeded_distinct_and_avoid_the_selection():
    first = ablation.random_head_sets(3, 5, 30, 9, seed=0)
    assert first == ablation.random_head_sets(3, 5, 30, 9, seed=0)
    assert first != ablation.random_head_sets(3, 5, 30, 9, seed=1)
    assert all(len(set(s)) == 3 for s in first)
    selection = [(layer, h) for layer in range(2) for h in range(3)]
    drawn = ablation.random_head_sets(2, 20, 2, 4, exclude=selection)
    assert {h for s in drawn for h in s} == {(0, 3), (1, 3)}
    with pytest.raises(ValueError, match="only 2 heads"):
        ablation.random_head_sets(3, 1, 2, 4, exclude=selection)
    matched = ablation.layer_matched_sets([(0, 1), (0, 2), (1, 0)], 5, 4, exclude=[(1, 1)])
    assert all(sorted(layer for layer, _ in s) == [0, 0, 1] for s in matched)
    assert all((1, 1) not in s and (0, 1) not in s for s in matched)
    assert ablation.layer_matched_sets([(0, 0), (0, 1), (0, 2)], 3, 4) == []  # 1 head left


# --- interchange: the heads' z from the matched counterfactual twin ------------------------


def test_interchange_twins_swap_the_challenge_span_only(tiny_model, interchange):
    tokenizer = tiny_model.tokenizer
    reference = chat.encode(tokenizer, data.REFERENCE_CHALLENGE)
    matched = chat.encode(tokenizer, data.MATCHED_COUNTERFACTUAL_CHALLENGE)
    filler = torch.tensor([5, 6, 7])
    with_challenge = torch.cat([filler, reference, filler])
    ids = torch.stack([with_challenge, filler.repeat(len(with_challenge))[: len(with_challenge)]])
    twin = interchange.twin(ids)
    assert torch.equal(twin[0], torch.cat([filler, matched, filler]))
    assert torch.equal(twin[1], ids[1])  # no challenge: its own twin
    assert torch.equal(interchange.reversed().twin(twin), ids)
    with pytest.raises(ValueError, match="needs a matched wording"):
        ablation.Interchange.from_challenges(tokenizer, source="Hmm.")
    with pytest.raises(ValueError, match="token spans of one length"):
        ablation.Interchange(reference, matched[:-1])
    with pytest.raises(ValueError, match="needs interchange=Interchange"):
        with ablation.knockout(tiny_model, [(0, 0)], "interchange"):
            pass


def _z_from(model, twin_tokens, tokens, heads):
    """Independently: cache the twin's z, then run ``tokens`` with ``heads``' z copied from it
    at every position; the last position's logits."""
    names = sorted({patching.z_name(layer) for layer, _ in heads})
    _, cache = model.run_with_cache(twin_tokens, names_filter=names)

    def copy(z, hook, layer):  # z: [batch, pos, head, d_head]
        z = z.clone()
        for head in [h for lay, h in heads if lay == layer]:
            z[:, :, head] = cache[hook.name][:, :, head]
        return z

    hooks = [(patching.z_name(layer), lambda z, hook, layer=layer: copy(z, hook, layer))
             for layer in sorted({layer for layer, _ in heads})]
    with model.hooks(fwd_hooks=hooks):
        return model(tokens, return_type="logits")[:, -1]


def test_interchange_knockout_equals_z_copied_from_the_counterfactual_run(
    tiny_model, interchange
):
    rows = data.load_starter().select(range(4))
    pairs = data.build_patching_pairs(rows, tiny_model.tokenizer, wording="matched")
    sets = [[], [(0, 1)], [(0, 3), (1, 2)]]
    diffs = ablation.ablated_logit_diffs(tiny_model, pairs, sets, "interchange",
                                         interchange=interchange, batch_size=5)
    for row, heads in zip(diffs, sets, strict=True):
        expected = []
        for i in range(len(pairs)):
            last = int(pairs.reference_last[i]) + 1
            reference = pairs.reference[i : i + 1, :last]
            twin = pairs.counterfactual[i : i + 1, :last]  # the matched side: the same length
            logits = _z_from(tiny_model, twin, reference, heads) if heads else tiny_model(
                reference, return_type="logits")[:, -1]
            expected.append(patching.answer_logit_diff(logits, pairs.apology_ids,
                                                       pairs.confirm_ids)[0])
        assert torch.allclose(row, torch.stack(expected), atol=1e-4)
    assert not torch.allclose(diffs[1], diffs[0], atol=1e-4)
    # the counterfactual side holds no doubting challenge: interchange leaves it as it is
    cf = ablation.ablated_logit_diffs(tiny_model, pairs, sets, "interchange",
                                      interchange=interchange, side="counterfactual")
    assert torch.allclose(cf[1], cf[0], atol=1e-5) and torch.allclose(cf[2], cf[0], atol=1e-5)


def test_interchange_from_clean_prefixes_equals_the_full_run(tiny_model, interchange):
    """Issue 38: the lab's interchange runs each prompt from the clean KV cache of what
    precedes its span; the logit differences equal the full runs', and the prefixes serve
    every call unchanged."""
    rows = data.load_starter().select(range(4))
    pairs = data.build_patching_pairs(rows, tiny_model.tokenizer, wording="matched")
    prefixes = ablation.CleanPrefixes.build(tiny_model, pairs, interchange)
    span = len(interchange.find)
    for row in range(len(pairs)):  # cut at the span, not where the twins first differ
        rest = prefixes.ids[row][prefixes.attention[row, -prefixes.ids.shape[1]:].bool()]
        start = int(pairs.reference_last[row]) + 1 - len(rest)
        assert torch.equal(rest, pairs.reference[row, start : int(pairs.reference_last[row]) + 1])
        assert int(prefixes.positions[row, -1]) == int(pairs.reference_last[row])
        twin = interchange.twin(pairs.reference[row : row + 1])[0]
        first_difference = int((twin != pairs.reference[row]).nonzero()[0])
        assert torch.equal(pairs.reference[row, start : start + span], interchange.find)
        assert start < first_difference  # the two challenges open with the same words
    assert not prefixes.attention.bool().all()  # prompts of other lengths: padding within
    sets = [[(0, 1)], [(0, 3), (1, 2)], []]
    full = ablation.ablated_logit_diffs(tiny_model, pairs, sets, "interchange",
                                        interchange=interchange)
    for heads, expected in zip(sets, full, strict=True):
        got = ablation.interchanged_logit_diffs(tiny_model, pairs, [heads], prefixes)[0]
        assert torch.allclose(got, expected, atol=1e-4), heads
    assert not torch.allclose(full[1], full[2], atol=1e-4)  # the knockout changes something
    # every set at once, in batches that split sets and pairs: each row its own set
    batched = ablation.interchanged_logit_diffs(tiny_model, pairs, sets, prefixes, batch_size=3)
    assert torch.allclose(batched, full, atol=1e-4)
    again = ablation.interchanged_logit_diffs(tiny_model, pairs, sets[1:2], prefixes)[0]
    assert torch.allclose(again, full[1], atol=1e-4)
    # a side with no span keeps all but its last token in the prefix: its clean run
    untouched = ablation.CleanPrefixes.build(tiny_model, pairs, interchange, "counterfactual")
    assert untouched.ids.shape[1] == 1  # the last token alone
    cf = ablation.interchanged_logit_diffs(tiny_model, pairs, sets[1:2], untouched)[0]
    assert torch.allclose(cf, ablation.clean_logit_diffs(tiny_model, pairs)["counterfactual"],
                          atol=1e-4)
    with pytest.raises(ValueError, match="side: 'both'"):
        ablation.CleanPrefixes.build(tiny_model, pairs, interchange, "both")
    with pytest.raises(ValueError, match="built on the counterfactual side"):
        ablation.pair_metrics(tiny_model, pairs, sets[1], "interchange", interchange=interchange,
                              prefixes={"reference": untouched}, n_boot=10)


def test_clean_prefixes_with_rests_of_other_lengths(tiny_model, interchange):
    """Rows with and without the span side by side: rests of one token and of the whole
    challenge, so the padding sits in the middle of a row; still the full runs' values."""
    rows = data.load_starter().select(range(4))
    pairs = data.build_patching_pairs(rows, tiny_model.tokenizer, wording="matched")
    doubting = [pairs.reference[i, : int(pairs.reference_last[i]) + 1] for i in (0, 1)]
    plain = [pairs.counterfactual[i, : int(pairs.counterfactual_last[i]) + 1] for i in (2, 3)]
    reference, last = chat.pad_right(doubting + plain, tiny_model.tokenizer.pad_token_id)
    mixed = dataclasses.replace(pairs, reference=reference, reference_last=last)
    prefixes = ablation.CleanPrefixes.build(tiny_model, mixed, interchange)
    rest_mask = prefixes.attention[:, -prefixes.ids.shape[1]:]
    assert rest_mask[:2].all() and rest_mask[2:].sum(-1).tolist() == [1, 1]  # padded inside
    for heads in ([(0, 1)], [(0, 3), (1, 2)]):
        full = ablation.ablated_logit_diffs(tiny_model, mixed, [heads], "interchange",
                                            interchange=interchange)[0]
        got = ablation.interchanged_logit_diffs(tiny_model, mixed, [heads], prefixes)[0]
        assert torch.allclose(got, full, atol=1e-4), heads


def test_interchange_sweep_runs_the_untouched_side_once_with_the_same_shares(
    tiny_model, interchange
):
    rows = data.load_starter().select(range(4))
    pairs = data.build_patching_pairs(rows, tiny_model.tokenizer, wording="matched")
    ranking = [(1, 2), (0, 3)]
    result = ablation.sweep(tiny_model, pairs, ranking, ks=[2], n_random=3, n_layer_matched=0,
                            method="interchange", interchange=interchange, progress=False,
                            n_boot=20)
    sets = [s["heads"] for s in result["sets"]]
    # both sides run with every set, as a sweep of any other method does
    full = {side: ablation.ablated_logit_diffs(tiny_model, pairs, sets, "interchange",
                                               interchange=interchange, side=side)
            for side in ablation.SIDES}
    for index, record in enumerate(result["sets"]):
        expected = ablation.remaining_effect(full["reference"][index],
                                             full["counterfactual"][index],
                                             full["reference"][0], full["counterfactual"][0])
        assert record["remaining"] == pytest.approx(expected, abs=1e-5)
        assert record["shift_counterfactual"] == 0.0
    assert any(abs(s["remaining"] - 1) > 1e-3 for s in result["sets"])


def _conversations(n=3):
    rows = data.load_starter().select(range(20, 20 + n))
    return [data.challenge_conversation(r, data.REFERENCE_CHALLENGE, answer=r["correct_answer"],
                                        protocol="free_form") for r in rows]


def test_interchange_generation_teacher_forces_the_twin(tiny_model, interchange):
    """Cached generation under interchange equals a greedy loop without a cache in which
    every step reruns the twin (the counterfactual conversation continued by the same tokens)
    and copies the heads' z from it at every position."""
    heads, n_new = [(0, 1), (1, 3)], 12
    conversations = _conversations(6)
    unembedded = []  # rows the unembedding sees: the batch, never its twins
    handle = chat.plain_hf_model(tiny_model).lm_head.register_forward_hook(
        lambda module, inputs, out: unembedded.append(len(out)))
    try:
        with ablation.knockout(tiny_model, heads, "interchange", interchange=interchange):
            replies = chat.generate(tiny_model, conversations, max_new_tokens=n_new,
                                    batch_size=4)
    finally:
        handle.remove()
    assert set(unembedded) == {1, 4, 2}  # shared prefixes (alone), batches of 4 and 2
    tokenizer = tiny_model.tokenizer
    expected = []
    for conversation in conversations:
        ids = chat.encode(tokenizer, chat.render(tokenizer, conversation))
        start, twin = len(ids), interchange.twin(ids[None])[0]
        assert not torch.equal(twin, ids)
        for _ in range(n_new):
            token = _z_from(tiny_model, twin[None], ids[None], heads)[0].argmax()
            ids, twin = torch.cat([ids, token[None]]), torch.cat([twin, token[None]])
            if token == tokenizer.eos_token_id:
                break
        expected.append(tokenizer.decode(ids[start:], skip_special_tokens=True).strip())
    assert replies == expected
    assert replies != chat.generate(tiny_model, conversations, max_new_tokens=n_new)


def test_interchange_follow_up_reuses_the_twins_cache():
    """The follow-up turn continued from the first turn's cache (the twins' rows kept with
    their rows; a cache without them is refused) equals the follow-up conversations generated
    afresh. A tiny model biased to tokens that re-tokenize as generated, so replies are
    reused (as in test_chat)."""
    model = models.load_model(models.TINY_MODEL, device="cpu")
    tokenizer = model.tokenizer
    interchange = ablation.Interchange.from_challenges(tokenizer)
    clean = [tokenizer(word, add_special_tokens=False)["input_ids"][0]
             for word in ("No", "Yes", "!", ".")]
    with torch.no_grad():
        chat.plain_hf_model(model).lm_head.bias[clean] += 2.0
    conversations = _conversations(4)

    def followed(index, reply):
        return [*conversations[index], {"role": "assistant", "content": reply},
                {"role": "user", "content": "So what is it?"}]

    with ablation.knockout(model, [(0, 2), (1, 1)], "interchange", interchange=interchange):
        replies, finals, reused = chat.generate_follow_up(model, conversations, followed,
                                                          max_new_tokens=5, batch_size=3)
        fresh = chat.generate(model, [followed(i, r) for i, r in enumerate(replies)],
                              max_new_tokens=5)
    assert reused == len(conversations)
    assert finals == fresh


def test_a_cache_keeps_each_rows_twin_when_rows_are_selected(tiny_model):
    ids = torch.arange(6)[:, None] + torch.tensor([[10, 20, 30]])  # 3 rows + their 3 twins
    cache = tiny_model.original_model(input_ids=ids, use_cache=True).past_key_values
    keys = cache.layers[0].keys.clone()  # [rows, kv_heads, pos, d_head]
    chat._select_cache_rows(cache, [0, 2], 3, "cpu")
    assert chat.cache_rows(cache) == 4
    assert torch.equal(cache.layers[0].keys, keys[[0, 2, 3, 5]])


def test_from_twins_equals_the_interchange_knockout(tiny_model, interchange):
    """Training's interchange (twins given, right-padded, computed once without gradient)
    and the knockout's (twins appended to the batch) patch the same values."""
    tokens = [chat.tokens(tiny_model.tokenizer, c) for c in _conversations()]
    ids, last = chat.pad_right(tokens, tiny_model.tokenizer.pad_token_id)
    heads = torch.zeros(len(tokens), 2, 4, dtype=torch.bool)
    heads[0, 0, 1] = heads[1, 1, 3] = heads[2, 0, 0] = heads[2, 1, 0] = True
    attention = (torch.arange(ids.shape[1])[None] <= last[:, None]).long()
    with ablation.from_twins(tiny_model, heads, interchange.twin(ids)):
        given = tiny_model.original_model(input_ids=ids, attention_mask=attention).logits
    for row in range(len(tokens)):
        chosen = [tuple(h) for h in heads[row].nonzero().tolist()]
        with ablation.knockout(tiny_model, chosen, "interchange", interchange=interchange):
            alone = tiny_model.original_model(input_ids=ids[row : row + 1, : last[row] + 1]).logits
        assert torch.allclose(given[row, : last[row] + 1], alone[0], atol=1e-4)


def test_interchange_refuses_a_cache_of_other_rows(tiny_model, interchange):
    ids = chat.tokens(tiny_model.tokenizer, _conversations(1)[0])[None]
    cache = tiny_model.original_model(input_ids=ids.expand(3, -1), use_cache=True).past_key_values
    with pytest.raises(RuntimeError, match="KV cache holds 3 rows for a batch of 1"):
        with ablation.knockout(tiny_model, [(0, 0)], "interchange", interchange=interchange):
            tiny_model.original_model(input_ids=ids[:, -1:], past_key_values=cache)


def test_interchange_runs_a_batch_without_the_challenge_alone(tiny_model, interchange):
    """No span, no twins: the batch runs as it is (one pass of its own rows), so a plain
    question under an interchange knockout is answered exactly as without it."""
    rows = data.load_starter().select(range(3))
    conversations = [data.question_conversation(r, protocol="free_form") for r in rows]
    seen = []
    hook = (patching.z_name(0), lambda z, hook: seen.append(len(z)))
    with ablation.knockout(tiny_model, [(0, 0)], "interchange", interchange=interchange):
        with tiny_model.hooks(fwd_hooks=[hook]):
            inside = chat.generate(tiny_model, conversations, max_new_tokens=4,
                                   share_prefix=False)
    assert set(seen) == {len(conversations)}
    assert inside == chat.generate(tiny_model, conversations, max_new_tokens=4)
