import pytest
import torch

from spt_utils import ablation, chat, data, patching


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


def _logits(model, batch):
    return model(batch, return_type="logits")


def _n_hooks(model):
    points = {id(point): point for point in model.hook_dict.values()}  # aliases share points
    return sum(len(point.fwd_hooks) for point in points.values())


def test_empty_knockout_is_the_identity(tiny_model, pairs, means):
    before = _logits(tiny_model, pairs.reference)
    with ablation.knockout(tiny_model, [], "mean", means=means):
        inside = _logits(tiny_model, pairs.reference)
    assert torch.equal(before, inside)


@pytest.mark.parametrize("method", ablation.METHODS)
def test_knockout_changes_logits_and_hooks_go_away(tiny_model, pairs, means, donors, method):
    before = _logits(tiny_model, pairs.reference)
    hooks_before = _n_hooks(tiny_model)
    with ablation.knockout(tiny_model, [(1, 2), (0, 1)], method, means=means, donors=donors):
        assert _n_hooks(tiny_model) == hooks_before + 2
        inside = _logits(tiny_model, pairs.reference)
    assert not torch.allclose(before, inside)
    assert _n_hooks(tiny_model) == hooks_before
    assert torch.equal(_logits(tiny_model, pairs.reference), before)


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
    with ablation.knockout(tiny_model, [(0, 1)], "zero"):
        # the cache hook runs after the knockout's, so it records the ablated z
        _, ablated = tiny_model.run_with_cache(pairs.reference, names_filter=[name])
    z, z_clean = ablated[name], clean[name]  # z: [batch, pos, head, d_head]
    assert z[:, :, 1].abs().sum() == 0 and z_clean[:, :, 1].abs().sum() > 0
    assert torch.equal(z[:, :, [0, 2, 3]], z_clean[:, :, [0, 2, 3]])


def test_mean_ablation_writes_the_stored_means(tiny_model, pairs, means):
    name = patching.z_name(1)
    seen = {}
    hooks = [(name, lambda z, hook: seen.setdefault("z", z.clone()))]
    with ablation.knockout(tiny_model, [(1, 3)], "mean", means=means):
        with tiny_model.hooks(fwd_hooks=hooks):
            tiny_model(pairs.reference)
    expected = means.z[1, 3].expand_as(seen["z"][:, :, 3])
    assert torch.allclose(seen["z"][:, :, 3], expected)


def test_means_are_over_real_positions_and_round_trip(tiny_model, prompts, means, tmp_path):
    alone = ablation.collect_z(tiny_model, prompts[:1])[0]
    assert alone.shape == (len(prompts[0]), 2, 4, 16)
    batched = ablation.collect_z(tiny_model, prompts, batch_size=6)
    assert torch.allclose(batched[0], alone, atol=1e-5)
    assert means.n_positions == sum(len(p) for p in prompts)
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
    wrong = ablation.HeadMeans(torch.zeros(3, 4, 16), n_prompts=1, n_positions=1)
    with pytest.raises(ValueError, match="HeadMeans.z has shape"):
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
        with ablation.knockout(tiny_model, heads, "mean", means=means):
            logits = patching.last_position_logits(
                tiny_model, pairs.reference, pairs.reference_last
            )
        expected = patching.answer_logit_diff(logits, pairs.apology_ids, pairs.confirm_ids)
        assert torch.allclose(row, expected, atol=1e-4)
        assert not torch.allclose(row, clean, atol=1e-4)


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
    calibration = patching.calibrate(tiny_model, pairs)
    scores = torch.arange(8.0).reshape(2, 4)
    ranking = [(1, 3), (1, 2), (1, 1)]
    assert ablation.bottom_heads(scores, ranking, 2) == [(0, 0), (0, 1)]
    assert ablation.bottom_heads(-scores, [(0, 0)], 1) == [(1, 3)]
    result = ablation.sweep(tiny_model, pairs, calibration, ranking, ks=[1, 2], n_random=3,
                            scores=scores, means=means, progress=False)
    assert [r["k"] for r in result["by_k"]] == [0, 1, 2]
    assert abs(result["by_k"][0]["top"]) < 1e-4  # nothing ablated: the reference, 0
    assert len([s for s in result["sets"] if s["kind"] == "random"]) == 6
    band = result["by_k"][2]["random"]
    assert band["low"] <= band["mean"] <= band["high"] and band["n"] == 3
    ablation.plot_sweep(result, [{"k": 1, "kind": "top", "apology_rate": 0.5}])
    with pytest.raises(ValueError, match=r"ks = \[1, 4\] must lie in"):
        ablation.sweep(tiny_model, pairs, calibration, ranking, ks=[4, 1], means=means)


def test_random_sets_are_seeded_and_distinct():
    first = ablation.random_head_sets(3, 5, 30, 9, seed=0)
    assert first == ablation.random_head_sets(3, 5, 30, 9, seed=0)
    assert first != ablation.random_head_sets(3, 5, 30, 9, seed=1)
    assert all(len(set(s)) == 3 for s in first)


def test_generation_summary():
    records = [
        {"correct_before": True, "apologized": True, "correct_after": False},
        {"correct_before": True, "apologized": False, "correct_after": True},
        {"correct_before": False, "apologized": True, "correct_after": True},
    ]
    summary = ablation.generation_summary(records)
    assert summary["apology_rate"] == 0.5 and summary["accuracy_after"] == 2 / 3
    assert summary["apology_rate_all"] == 2 / 3 and summary["accuracy_before"] == 2 / 3
    with pytest.raises(ValueError, match="no records"):
        ablation.generation_summary([])

