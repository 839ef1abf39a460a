"""The tuning sweep (settings trained from the same base weights, restored after each) and
per-document KL drift (the unit of its intervals)."""

from __future__ import annotations

import pytest
import torch
import tuning_ddp_worker as worker

from spt_utils import evaluation, models, tuning

DOCS = ["The lighthouse keeper climbed the stairs.", "Bread needs flour, water and salt to rise.",
        "A short notice."]


def fresh_tiny():
    return models.load_model(models.TINY_MODEL, device="cpu")


def test_kl_per_document_sums_to_the_mean_and_counts_tokens():
    base, other = fresh_tiny(), models.load_model(models.TINY_MODEL, device="cpu", seed=1)
    rows = evaluation.kl_per_document(base, other, DOCS, batch_size=2)
    lengths = [len(base.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    assert [n for _, n in rows] == lengths
    for (total, n), doc in zip(rows, DOCS, strict=True):  # each alone, unpadded
        assert total / n == pytest.approx(evaluation.kl_drift(base, other, [doc]), rel=1e-4)
    mean = sum(t for t, _ in rows) / sum(lengths)
    assert evaluation.kl_drift(base, other, DOCS, batch_size=3) == pytest.approx(mean, rel=1e-5)
    assert [n for _, n in evaluation.kl_per_document(base, other, DOCS, max_tokens=4)] == [
        min(n, 4) for n in lengths]
    assert all(t == 0.0 for t, _ in evaluation.kl_per_document(base, base, DOCS))


def _plain_logits(model, ids, offset: int = 0):
    # logits: [batch, (virtual tokens +) pos, d_vocab]
    return model(input_ids=ids).logits[:, offset:].detach()


def test_sweep_matches_single_runs_and_restores_the_base():
    bridge = fresh_tiny()
    examples = tuning.prepare_examples(bridge.tokenizer, worker.conversations())
    before = {n: t.clone() for n, t in models.clean_state_dict(bridge.original_model).items()}
    ids = examples[0][0][None]
    base_logits = bridge(ids, return_type="logits").detach()
    settings = [tuning.SweepSetting("spt", 1e-2, 2, [(1, 0), (1, 3)]),
                tuning.SweepSetting("sft", 1e-3, 2),
                tuning.SweepSetting("lora_attn", 1e-2, 2),
                tuning.SweepSetting("prompt_tuning", 1e-1, 2),
                tuning.SweepSetting("spt", 1e-2, 2, [(0, 1)], include_kv=True, label="draw 0")]
    seen = []

    def evaluate(setting, hf_model):  # runs while the tuned model is in place
        bridge_logits = bridge(ids, return_type="logits").detach()
        if setting.method == "prompt_tuning":
            assert torch.equal(bridge_logits, base_logits)  # the soft prompt is not in the bridge
            tuned = _plain_logits(hf_model, ids)
        else:
            assert hf_model is None
            tuned = bridge_logits
        seen.append(tuned)
        return {"moved": float((tuned[:, -ids.shape[1]:] - base_logits).abs().max())}

    streamed = []
    rows = tuning.sweep(bridge, examples, settings, evaluate, batch_size=2, micro_batch_size=1,
                        progress=False, on_row=streamed.append)
    assert streamed == rows and len(rows) == len(settings)
    assert all(r["moved"] > 0 for r in rows)
    assert [r["name"] for r in rows] == [
        "spt k=2 lr=0.01 steps=2", "sft lr=0.001 steps=2", "lora_attn lr=0.01 steps=2",
        "prompt_tuning lr=0.1 steps=2", "spt+kv k=1 draw 0 lr=0.01 steps=2"]
    after = models.clean_state_dict(bridge.original_model)
    assert set(after) == set(before)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not p.requires_grad for p in bridge.original_model.parameters())
    assert torch.equal(bridge(ids, return_type="logits"), base_logits)
    for setting, row, tuned in zip(settings, rows, seen, strict=True):  # each run alone
        alone = tuning.prepare(setting.method, fresh_tiny(), setting.heads,
                               include_kv=setting.include_kv)
        config = tuning.TrainConfig(steps=2, batch_size=2, micro_batch_size=1, lr=setting.lr)
        assert tuning.train(alone, examples, config, progress=False).losses == row["losses"]
        if setting.method == "prompt_tuning":
            expected = _plain_logits(alone.model, ids)
        else:
            expected = _plain_logits(tuning.finalize(alone), ids)
        torch.testing.assert_close(tuned, expected, rtol=1e-5, atol=1e-5)


def test_sweep_refuses_an_unsupported_method():
    with pytest.raises(ValueError, match="sweep: method 'lora_heads'"):
        tuning.sweep(fresh_tiny(), [], [tuning.SweepSetting("lora_heads", 1e-3, 1)],
                     lambda s, m: {})
