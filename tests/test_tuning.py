"""Pinpoint tuning: head-sparse parameters, the loop, resume, DDP, export and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tuning_ddp_worker as worker
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from single_thread import one_thread
from transformers import AutoModelForCausalLM

from spt_utils import chat, models, tuning

SPT_CONFIG = tuning.TrainConfig(steps=3, batch_size=4, micro_batch_size=2, lr=1e-2,
                                weight_decay=0.1)


def fresh_tiny():
    return models.load_model(models.TINY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def tiny_examples():
    return tuning.prepare_examples(fresh_tiny().tokenizer, worker.conversations())


def snapshot(hf_model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in models.clean_state_dict(hf_model).items()}


def slice_mask(shape, proj: str, numbers: list[int], d_head: int) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for number in numbers:
        span = slice(number * d_head, (number + 1) * d_head)
        if proj == "o_proj":
            mask[:, span] = True
        else:
            mask[span] = True
    return mask


def assert_only_slices_changed(before, after, heads, d_head, group_size, include_kv):
    """Untouched tensors and entries bit-identical; every selected slice changed."""
    touched: dict[str, list[int]] = {}
    for layer, head in heads:
        prefix = f"model.layers.{layer}.self_attn."
        for proj in ("q_proj", "o_proj"):
            touched.setdefault(prefix + proj + ".weight", []).append(head)
        if include_kv:
            for proj in ("k_proj", "v_proj"):
                touched.setdefault(prefix + proj + ".weight", []).append(head // group_size)
    assert set(before) == set(after)
    for name, old in before.items():
        new = after[name]
        if name not in touched:
            assert torch.equal(old, new), f"{name} changed"
            continue
        proj = name.split(".")[-2]
        mask = slice_mask(old.shape, proj, touched[name], d_head)
        assert torch.equal(old[~mask], new[~mask]), f"{name}: entries outside the heads moved"
        for number in touched[name]:
            own = slice_mask(old.shape, proj, [number], d_head)
            assert not torch.equal(old[own], new[own]), f"{name}: slice {number} did not train"


def test_spt_trains_only_the_slices_with_weight_decay(tiny_examples):
    bridge = fresh_tiny()
    before = snapshot(bridge.original_model)
    heads = [(0, 1), (1, 0), (1, 1)]  # (1, 0) and (1, 1) share KV group 0
    setup = tuning.prepare("spt", bridge, heads, include_kv=True)
    assert sorted(n for n in setup.params if ".k_proj." in n) == [
        "layers.0.k_proj.group0", "layers.1.k_proj.group0"]
    assert all(not p.requires_grad for p in bridge.original_model.parameters())
    tuning.train(setup, tiny_examples, SPT_CONFIG, progress=False)
    tuning.finalize(setup)
    assert_only_slices_changed(before, snapshot(bridge.original_model), heads, d_head=16,
                               group_size=2, include_kv=True)


def test_optimizer_state_covers_only_the_slices(tiny_examples):
    setup = tuning.prepare("spt", fresh_tiny(), [(1, 2)])
    optimizer = tuning._optimizer(setup, SPT_CONFIG)
    setup.model(input_ids=tiny_examples[0][0][None]).logits.sum().backward()
    optimizer.step()
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.ndim)
    assert state == 2 * (16 * 64 + 64 * 16)  # exp_avg + exp_avg_sq of one q and one o slice
    # the figure train() reports (and the benchmark prints): the same tensors plus the
    # per-parameter step counters, in bytes
    result = tuning.train(tuning.prepare("spt", fresh_tiny(), [(1, 2)]), tiny_examples,
                          tuning.TrainConfig(steps=1, batch_size=2), progress=False)
    n_steps = len(setup.params)  # one scalar step counter per trained slice
    assert result.optimizer_state_bytes == 4 * (state + n_steps)


@pytest.mark.integration
def test_spt_bit_identity_on_smollm2():
    bridge = models.load_model(device="cpu")
    before = snapshot(bridge.original_model)
    heads = [(5, 3), (12, 0), (12, 1)]
    setup = tuning.prepare("spt", bridge, heads, include_kv=True)
    examples = tuning.prepare_examples(bridge.tokenizer, worker.conversations(2))
    config = tuning.TrainConfig(steps=1, batch_size=2, micro_batch_size=2, lr=1e-3,
                                warmup_ratio=0.0)
    tuning.train(setup, examples, config, progress=False)
    tuning.finalize(setup)
    assert_only_slices_changed(before, snapshot(bridge.original_model), heads, d_head=64,
                               group_size=3, include_kv=True)


def test_loss_counts_only_the_final_assistant_turn(tiny_examples):
    ids, mask = tiny_examples[0]
    logits = torch.randn(1, len(ids) - 1, 407)
    expected = torch.nn.functional.cross_entropy(
        logits[0][mask[1:] == 1], ids[1:][mask[1:] == 1], reduction="sum")
    got = tuning.masked_loss_sum(logits, ids[None, 1:], mask[None, 1:])
    assert torch.allclose(got, expected)
    assert 0 < mask.sum() < len(mask) and mask[-1] == 1
    # Through the model: only the unembedded positions that predict masked tokens count.
    setup = tuning.prepare("sft", fresh_tiny())
    full = setup.model(input_ids=ids[None]).logits[:, :-1]
    loss = tuning.evaluate_loss(setup, [tiny_examples[0]])
    expected = tuning.masked_loss_sum(full, ids[None, 1:], mask[None, 1:]) / mask[1:].sum()
    assert abs(loss - expected.item()) < 1e-5


def test_padding_does_not_change_the_gradient(tiny_examples):
    """One micro-batch of 4 (right-padded) and four of 1 give the same update."""
    grads = []
    for micro in (4, 1):
        setup = tuning.prepare("spt", fresh_tiny(), [(1, 3)])
        for index in range(0, 4, micro):
            loss = tuning.final_turn_loss_sum(setup, tiny_examples[index : index + micro],
                                    torch.autocast("cpu", enabled=False))
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in setup.params.values()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_resume_reaches_bit_identical_weights(tiny_examples, tmp_path):
    config = tuning.TrainConfig(steps=5, batch_size=3, micro_batch_size=2, lr=1e-2,
                                checkpoint_every=2, eval_every=1)
    heads = [(0, 0), (1, 3)]

    def run(folder, eval_fn, resume=False):
        setup = tuning.prepare("spt", fresh_tiny(), heads, include_kv=True)
        result = tuning.train(setup, tiny_examples, config, checkpoint_dir=folder,
                              resume=resume, eval_fn=eval_fn, progress=False)
        return setup, result

    full, full_result = run(tmp_path / "full", lambda step: {"seen": step})

    def killed_at_three(step):
        if step == 3:
            raise KeyboardInterrupt
        return {"seen": step}

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", killed_at_three)
    assert tuning.latest_checkpoint(tmp_path / "killed").name == "step-000002"
    resumed, resumed_result = run(tmp_path / "killed", lambda step: {"seen": step}, resume=True)
    for name, parameter in full.params.items():
        assert torch.equal(parameter, resumed.params[name]), name
    assert resumed_result.losses == full_result.losses
    assert [e["step"] for e in resumed_result.evals] == [1, 2, 3, 4, 5]


def torchrun(args: list[str], timeout: int = 300) -> None:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on CPU (gloo), one thread a rank."""
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--standalone", *args], check=True, env=env, cwd=repo, timeout=timeout)


def test_ddp_steps_match_across_ranks_and_a_single_process(tmp_path):
    """Per step: both ranks apply the same gradient and report the same loss, equal to one
    process's; with SGD (no clipping) as well as AdamW, which hides a uniform scale."""
    out = tmp_path / "ddp"
    torchrun([str(Path(worker.__file__)), str(out)])
    ranks = [load_file(f"{out}.rank{rank}") for rank in range(2)]
    assert set(ranks[0]) == set(ranks[1])
    for name in worker.OPTIMIZERS:
        with one_thread():  # as each rank ran
            single = worker.train_recorded(name)
        steps = {key.split(".")[0] for key in single if key.startswith("step")}
        assert len(steps) == worker.CONFIG.steps and len(single["loss"]) == worker.CONFIG.steps
        for key, expected in single.items():
            got = [rank[f"{name}.{key}"] for rank in ranks]
            # the all-reduce hands every rank the same sum
            assert torch.equal(got[0], got[1]), f"{name} {key}: ranks differ"
            # only the order of the gradient sums differs from one process
            assert torch.allclose(got[0], expected, rtol=1e-4, atol=1e-7), f"{name} {key}"
            assert expected.abs().sum() > 0, f"{name} {key} is zero: nothing is compared"


def test_tuning_command_line_under_torchrun_matches_one_process(tmp_path):
    from spt_utils import io, patching

    runs = {}
    for kind in ("single", "torchrun"):
        run_dir = tmp_path / kind
        tokenizer = models.make_tiny_tokenizer()
        patching.save_heads(run_dir / "heads.json", [(1, 1)], provenance=io.provenance(
            models.TINY_MODEL, tokenizer, profile=None, seed=0))
        records = [{"id": str(i), "kind": "insist", "source": "test", "messages": c}
                   for i, c in enumerate(worker.conversations(4))]
        io.write_jsonl(run_dir / "data" / "train.jsonl", records)
        args = ["--model", models.TINY_MODEL, "--run-dir", str(run_dir), "--steps", "2",
                "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-2"]
        if kind == "single":
            tuning.main(args)
        else:
            torchrun(["-m", "spt_utils.tuning", *args])
        runs[kind] = load_file(str(run_dir / "tuned" / "spt" / "model.safetensors"))
    base = snapshot(fresh_tiny().original_model)
    q_name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(runs["single"][q_name], base[q_name])  # it trained
    for name, tensor in runs["single"].items():
        assert torch.allclose(runs["torchrun"][name], tensor, atol=1e-6, rtol=0), name


def test_failed_save_never_replaces_a_good_checkpoint(tiny_examples, tmp_path, monkeypatch):
    setup = tuning.prepare("spt", fresh_tiny(), [(0, 2)])
    config = tuning.TrainConfig(steps=2, batch_size=2, checkpoint_every=1)
    tuning.train(setup, tiny_examples, config, checkpoint_dir=tmp_path, progress=False)
    good = tuning.latest_checkpoint(tmp_path)
    weights = (good / tuning.CHECKPOINT_WEIGHTS).read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tuning.checkpoints, "save_file", broken_save)  # where it is called
    with pytest.raises(OSError, match="disk full"):
        tuning.train(setup, tiny_examples, tuning.TrainConfig(steps=3, batch_size=2,
                     checkpoint_every=1), checkpoint_dir=tmp_path, resume=True, progress=False)
    assert tuning.latest_checkpoint(tmp_path) == good
    assert (good / tuning.CHECKPOINT_WEIGHTS).read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_corrupt_checkpoint_is_a_clear_error(tiny_examples, tmp_path):
    config = tuning.TrainConfig(steps=1, batch_size=2, checkpoint_every=1)
    setup = tuning.prepare("spt", fresh_tiny(), [(0, 2)])
    tuning.train(setup, tiny_examples, config, checkpoint_dir=tmp_path, progress=False)
    weights = tmp_path / "step-000001" / tuning.CHECKPOINT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:50])
    again = tuning.prepare("spt", fresh_tiny(), [(0, 2)])
    with pytest.raises(tuning.CheckpointError, match="trainable.safetensors: corrupt"):
        tuning.train(again, tiny_examples, config.__class__(steps=2, batch_size=2),
                     checkpoint_dir=tmp_path, resume=True, progress=False)


def test_checkpoint_of_another_run_is_refused(tiny_examples, tmp_path):
    config = tuning.TrainConfig(steps=1, batch_size=2, checkpoint_every=1)
    tuning.train(tuning.prepare("spt", fresh_tiny(), [(0, 2)]), tiny_examples, config,
                 checkpoint_dir=tmp_path, progress=False)
    other = tuning.prepare("spt", fresh_tiny(), [(1, 1)])
    with pytest.raises(tuning.CheckpointError, match=r"field 'heads' is \[\[0, 2\]\]"):
        tuning.train(other, tiny_examples, tuning.TrainConfig(steps=2, batch_size=2),
                     checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("method", ["spt", "lora_heads"])
def test_bad_head_sets(method):
    with pytest.raises(ValueError, match="head set is empty"):
        tuning.prepare(method, fresh_tiny(), [])
    with pytest.raises(ValueError, match=r"heads\[1\] = L2H0 is out of range"):
        tuning.prepare(method, fresh_tiny(), [(0, 0), (2, 0)])
    with pytest.raises(ValueError, match="out of range"):
        tuning.prepare(method, fresh_tiny(), [(0, 4)])


def logits_of(model, ids, offset: int = 0):
    """Logits of one sequence; ``offset`` drops a soft prompt's positions."""
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[:, offset:]


def test_spt_export_and_head_delta_round_trips(tiny_examples, tmp_path):
    bridge = fresh_tiny()
    setup = tuning.prepare("spt", bridge, [(0, 1), (1, 2)], include_kv=True)
    tuning.train(setup, tiny_examples, SPT_CONFIG, progress=False)
    ids = tiny_examples[1][0]
    tuned_logits = logits_of(setup.model, ids)
    deltas = tuning.save_head_deltas(tmp_path / "heads.safetensors", setup,
                                     base_model=models.TINY_MODEL)
    folder = tuning.export_hf(setup, bridge.tokenizer, tmp_path / "spt",
                              base_model=models.TINY_MODEL)
    reloaded, hf_model = tuning.load_tuned(folder)
    assert torch.equal(logits_of(hf_model, ids), tuned_logits)
    assert torch.equal(reloaded(ids[None], return_type="logits"), tuned_logits)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    assert torch.equal(logits_of(plain, ids), tuned_logits)
    base = fresh_tiny()
    assert not torch.equal(logits_of(base.original_model, ids), tuned_logits)
    metadata = tuning.apply_head_deltas(base.original_model, deltas)
    assert metadata["heads"] == "[[0, 1], [1, 2]]" and metadata["d_head"] == "16"
    assert torch.equal(logits_of(base.original_model, ids), tuned_logits)
    assert deltas.stat().st_size < (folder / "model.safetensors").stat().st_size / 4


@pytest.mark.parametrize("method", ["sft", "lora_attn", "lora_heads", "prompt_tuning"])
def test_baseline_export_round_trips(method, tiny_examples, tmp_path):
    bridge = fresh_tiny()
    before = snapshot(bridge.original_model)
    setup = tuning.prepare(method, bridge, [(1, 2)], n_virtual_tokens=4)
    config = tuning.TrainConfig(steps=2, batch_size=2, lr=1e-2)
    result = tuning.train(setup, tiny_examples, config, progress=False)
    assert len(result.losses) == 2
    ids = tiny_examples[1][0]
    tuned_logits = logits_of(setup.model, ids, setup.logit_offset)
    folder = tuning.export_hf(setup, bridge.tokenizer, tmp_path / method,
                              base_model=models.TINY_MODEL)
    reloaded, hf_model = tuning.load_tuned(folder)
    # Merged LoRA computes W + BA as one matrix: equal up to float rounding.
    assert torch.allclose(logits_of(hf_model, ids, setup.logit_offset), tuned_logits, atol=1e-5)
    assert not torch.allclose(logits_of(fresh_tiny().original_model, ids), tuned_logits)
    if method == "lora_heads":
        assert_only_slices_changed(before, snapshot(reloaded.original_model), [(1, 2)], 16, 2,
                                   include_kv=False)
    if method == "prompt_tuning":
        assert snapshot(reloaded.original_model).keys() == before.keys()
        reply = chat.generate(reloaded, [worker.conversations(1)[0][:-1]], hf_model=hf_model,
                              max_new_tokens=3)
        assert isinstance(reply[0], str)


def test_mismatched_tokenizer_and_checkpoint(tiny_examples, tmp_path):
    bridge = fresh_tiny()
    setup = tuning.prepare("spt", bridge, [(0, 0)])
    folder = tuning.export_hf(setup, bridge.tokenizer, tmp_path / "spt",
                              base_model=models.TINY_MODEL)
    bridge.tokenizer.add_tokens(["<extra1>", "<extra2>"])
    bridge.tokenizer.save_pretrained(str(folder))
    with pytest.raises(tuning.CheckpointError, match=r"tokenizer has \d+ tokens but the model"):
        tuning.load_tuned(folder)


def test_corrupt_delta_file_and_wrong_folder(tmp_path):
    broken = tmp_path / "heads.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(tuning.CheckpointError, match="heads.safetensors: corrupt"):
        tuning.apply_head_deltas(fresh_tiny().original_model, broken)
    with pytest.raises(tuning.CheckpointError, match="not a tuned-model folder"):
        tuning.load_tuned(tmp_path)


def test_few_shot_prepends_alternating_demonstrations():
    conversations = worker.conversations(5)
    demos = [{"kind": "insist" if i % 2 == 0 else "revise", "messages": c}
             for i, c in enumerate(conversations[:4])]
    target = conversations[4][:-1]
    shots = tuning.few_shot_conversation(target, demos, 3)
    assert shots[0] == target[0] and shots[-3:] == target[1:]
    assert [m["role"] for m in shots].count("system") == 1
    assert len(shots) == 1 + 3 * 4 + 3
    assert shots[1:5] == demos[0]["messages"][1:] and shots[5:9] == demos[1]["messages"][1:]
    chat.tokens(fresh_tiny().tokenizer, shots)  # renders as one chat
    with pytest.raises(ValueError, match="5 demonstrations requested, 4 available"):
        tuning.few_shot_conversation(target, demos, 5)


def test_training_file_errors_name_the_record(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "kind": "insist", "messages": [{"role": "user", '
                    '"content": "hi"}]}\n')
    with pytest.raises(ValueError, match="train.jsonl: record 1"):
        tuning.load_training_conversations(path)


def test_command_line_trains_from_a_run_directory(tmp_path):
    from spt_utils import io, patching

    tokenizer = models.make_tiny_tokenizer()
    run = io.provenance(models.TINY_MODEL, tokenizer, profile=None, seed=0)
    patching.save_heads(tmp_path / "heads.json", [(1, 1)], provenance=run)
    records = [{"id": str(i), "kind": "insist", "source": "test", "messages": c}
               for i, c in enumerate(worker.conversations(3))]
    io.write_jsonl(tmp_path / "data" / "train.jsonl", records)
    args = ["--model", models.TINY_MODEL, "--run-dir", str(tmp_path), "--steps", "2",
            "--batch-size", "2", "--micro-batch-size", "1", "--checkpoint-every", "1",
            "--lr", "1e-2"]
    tuning.main(args)
    assert tuning.latest_checkpoint(tmp_path / "tuned" / "checkpoints" / "spt").name == \
        "step-000002"
    bridge, _ = tuning.load_tuned(tmp_path / "tuned" / "spt", expect=run)
    assert bridge.cfg.n_layers == 2
    # heads chosen on another model are refused before training
    patching.save_heads(tmp_path / "heads.json", [(1, 1)], provenance=dict(run, model="other"))
    with pytest.raises(io.ProvenanceError, match="heads.json: field 'provenance.model'"):
        tuning.main(args)


def test_schedule_warms_up_then_decays_to_zero():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = tuning.cosine_with_warmup(optimizer, warmup=2, steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _train_slices(examples, *, micro: int, cache: bool, layer_cache=None):
    setup = tuning.prepare("spt", fresh_tiny(), [(1, 0), (1, 3)], include_kv=True)
    config = tuning.TrainConfig(steps=3, batch_size=4, micro_batch_size=micro, lr=1e-2,
                                cache_frozen_layers=cache)
    result = tuning.train(setup, examples, config, progress=False, layer_cache=layer_cache)
    return result.losses, {name: p.detach().clone() for name, p in setup.params.items()}


@pytest.mark.parametrize("micro", [1, 2])
def test_layer_cache_gives_the_uncached_losses_and_slices(tiny_examples, micro):
    """Layer 1 holds every tuned head: layer 0 is read from the cache, bit for bit the same
    (micro-batches of 2 are right-padded: the cached inputs are padded like the ids)."""
    losses, slices = _train_slices(tiny_examples, micro=micro, cache=False)
    cached_losses, cached_slices = _train_slices(tiny_examples, micro=micro, cache=True)
    assert cached_losses == losses
    assert slices.keys() == cached_slices.keys()
    if micro == 1:
        assert all(torch.equal(slices[name], cached_slices[name]) for name in slices)
    else:  # some CPUs' kernels round a padded pair of rows apart from one row: float32 ulps,
        # which AdamW's normalised step turns into up to 2.9e-6 (measured on this machine) where
        # a gradient is near 0; 3 steps at lr 1e-2 move a slice by up to 3e-2
        for name in slices:
            torch.testing.assert_close(cached_slices[name], slices[name], atol=1e-5, rtol=0)


def test_layer_cache_skips_the_frozen_layers_and_is_shared(tiny_examples):
    layer_cache = tuning.LayerCache(tiny_examples)
    calls = []
    bridge = fresh_tiny()
    setup = tuning.prepare("spt", bridge, [(1, 2)])
    bottom = bridge.original_model.get_decoder().layers[0]
    handle = bottom.register_forward_hook(lambda *_: calls.append(1))
    config = tuning.TrainConfig(steps=3, batch_size=4, micro_batch_size=2)
    tuning.train(setup, tiny_examples, config, progress=False, layer_cache=layer_cache)
    seen = {i for step in range(3) for i in tuning.batch_indices(len(tiny_examples), 4, step, 0)}
    assert len(calls) == len(seen)  # once per distinct example, never again at a later step
    assert {index for _, index in layer_cache.inputs} == seen
    tuning.train(setup, tiny_examples, config, progress=False, layer_cache=layer_cache)
    assert len(calls) == len(seen)  # a second run on the same examples reuses every entry
    handle.remove()
    # the entries are what the steps read: corrupting them changes the loss
    for key in layer_cache.inputs:
        layer_cache.inputs[key] = torch.zeros_like(layer_cache.inputs[key])
    poisoned = tuning.train(setup, tiny_examples, config, progress=False,
                            layer_cache=layer_cache)
    clean = tuning.train(setup, tiny_examples, config, progress=False)
    assert poisoned.losses[0] != clean.losses[0]


def test_layer_cache_of_other_examples_is_refused(tiny_examples):
    setup = tuning.prepare("spt", fresh_tiny(), [(1, 2)])
    other = tuning.LayerCache(tiny_examples[:2])
    with pytest.raises(ValueError, match="layer_cache: built for other training examples"):
        tuning.train(setup, tiny_examples, tuning.TrainConfig(steps=1), progress=False,
                     layer_cache=other)
    assert tuning.first_trained_layer(setup) == 1
    assert tuning.first_trained_layer(tuning.prepare("sft", fresh_tiny())) == 0


def test_batch_indices_use_every_example_once_per_epoch():
    n_examples, batch_size = 5, 3
    order = [i for step in range(5) for i in tuning.batch_indices(n_examples, batch_size,
                                                                  step, seed=7)]
    epochs = [order[start : start + n_examples] for start in range(0, len(order), n_examples)]
    assert len(epochs) == 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n_examples))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch
    assert tuning.batch_indices(n_examples, batch_size, 3, seed=7) == order[9:12]  # no replay
    other_seed = [i for step in range(5) for i in tuning.batch_indices(5, 3, step, seed=8)]
    assert other_seed != order


def rewrite_deltas(path, tensors=None, **metadata):
    """The delta file at ``path`` with some tensors or metadata fields replaced."""
    with safe_open(str(path), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
        fields = handle.metadata()
    save_file({**stored, **(tensors or {})}, str(path), metadata={**fields, **metadata})


@pytest.mark.parametrize("change, error, message", [
    ({"format": "other/1"}, tuning.CheckpointError, "field 'format' is not"),
    ({"d_head": "8"}, tuning.CheckpointError, "field 'd_head' is 8 but the model has 16"),
    ({"n_kv_heads": "4"}, tuning.CheckpointError, "field 'n_kv_heads' is 4 but the model has 2"),
    ({"heads": "[[2, 0]]"}, ValueError, r"heads\[0\] = L2H0 is out of range"),
    ({"provenance": "{"}, tuning.CheckpointError, "field 'provenance' is not JSON"),
    ({"tensors": {"layers.0.q_proj.head1": torch.zeros(8, 64, dtype=torch.float64)}},
     tuning.CheckpointError, r"tensor 'layers.0.q_proj.head1' has shape \[8, 64\]"),
])
def test_head_delta_file_that_does_not_fit_is_refused(tmp_path, change, error, message):
    setup = tuning.prepare("spt", fresh_tiny(), [(0, 1)])
    with torch.no_grad():
        for parameter in setup.params.values():  # non-zero deltas: applying one shows
            parameter.add_(1.0)
    path = tuning.save_head_deltas(tmp_path / "deltas.safetensors", setup,
                                   base_model=models.TINY_MODEL)
    rewrite_deltas(path, **change)
    base = fresh_tiny().original_model
    before = snapshot(base)
    with pytest.raises(error, match=message):
        tuning.apply_head_deltas(base, path)
    after = snapshot(base)
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing applied
