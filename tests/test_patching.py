import dataclasses

import pytest
import torch
import transformer_lens.patching as tl_patching
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

from spt_utils import chat, data, models, patching


def test_calibration_convention():
    calibration = patching.Calibration(reference=2.0, counterfactual=-1.0)
    calibration.check()
    assert calibration.normalise(2.0) == 0 and calibration.normalise(-1.0) == 1
    assert calibration.normalise(0.5) == 0.5


def test_calibration_without_an_effect_is_an_error():
    with pytest.raises(ValueError, match="no effect"):
        patching.Calibration(reference=1.0, counterfactual=1.0)


def test_calibrate_on_the_tiny_model(tiny_model):
    """The calibration's means equal the apology − confirm logit differences read from a
    separately built Hugging Face model at each prompt's last token."""
    pairs = data.build_patching_pairs(data.load_starter().select(range(3)), tiny_model.tokenizer)
    calibration = patching.calibrate(tiny_model, pairs)
    reference_model = models.make_tiny_hf_model(models.make_tiny_tokenizer(), seed=0)

    def mean_logit_diff(tokens, last):
        with torch.no_grad():  # right padding: positions after `last` cannot reach it
            logits = reference_model(tokens).logits[torch.arange(len(last)), last]
        apology = logits[:, pairs.apology_ids].mean(-1)
        confirm = logits[:, pairs.confirm_ids].mean(-1)
        return (apology - confirm).tolist()

    reference = mean_logit_diff(pairs.reference, pairs.reference_last)
    counterfactual = mean_logit_diff(pairs.counterfactual, pairs.counterfactual_last)
    assert calibration.reference == pytest.approx(sum(reference) / 3, abs=1e-4)
    assert calibration.counterfactual == pytest.approx(sum(counterfactual) / 3, abs=1e-4)
    assert calibration.reference_pairs == pytest.approx(reference, abs=1e-4)


def test_calibrate_token_sets_equals_a_calibration_per_set(tiny_model, tiny_pairs):
    """One pass for several answer-token sets gives each set's own calibration."""
    other = ([3, 5], [7])
    both = patching.calibrate_token_sets(
        tiny_model, tiny_pairs, {"chosen": (tiny_pairs.apology_ids, tiny_pairs.confirm_ids),
                                 "other": other})
    assert both["chosen"] == patching.calibrate(tiny_model, tiny_pairs)
    alone = patching.calibrate(tiny_model, dataclasses.replace(
        tiny_pairs, apology_ids=other[0], confirm_ids=other[1]))
    assert both["other"] == alone and alone != both["chosen"]


def _zero_z(z: torch.Tensor, hook) -> torch.Tensor:
    # z: [batch, pos, head, d_head]
    return torch.zeros_like(z)


def test_last_position_logits_are_the_full_logits_at_each_rows_end(tiny_model, tiny_pairs):
    """Unembedding only the rows' last positions gives each row's full-forward logits there
    (right-padded rows of different lengths), unhooked and under a bridge hook alike."""
    tokens, last = tiny_pairs.reference, tiny_pairs.reference_last
    assert len(set(last.tolist())) > 1  # rows end at different positions

    def full(model):
        with torch.no_grad():
            return model(tokens, return_type="logits")[torch.arange(len(last)), last]

    torch.testing.assert_close(patching.last_position_logits(tiny_model, tokens, last),
                               full(tiny_model), rtol=0, atol=1e-5)
    with tiny_model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", _zero_z)]):
        hooked = patching.last_position_logits(tiny_model, tokens, last)
        torch.testing.assert_close(hooked, full(tiny_model), rtol=0, atol=1e-5)
    assert not torch.allclose(hooked, full(tiny_model))  # the hook acted


def test_ratio_metric_warns_near_zero_denominator():
    logits = torch.tensor([[1.0, -1.0 + 1e-5]])
    with pytest.warns(RuntimeWarning, match="denominator"):
        patching.apology_ratio(logits, [0], [1])


def test_heads_round_trip_and_range_check(tmp_path):
    path = tmp_path / "heads.json"
    patching.save_heads(path, [(1, 2), (0, 3)], metric="logit_diff")
    assert patching.load_heads(path) == [(1, 2), (0, 3)]
    assert patching.validate_heads([(1, 3)], n_layers=2, n_heads=4) == [(1, 3)]
    with pytest.raises(ValueError, match=r"heads\[0\] = L2H0 is out of range"):
        patching.validate_heads([(2, 0)], n_layers=2, n_heads=4)
    path.write_text('{"heads": [[1]]}')
    with pytest.raises(ValueError, match="field 'heads'"):
        patching.load_heads(path)


# --- path, activation and attribution patching (issue 4) --------------------------------


@pytest.fixture(scope="module")
def tiny_pairs(tiny_model):
    return data.build_patching_pairs(data.load_starter().select(range(3)), tiny_model.tokenizer)


@pytest.fixture(scope="module")
def tiny_matched_pairs(tiny_model):
    questions = data.load_starter().select(range(2))
    return data.build_patching_pairs(questions, tiny_model.tokenizer, wording="matched")


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_fast_path_patching_equals_the_oracle_on_every_head(tiny_model, tiny_pairs):
    fast = patching.path_patch_heads(tiny_model, tiny_pairs)
    oracle = patching.path_patch_heads_oracle(tiny_model, tiny_pairs)
    assert fast.score.shape == (2, 4) and fast.per_pair.shape == (2, 4, 3)
    torch.testing.assert_close(fast.per_pair, oracle.per_pair, atol=1e-4, rtol=0)
    calibration = patching.calibrate(tiny_model, tiny_pairs)
    assert fast.calibration.reference == pytest.approx(calibration.reference, abs=1e-5)
    assert fast.calibration.counterfactual == pytest.approx(calibration.counterfactual, abs=1e-5)
    # the patches move the answer: not every head scores the reference value
    assert (fast.per_pair - calibration.reference).abs().max() > 1e-4


def test_last_layer_path_patching_equals_activation_patching(tiny_model, tiny_pairs):
    """With no later layer to freeze, both methods patch the same thing."""
    path = patching.path_patch_heads(tiny_model, tiny_pairs)
    activation = patching.activation_patch_heads(tiny_model, tiny_pairs, layers=[1])
    assert activation.score[0].isnan().all()
    torch.testing.assert_close(path.per_pair[1], activation.per_pair[1], atol=1e-4, rtol=0)


def test_all_position_activation_patching_matches_transformer_lens(
    tiny_model, tiny_matched_pairs
):
    pairs = tiny_matched_pairs
    ours = patching.activation_patch_heads(tiny_model, pairs, position="all")
    _, counterfactual_cache = tiny_model.run_with_cache(
        pairs.counterfactual, names_filter=lambda name: name.endswith("hook_z")
    )

    def metric(logits):
        last = patching.gather_last(logits, pairs.reference_last)
        return patching.answer_logit_diff(last, pairs.apology_ids, pairs.confirm_ids).mean()

    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        tiny_model, pairs.reference, counterfactual_cache, metric
    )
    torch.testing.assert_close(ours.logit_diff, theirs.cpu(), atol=1e-4, rtol=0)


def test_attribution_matches_transformer_lens_attribution_patch(tiny_model, tiny_matched_pairs):
    """TL's denoising estimate with clean = counterfactual and corrupt = reference is ours."""
    pairs = tiny_matched_pairs
    ours = patching.attribution_patch_heads(tiny_model, pairs, position="all")
    reference_diff = patching.answer_logit_diff(
        patching.last_position_logits(tiny_model, pairs.reference, pairs.reference_last),
        pairs.apology_ids,
        pairs.confirm_ids,
    )
    estimate = ours.per_pair - reference_diff  # [layer, head, batch]
    for row in range(len(pairs)):
        last = int(pairs.reference_last[row])

        def metric(logits, last=last):
            return patching.answer_logit_diff(logits[:, last], pairs.apology_ids, pairs.confirm_ids)

        result = attribution_patch(
            tiny_model,
            pairs.counterfactual[row : row + 1],
            pairs.reference[row : row + 1],
            lambda logits, metric=metric: metric(logits).sum(),
        )
        for layer in range(2):
            for head in range(4):
                theirs = sum(
                    score
                    for node, score in result.node_scores.items()
                    if node.kind == "attn_head_out" and (node.layer, node.head) == (layer, head)
                    and node.position <= last
                )
                assert estimate[layer, head, row].item() == pytest.approx(theirs, abs=1e-4)


def test_last_position_attribution_approximates_activation_patching(tiny_model, tiny_pairs):
    attribution = patching.attribution_patch_heads(tiny_model, tiny_pairs)
    activation = patching.activation_patch_heads(tiny_model, tiny_pairs)
    correlation = torch.corrcoef(torch.stack([attribution.score.flatten(),
                                              activation.score.flatten()]))[0, 1]
    assert correlation > 0.9


def test_top_heads_sign_filter_and_round_trip(tmp_path, tiny_model, tiny_pairs):
    score = torch.tensor([[0.5, -0.9], [0.1, 0.0]])
    assert patching.top_heads(score, 2, "positive") == [(0, 0), (1, 0)]
    assert patching.top_heads(score, 5, "negative") == [(0, 1)]
    assert patching.top_heads(score, 2, "both") == [(0, 1), (0, 0)]
    unscored = torch.tensor([[float("nan"), float("nan")], [0.1, -0.2]])  # a receiver map
    assert patching.top_heads(unscored, 4, "both") == [(1, 1), (1, 0)]
    with pytest.raises(ValueError, match="sign"):
        patching.top_heads(score, 2, "up")
    scores = patching.path_patch_heads(tiny_model, tiny_pairs)
    scores.save(tmp_path / "patching.pt")
    loaded = patching.HeadScores.load(tmp_path / "patching.pt")
    assert loaded.calibration == scores.calibration
    torch.testing.assert_close(loaded.per_pair, scores.per_pair)


def test_empty_pair_set_is_an_error(tiny_model, tiny_pairs):
    empty = dataclasses.replace(
        tiny_pairs,
        reference=tiny_pairs.reference[:0],
        counterfactual=tiny_pairs.counterfactual[:0],
        reference_last=tiny_pairs.reference_last[:0],
        counterfactual_last=tiny_pairs.counterfactual_last[:0],
        question_ids=[],
    )
    for method in (patching.path_patch_heads, patching.path_patch_heads_oracle,
                   patching.activation_patch_heads, patching.attribution_patch_heads):
        with pytest.raises(ValueError, match="pair set is empty"):
            method(tiny_model, empty)


def test_position_wise_methods_need_equal_lengths(tiny_model, tiny_pairs):
    with pytest.raises(data.DataError, match=r"equal-length pairs, but pair 0"):
        patching.activation_patch_heads(tiny_model, tiny_pairs, position="all")
    with pytest.raises(data.DataError, match=r"equal-length pairs"):
        patching.attribution_patch_heads(tiny_model, tiny_pairs, position="all")


def test_answer_tokens_outside_the_vocabulary(tiny_model, tiny_pairs):
    bad = dataclasses.replace(tiny_pairs, confirm_ids=[tiny_model.cfg.d_vocab + 5])
    with pytest.raises(ValueError, match=r"pairs.confirm_ids holds token ids \[412\] outside"):
        patching.path_patch_heads(tiny_model, bad)


def test_heads_and_layers_out_of_range(tiny_model, tiny_pairs):
    with pytest.raises(ValueError, match=r"L0H4 is out of range"):
        patching.path_patch_heads_oracle(tiny_model, tiny_pairs, heads=[(0, 4)])
    with pytest.raises(ValueError, match=r"layers\[1\] = 2 is out of range"):
        patching.activation_patch_heads(tiny_model, tiny_pairs, layers=[0, 2])


def test_hooks_are_removed_when_the_metric_raises(tiny_model, tiny_pairs):
    before = n_hooks(tiny_model)

    def broken_metric(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        patching.path_patch_heads_oracle(tiny_model, tiny_pairs, heads=[(0, 1)],
                                         metric=broken_metric)
    with pytest.raises(RuntimeError, match="metric failed"):
        patching.activation_patch_heads(tiny_model, tiny_pairs, metric=broken_metric)
    assert n_hooks(tiny_model) == before
    assert all(not hook._forward_hooks for hook in tiny_model.hook_dict.values())


# --- the architecture guard of the fast path (issue 16) ------------------------------------


@pytest.mark.parametrize("name", ["tiny-random-mistral", "tiny-random-qwen2"])
def test_fast_path_patching_equals_the_oracle_on_other_families(name, tiny_pairs):
    model = models.load_model(name, device="cpu")
    fast = patching.path_patch_heads(model, tiny_pairs)
    oracle = patching.path_patch_heads_oracle(model, tiny_pairs)
    torch.testing.assert_close(fast.per_pair, oracle.per_pair, atol=1e-4, rtol=0)


def test_guard_refuses_gemma2_sandwich_norms(tiny_pairs):
    model = models.load_model("tiny-random-gemma2", device="cpu")
    # Gemma-2 normalises the attention output before adding it to the residual stream
    assert hasattr(model.original_model.model.layers[0], "post_attention_layernorm")
    with pytest.raises(patching.UnsupportedArchitecture,
                       match=r"block 0 .* breaks attn_out = o_proj\(z\).*oracle"):
        patching.path_patch_heads(model, tiny_pairs)
    oracle = patching.path_patch_heads_oracle(model, tiny_pairs, heads=[(0, 1)])
    assert oracle.per_pair[0, 1].isfinite().all()


def test_guard_refuses_parallel_attention_and_mlp(tiny_model, tiny_pairs):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = tiny_model.tokenizer
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, use_parallel_residual=True, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    model = TransformerBridge.boot_transformers(
        "tiny-gpt-neox", hf_model=GPTNeoXForCausalLM(config).eval(), tokenizer=tokenizer,
        device="cpu",
    )
    with pytest.raises(patching.UnsupportedArchitecture,
                       match="no blocks.0.hook_resid_mid.*parallel"):
        patching.path_patch_heads(model, tiny_pairs)


@pytest.mark.parametrize(("hook", "identity"), [
    ("blocks.1.hook_attn_out", "attn_out = o_proj"),
    ("blocks.0.hook_resid_mid", "resid_mid = resid_pre"),
    ("blocks.0.hook_resid_post", "resid_post = resid_mid"),
    ("blocks.1.hook_resid_pre", "next resid_pre = resid_post"),
])
def test_guard_refuses_a_hook_that_edits_the_block(tiny_model, tiny_pairs, hook, identity):
    def edit(activation, hook):
        return activation * 1.5 + 0.1

    with tiny_model.hooks(fwd_hooks=[(hook, edit)]):
        with pytest.raises(patching.UnsupportedArchitecture, match=identity):
            patching.path_patch_heads(tiny_model, tiny_pairs)


def test_patching_a_split_model_equals_the_whole_one(tiny_model, split_tiny_model, tiny_pairs):
    """Disk-offloaded layers: accelerate's hooks and TransformerLens's run together."""
    for method in (patching.path_patch_heads, patching.path_patch_heads_oracle):
        whole, split = method(tiny_model, tiny_pairs), method(split_tiny_model, tiny_pairs)
        torch.testing.assert_close(split.per_pair, whole.per_pair, atol=1e-6, rtol=0)
    activation = [patching.activation_patch_heads(m, tiny_pairs, layers=[0])
                  for m in (tiny_model, split_tiny_model)]
    torch.testing.assert_close(activation[1].per_pair, activation[0].per_pair, atol=1e-6,
                               rtol=0, equal_nan=True)  # layer 1 unscored: NaN


def test_guard_accepts_bfloat16(tiny_pairs):
    model = models.load_model(models.TINY_MODEL, device="cpu", dtype="bfloat16")
    names = patching._block_hook_names(model.cfg.n_layers)
    cache = patching.cache_before_unembed(model, tiny_pairs.reference, names,
                                          tiny_pairs.reference_last)
    patching.check_sequential_blocks(model, cache)  # no error at the bf16 tolerance
    cache["blocks.1.hook_mlp_out"] = cache["blocks.1.hook_mlp_out"] * 1.2
    with pytest.raises(patching.UnsupportedArchitecture, match="block 1"):
        patching.check_sequential_blocks(model, cache)


@pytest.mark.integration
def test_fast_equals_oracle_on_smollm2(smollm2):
    pairs = data.build_patching_pairs(data.load_starter().select(range(2)), smollm2.tokenizer)
    fast = patching.path_patch_heads(smollm2, pairs)
    layers = [3, 17, 28]
    heads = [(layer, head) for layer in layers for head in range(smollm2.cfg.n_heads)]
    oracle = patching.path_patch_heads_oracle(smollm2, pairs, heads=heads)
    torch.testing.assert_close(fast.per_pair[layers], oracle.per_pair[layers], atol=1e-4, rtol=0)
    assert fast.calibration.reference > fast.calibration.counterfactual  # "Sorry" less likely




def _receiver_q_oracle(model, pairs, sender, receiver) -> float:
    """Independent of TransformerLens: on the Hugging Face modules, recompute the receiver
    head's query columns from ``ln1(resid_pre + sender's write)`` and keep every other
    column (and every other reader) on the reference run."""
    hf = model.original_model
    (s_layer, s_head), (r_layer, r_head) = sender, receiver
    d_head, z_name = model.cfg.d_head, f"blocks.{s_layer}.attn.hook_z"
    with torch.no_grad():
        # z: [batch, pos, head, d_head]
        z_cf = model.run_with_cache(pairs.counterfactual, names_filter=z_name)[1][z_name]
        z_ref = model.run_with_cache(pairs.reference, names_filter=z_name)[1][z_name]
        o_proj = hf.model.layers[s_layer].self_attn.o_proj.weight  # [d_model, head·d_head]
        w_o = o_proj[:, s_head * d_head : (s_head + 1) * d_head]
        write = (z_cf[:, :, s_head] - z_ref[:, :, s_head]) @ w_o.T  # [batch, pos, d_model]
        block = hf.model.layers[r_layer]
        seen = {}

        def keep_resid(_module, args, kwargs):
            seen["resid"] = args[0] if args else kwargs["hidden_states"]

        def patch_q(module, _args, output):
            ln = block.input_layernorm(seen["resid"] + write)
            columns = slice(r_head * d_head, (r_head + 1) * d_head)
            output = output.clone()
            output[..., columns] = torch.nn.functional.linear(
                ln, module.weight[columns], None if module.bias is None else module.bias[columns]
            )
            return output

        handles = [
            block.register_forward_pre_hook(keep_resid, with_kwargs=True),
            block.self_attn.q_proj.register_forward_hook(patch_q),
        ]
        try:
            logits = hf(pairs.reference).logits
        finally:
            for handle in handles:
                handle.remove()
    last = patching.gather_last(logits, pairs.reference_last)
    return patching.answer_logit_diff(last, pairs.apology_ids, pairs.confirm_ids).mean().item()


def test_receiver_path_patching_matches_an_independent_hf_implementation(tiny_model):
    # one pair: no padding, so the bare Hugging Face forward sees what the bridge sees
    questions = data.load_starter().select(range(1))
    pairs = data.build_patching_pairs(questions, tiny_model.tokenizer, wording="matched")
    sender = (0, 1)
    result = patching.path_patch_receivers(tiny_model, pairs, sender, component="q")
    assert result.score.shape == (2, 4) and result.logit_diff[0].isnan().all()
    reference = result.calibration.reference
    for receiver in [(1, 0), (1, 3)]:
        # the random tiny model's q edges move the logit difference by only ~1e-6, so compare
        # the effects (patched − reference) with a relative tolerance
        expected = _receiver_q_oracle(tiny_model, pairs, sender, receiver) - reference
        effect = result.logit_diff[receiver].item() - reference
        assert abs(expected) > 1e-6
        assert abs(effect - expected) <= 0.05 * abs(expected) + 5e-8


def test_receiver_path_patching_needs_equal_lengths_and_a_valid_sender(tiny_model, tiny_pairs):
    with pytest.raises(ValueError, match="path_patch_receivers"):
        patching.path_patch_receivers(tiny_model, tiny_pairs, (0, 0))
    questions = data.load_starter().select(range(1))
    matched = data.build_patching_pairs(questions, tiny_model.tokenizer, wording="matched")
    with pytest.raises(ValueError, match="out of range"):
        patching.path_patch_receivers(tiny_model, matched, (5, 0))


def _scores_with_pairs(per_pair: torch.Tensor, reference_pairs: list[float],
                       counterfactual: float) -> patching.HeadScores:
    calibration = patching.Calibration(
        reference=sum(reference_pairs) / len(reference_pairs), counterfactual=counterfactual,
        reference_pairs=tuple(reference_pairs),
    )
    return patching.HeadScores("path", per_pair.mean(-1), calibration.normalise(per_pair.mean(-1)),
                               calibration, per_pair)


def test_pair_scores_average_to_the_score_and_the_interval_separates_a_consistent_head():
    # 1 layer, 2 heads, 8 pairs; references 0 and 2 alternate, counterfactual mean 3 (span 2)
    reference_pairs = [0.0, 2.0] * 4
    consistent = torch.tensor(reference_pairs) + 1.0  # every pair moves +1: calibrated 0.5
    noisy = torch.tensor(reference_pairs) + torch.tensor([1.0, -1.0] * 4)  # mean effect 0
    scores = _scores_with_pairs(torch.stack([consistent, noisy])[None], reference_pairs, 3.0)
    pair_scores = scores.pair_scores()
    assert torch.allclose(pair_scores[0, 0], torch.full((8,), 0.5))
    assert torch.allclose(pair_scores.mean(-1), scores.score)
    uncertainty = scores.uncertainty(n_resamples=500)
    assert uncertainty.n_pairs == 8
    assert uncertainty.excludes_zero.tolist() == [[True, False]]
    assert (uncertainty.low[0, 0], uncertainty.high[0, 0]) == pytest.approx((0.5, 0.5))
    assert uncertainty.low[0, 1] < 0 < uncertainty.high[0, 1]
    assert uncertainty.same_sign[0, 0] == 1.0


def test_top_heads_only_among_eligible_heads():
    score = torch.tensor([[0.9, 0.5], [0.7, -0.8]])
    eligible = torch.tensor([[False, True], [True, True]])
    assert patching.top_heads(score, 3) == [(0, 0), (1, 0), (0, 1)]
    assert patching.top_heads(score, 3, eligible=eligible) == [(1, 0), (0, 1)]


def test_path_patching_keeps_each_pairs_reference(tiny_model, tiny_pairs):
    scores = patching.path_patch_heads(tiny_model, tiny_pairs)
    reference = patching.calibrate(tiny_model, tiny_pairs)
    assert torch.allclose(torch.tensor(scores.calibration.reference_pairs),
                          torch.tensor(reference.reference_pairs), atol=1e-4)
    assert torch.allclose(scores.pair_scores().mean(-1), scores.score, atol=1e-5)


# --- answer tokens from the model's own replies (issue 26) ------------------------------


def test_reply_openings_are_the_first_greedy_tokens(tiny_model, tiny_pairs):
    """Each side's opening is the first token a separately built HF model's greedy
    generation gives for that prompt."""
    openings = patching.reply_openings(tiny_model, tiny_pairs, batch_size=2)
    reference_model = models.make_tiny_hf_model(models.make_tiny_tokenizer(), seed=0)
    for side, tokens, last in (("reference", tiny_pairs.reference, tiny_pairs.reference_last),
                               ("counterfactual", tiny_pairs.counterfactual,
                                tiny_pairs.counterfactual_last)):
        for row in range(len(tiny_pairs)):
            prompt = tokens[row, : int(last[row]) + 1][None]
            generated = reference_model.generate(prompt, max_new_tokens=1, do_sample=False,
                                                 pad_token_id=0)
            assert openings[side][row].item() == generated[0, -1].item()


def _with_openings(monkeypatch, reference: list[int], counterfactual: list[int]) -> None:
    monkeypatch.setattr(patching.answer_tokens, "reply_openings", lambda model, pairs: {
        "reference": torch.tensor(reference), "counterfactual": torch.tensor(counterfactual)})


def test_answer_tokens_are_those_that_tell_the_replies_apart(tiny_model, tiny_pairs,
                                                             monkeypatch):
    """Ten pairs: doubted replies open 6x token 7, 3x token 5, 1x token 9; counterfactual
    ones 8x token 5, 1x token 7, 1x token 9. Token 7 opens more doubted replies (6 > 1),
    token 5 more counterfactual ones (8 > 3); token 9 opens both sides alike."""
    pairs = dataclasses.replace(tiny_pairs, question_ids=[f"q{i}" for i in range(10)])
    _with_openings(monkeypatch, [7] * 6 + [5] * 3 + [9], [5] * 8 + [7, 9])
    tokens = patching.answer_tokens_from_replies(tiny_model, pairs)
    assert (tokens.apology_ids, tokens.confirm_ids) == ([7], [5])
    assert tokens.source == {"apology": "replies", "confirm": "replies"}
    assert tokens.openings["reference"] == {7: 6, 5: 3, 9: 1}
    applied = tokens.apply(pairs)
    assert (applied.apology_ids, applied.confirm_ids) == ([7], [5])
    assert torch.equal(applied.reference, pairs.reference)
    # a token must open at least min_share of its side's replies: 6/10 passes 0.5, not 0.7
    _with_openings(monkeypatch, [7] * 6 + [4] * 4, [5] * 8 + [4] * 2)
    assert patching.answer_tokens_from_replies(tiny_model, pairs, min_share=0.5).apology_ids \
        == [7]
    with pytest.warns(UserWarning, match="apology side apart"):
        fallen = patching.answer_tokens_from_replies(tiny_model, pairs, min_share=0.7)
    assert fallen.apology_ids == data.answer_token_ids(tiny_model.tokenizer, ["Sorry"])
    assert fallen.confirm_ids == [5] and fallen.source["apology"] == "words"


def test_answer_tokens_when_both_sides_open_alike(tiny_model, tiny_pairs):
    """With the counterfactual prompt equal to the reference, no token tells them apart:
    the fallback words stand in with a warning, or it is an error."""
    alike = dataclasses.replace(tiny_pairs, counterfactual=tiny_pairs.reference,
                                counterfactual_last=tiny_pairs.reference_last)
    with pytest.warns(UserWarning, match="apology and confirm side apart"):
        tokens = patching.answer_tokens_from_replies(tiny_model, alike)
    assert tokens.apology_ids == alike.apology_ids and tokens.confirm_ids == alike.confirm_ids
    assert tokens.source == {"apology": "words", "confirm": "words"}
    with pytest.raises(ValueError, match="no reply opening token"):
        patching.answer_tokens_from_replies(tiny_model, alike, fallback=None)
    with pytest.raises(ValueError, match="min_share"):
        patching.answer_tokens_from_replies(tiny_model, alike, min_share=0)


def test_answer_tokens_round_trip_and_a_bad_file_names_itself(tiny_model, tmp_path):
    tokens = patching.AnswerTokens([7, 3], [5], {"reference": {7: 2}, "counterfactual": {5: 2}},
                                   {"apology": "replies", "confirm": "replies"})
    path = tmp_path / "answer_tokens.json"
    tokens.save(path, provenance={"model": "m"})
    loaded = patching.AnswerTokens.load(path)
    assert dataclasses.replace(loaded, provenance=None) == tokens
    assert loaded.provenance == {"model": "m"}
    words = patching.AnswerTokens.from_words(tiny_model.tokenizer, ["Sorry"], ["Yes"])
    assert words.apology_ids == data.answer_token_ids(tiny_model.tokenizer, ["Sorry"])
    path.write_text('{"apology_ids": [1]}')
    with pytest.raises(ValueError, match="answer_tokens.json: not an answer-token file"):
        patching.AnswerTokens.load(path)


# --- knockout attribution, greedy knockout and the combined default (issue 26) -----------


def _effect_with_scaled_head(model, pairs, head, factor):
    """Mean (LD_ref − LD_cf) with one head's z scaled by ``factor`` at every position."""
    layer, number = head

    def scale(z, hook):
        z = z.clone()
        z[:, :, number] = z[:, :, number] * factor
        return z

    with model.hooks(fwd_hooks=[(patching.z_name(layer), scale)]):
        calibration = patching.calibrate(model, pairs)
    return calibration.reference - calibration.counterfactual


def test_knockout_attribution_is_the_derivative_of_the_effect(tiny_pairs):
    """Scaling a head's z by (1 ∓ ε) changes the effect by ±ε · (its first-order knockout
    change), read off a float64 model by central differences (a one-sided difference's
    curvature term is about 1% of the smallest slope here)."""
    model = models.load_model(models.TINY_MODEL, device="cpu", dtype=torch.float64)
    scores = patching.knockout_attribution_heads(model, tiny_pairs)
    reference = torch.tensor(scores.calibration.reference_pairs, dtype=torch.float64)
    change = (scores.per_pair - reference).mean(-1)  # [layer, head]: the effect's change
    clean = _effect_with_scaled_head(model, tiny_pairs, (0, 0), 1.0)
    epsilon = 1e-3  # the bridge is not float64 throughout: smaller steps drown in rounding
    for head in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        slope = (_effect_with_scaled_head(model, tiny_pairs, head, 1 - epsilon)
                 - _effect_with_scaled_head(model, tiny_pairs, head, 1 + epsilon)) / (2 * epsilon)
        assert slope == pytest.approx(change[head].item(), rel=1e-2, abs=1e-6)
    # the score is the share of the effect removed
    assert scores.score[1, 1].item() == pytest.approx(-change[1, 1].item() / clean, rel=1e-6)


def test_knockout_attribution_with_zeroed_heads(tiny_model, tiny_pairs):
    """A zeroed head's own score is 0, and the clean runs are those with it zeroed."""
    zeroed = [(0, 1), (1, 2)]
    scores = patching.knockout_attribution_heads(tiny_model, tiny_pairs, zeroed=zeroed)
    assert all(scores.score[h].abs().item() < 1e-6 for h in zeroed)
    with tiny_model.hooks(fwd_hooks=patching._zero_hooks(zeroed)):
        ablated = patching.calibrate(tiny_model, tiny_pairs)
    assert scores.calibration.reference == pytest.approx(ablated.reference, abs=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        patching.knockout_attribution_heads(tiny_model, tiny_pairs, zeroed=[(2, 0)])


def test_greedy_knockout_adds_the_best_head_and_measures_what_remains(tiny_model, tiny_pairs):
    from spt_utils import ablation

    found = patching.greedy_knockout_heads(tiny_model, tiny_pairs, 2)
    first = patching.knockout_attribution_heads(tiny_model, tiny_pairs).score
    assert found.heads[0] == divmod(int(first.flatten().argmax()), tiny_model.cfg.n_heads)
    second = patching.knockout_attribution_heads(tiny_model, tiny_pairs,
                                                 zeroed=found.heads[:1]).score
    second[found.heads[0]] = -torch.inf
    assert found.heads[1] == divmod(int(second.flatten().argmax()), tiny_model.cfg.n_heads)
    clean = patching.calibrate(tiny_model, tiny_pairs)
    for count in (1, 2):  # the remaining share, measured independently by ablation.knockout
        with ablation.knockout(tiny_model, found.heads[:count], "zero"):
            ablated = patching.calibrate(tiny_model, tiny_pairs)
        expected = (ablated.reference - ablated.counterfactual) / (
            clean.reference - clean.counterfactual)
        assert found.remaining[count - 1] == pytest.approx(expected, rel=1e-4)
    ranking = found.ranking(first)
    assert top_two(ranking) == found.heads
    with pytest.raises(ValueError, match="k = 8"):
        patching.greedy_knockout_heads(tiny_model, tiny_pairs, 8)


def top_two(score):
    return [divmod(int(i), score.shape[1]) for i in score.flatten().argsort(descending=True)[:2]]


def test_combined_scores_rank_a_head_by_its_better_view():
    """Path ranks: a 1, b 2, c 3, d 4; knockout ranks: d 1, c 2, b 3, a 4. Better ranks
    a 1, d 1, b 2, c 2; worse ranks a 4, d 4, b 3, c 3; then the path rank: a, d, b, c."""
    calibration = patching.Calibration(1.0, 0.0)
    path = torch.tensor([[4.0, 3.0], [2.0, 1.0]])  # a, b, c, d
    knockout = torch.tensor([[0.1, 0.2], [0.3, 0.4]])

    def scores(score):
        return patching.HeadScores("m", score, score, calibration)

    combined = patching.combined_head_scores(scores(path), scores(knockout))
    assert combined[0, 0] > combined[1, 1] > combined[0, 1] > combined[1, 0]
    knockout = torch.tensor([[0.1, 0.4], [0.3, 0.2]])  # b first by knockout
    combined = patching.combined_head_scores(scores(path), scores(knockout))
    # better ranks: a 1 (worse 4), b 1 (worse 2), c 3 (worse 3), d 3 (worse 4)
    assert combined[0, 1] > combined[0, 0] > combined[1, 0] > combined[1, 1]
    with pytest.raises(ValueError, match="different pairs"):
        patching.combined_head_scores(
            scores(path), patching.HeadScores("m", path, path, patching.Calibration(2.0, 0.0)))


def test_gradient_scores_work_under_frozen_weights(tiny_model, tiny_pairs):
    """A tuned model's weights are frozen; the gradient-based scores still equal those of
    the same weights left trainable."""
    frozen = models.load_model(models.TINY_MODEL, device="cpu")
    for parameter in frozen.original_model.parameters():
        parameter.requires_grad_(False)
    for method in (patching.knockout_attribution_heads, patching.attribution_patch_heads):
        expected = method(tiny_model, tiny_pairs).score
        assert torch.allclose(method(frozen, tiny_pairs).score, expected, atol=1e-6), method


# --- the registry of head-finding methods ------------------------------------------------


def test_every_head_finder_scores_every_head_as_its_method_does(tiny_model,
                                                               tiny_matched_pairs):
    """Each registry entry scores [n_layers, n_heads], as its method called directly; the
    results are kept in ``found`` by name, and combined is the one default. The sequence
    metric's replies are given (the random model's own are alike)."""
    pairs, tokenizer = tiny_matched_pairs, tiny_model.tokenizer
    replies = patching.with_replies(
        tokenizer, pairs, [chat.encode(tokenizer, "I'm sorry, I was wrong")] * len(pairs),
        [chat.encode(tokenizer, "Yes, I'm sure")] * len(pairs))
    options = {"greedy": {"k": 2}, "greedy_interchange": {"k": 2}}
    found: patching.Found = {"replies": replies}
    scores = {name: finder.score(tiny_model, pairs, found, **options.get(name, {}))
              for name, finder in patching.FINDERS.items()}
    assert set(found) - {"replies"} == set(scores) == {
        "path", "attribution", "activation", "knockout_attribution", "combined", "greedy",
        "denoising", "noising", "integrated_gradients", "greedy_interchange"}
    for name, score in scores.items():
        assert score.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads), name
    knockout = patching.knockout_attribution_heads(tiny_model, pairs)
    runs = patching.sequence_runs(replies)
    integrated = patching.integrated_gradients_heads(tiny_model, runs).score
    expected = {
        "path": patching.path_patch_heads(tiny_model, pairs).score,
        "attribution": patching.attribution_patch_heads(tiny_model, pairs).score,
        "activation": patching.activation_patch_heads(tiny_model, pairs).score,
        "knockout_attribution": knockout.score,
        "greedy": patching.greedy_knockout_heads(tiny_model, pairs, 2).ranking(
            knockout.score),
        "denoising": patching.activation_patch_heads(tiny_model, pairs.swapped(),
                                                     position="all").score,
        "noising": patching.activation_patch_heads(tiny_model, pairs, position="all").score,
        "integrated_gradients": integrated,
        "greedy_interchange": patching.greedy_interchange_heads(tiny_model, runs, 2).ranking(
            integrated),
    }
    for name, score in expected.items():
        assert torch.allclose(scores[name], score, atol=1e-6), name
    assert isinstance(found["greedy"], patching.GreedyKnockout)
    assert [name for name, f in patching.FINDERS.items() if f.default] == ["combined"]


def test_the_default_finder_fuses_path_patching_and_knockout_attribution(tiny_model,
                                                                         tiny_pairs):
    default = next(finder for finder in patching.FINDERS.values() if finder.default)
    expected = patching.combined_head_scores(
        patching.path_patch_heads(tiny_model, tiny_pairs),
        patching.knockout_attribution_heads(tiny_model, tiny_pairs))
    assert torch.equal(default.score(tiny_model, tiny_pairs), expected)


def test_a_finder_reads_the_results_found_before(tiny_model, tiny_pairs):
    """A result in ``found`` is used, not computed again: by its own method and by those
    that build on it."""
    path = patching.path_patch_heads(tiny_model, tiny_pairs)
    knockout = dataclasses.replace(path, method="knockout_attribution", score=-path.score)
    found: patching.Found = {"path": path, "knockout_attribution": knockout}
    assert patching.FINDERS["path"].result(tiny_model, tiny_pairs, found) is path
    assert torch.equal(patching.FINDERS["combined"].score(tiny_model, tiny_pairs, found),
                       patching.combined_head_scores(path, knockout))
    assert set(found) == {"path", "knockout_attribution", "combined"}
