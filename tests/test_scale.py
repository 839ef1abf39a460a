"""Issue 16 (scale): SPT, knockout and generation on a model split with accelerate (some
layers offloaded to disk), bf16 training of the head slices, and bad layouts refused."""

from __future__ import annotations

import pytest
import torch
import tuning_ddp_worker as worker
from single_thread import one_thread

from spt_utils import ablation, chat, data, models, tuning

HEADS = [(0, 1), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def examples(tiny_model):
    return tuning.prepare_examples(tiny_model.tokenizer, worker.conversations())


def trained_slices(setup) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in setup.params.items()}


def test_spt_on_a_split_model_equals_the_whole_one(examples, split_map, tmp_path):
    whole = models.load_model(models.TINY_MODEL, device="cpu")
    split = models.load_model(models.TINY_MODEL, device_map=split_map,
                              offload_folder=tmp_path / "offload")
    results = {}
    for name, bridge in (("whole", whole), ("split", split)):
        setup = tuning.prepare("spt", bridge, HEADS, include_kv=True)
        # the slices of the offloaded layer 0 live on its compute device, not on meta
        assert {p.device.type for p in setup.params.values()} == {"cpu"}
        results[name] = (setup, tuning.train(setup, examples, worker.CONFIG, progress=False))
    (whole_setup, whole_result), (split_setup, split_result) = results["whole"], results["split"]
    assert split_result.losses == pytest.approx(whole_result.losses, abs=1e-6)
    whole_slices, split_slices = trained_slices(whole_setup), trained_slices(split_setup)
    for name, value in whole_slices.items():
        assert torch.allclose(split_slices[name], value, atol=1e-6, rtol=0), name
    # only the slices hold optimizer state: the same bytes on both
    assert split_result.optimizer_state_bytes == whole_result.optimizer_state_bytes
    # offloaded weights cannot be written in place; the head deltas carry the result
    with pytest.raises(tuning.CheckpointError, match="offloaded weights"):
        tuning.finalize(split_setup)
    deltas = tuning.save_head_deltas(tmp_path / "deltas.safetensors", split_setup,
                                     base_model=models.TINY_MODEL)
    with pytest.raises(tuning.CheckpointError, match="offloaded"):
        tuning.apply_head_deltas(split.original_model, deltas)
    base = models.load_model(models.TINY_MODEL, device="cpu")
    tuning.apply_head_deltas(base.original_model, deltas)
    tuning.finalize(whole_setup)
    ids = examples[0][0][None]
    with torch.no_grad():
        torch.testing.assert_close(base(ids), whole(ids), atol=1e-5, rtol=0)


def test_knockout_and_generation_on_a_split_model(tiny_model, split_tiny_model):
    pairs = data.build_patching_pairs(data.load_starter().select(range(2)),
                                      tiny_model.tokenizer)
    knocked = []
    for model in (tiny_model, split_tiny_model):
        with torch.no_grad(), ablation.knockout(model, [(0, 1), (1, 3)], "zero"):
            knocked.append(model(pairs.reference, return_type="logits"))
    assert torch.equal(*knocked)
    conversation = [{"role": "user", "content": "Are you sure?"}]
    replies = [chat.generate(m, [conversation], max_new_tokens=6)
               for m in (tiny_model, split_tiny_model)]
    assert replies[0] == replies[1]


def test_evaluation_on_a_split_model(tiny_model, split_tiny_model):
    from spt_utils import evaluation

    questions = data.load_starter().select(range(2)).to_list()
    answers = evaluation.own_first_answers(tiny_model, questions, max_new_tokens=4)
    assert answers == evaluation.own_first_answers(split_tiny_model, questions, max_new_tokens=4)
    records = [evaluation.run_protocol(m, questions, answers, max_new_tokens=4)
               for m in (tiny_model, split_tiny_model)]
    assert records[0] == records[1]
    documents = evaluation.load_kl_corpus()[:2]
    assert evaluation.kl_drift(tiny_model, split_tiny_model, documents) == pytest.approx(
        0.0, abs=1e-7)
    edited = models.load_model(models.TINY_MODEL, device="cpu", seed=1)
    drift = [evaluation.kl_drift(m, edited, documents) for m in (tiny_model, split_tiny_model)]
    assert drift[0] > 0 and drift[1] == pytest.approx(drift[0], rel=1e-6)


def test_full_training_refuses_offloaded_weights(split_tiny_model):
    for method in ("sft", "lora_attn", "prompt_tuning"):
        with pytest.raises(ValueError, match=f"{method}: the model keeps offloaded weights"):
            tuning.prepare(method, split_tiny_model)


def test_bf16_spt_trains_float32_masters_and_touches_only_the_slices(examples):
    bridge = models.load_model(models.TINY_MODEL, device="cpu", dtype="bfloat16")
    before = {n: t.detach().clone()
              for n, t in models.clean_state_dict(bridge.original_model).items()}
    setup = tuning.prepare("spt", bridge, [(1, 2)])
    assert {p.dtype for p in setup.params.values()} == {torch.float32}
    # a step far below bf16's resolution at these weights (~1e-3) still moves the masters
    config = tuning.TrainConfig(steps=2, batch_size=2, micro_batch_size=2, lr=1e-5,
                                warmup_ratio=0.0)
    tuning.train(setup, examples, config, progress=False)
    moved = {n: (p.detach() - setup.head_params.initial[n]).abs().max().item()
             for n, p in setup.params.items()}
    assert all(0 < change < 1e-3 for change in moved.values()), moved
    tuning.finalize(setup)
    after = models.clean_state_dict(bridge.original_model)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert after[q].dtype == torch.bfloat16
    # the written slice is the float32 master rounded to bf16; the rest is untouched
    assert torch.equal(after[q][32:48], setup.params["layers.1.q_proj.head2"].to(torch.bfloat16))
    assert torch.equal(after[q][:32], before[q][:32]) and torch.equal(after[q][48:], before[q][48:])
    for name, tensor in before.items():
        if name not in (q, "model.layers.1.self_attn.o_proj.weight"):
            assert torch.equal(after[name], tensor), name


def test_sft_on_bf16_weights_warns_that_small_steps_are_lost():
    bridge = models.load_model(models.TINY_MODEL, device="cpu", dtype="bfloat16")
    with pytest.warns(RuntimeWarning, match="dtype='float32'"):
        tuning.prepare("sft", bridge)
    # the warning's premise: a 5e-6 step vanishes when added to a bf16 weight of 0.01
    weight = torch.tensor(0.01, dtype=torch.bfloat16)
    assert torch.equal(weight - 5e-6, weight)


def test_fused_attention_is_refused_for_head_slices(tiny_model):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = tiny_model.tokenizer
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=1024, attn_implementation="eager")
    model = TransformerBridge.boot_transformers(
        "tiny-gpt-neox", hf_model=GPTNeoXForCausalLM(config).eval(), tokenizer=tokenizer,
        device="cpu")
    for method in ("spt", "lora_heads"):
        with pytest.raises(ValueError, match=f"{method}: the 'gpt_neox' attention has no "
                                             "separate q_proj"):
            tuning.prepare(method, model, [(0, 0)])


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_each_family_runs_end_to_end(name, tmp_path):
    """Pairs → path patching (fast against the oracle; Gemma-2's sandwich norms refused by
    the fast path, the oracle used) → SPT on the top heads → export → reload."""
    from spt_utils import patching

    model = models.load_model(name, device="cpu")
    pairs = data.build_patching_pairs(data.load_starter().select(range(3)), model.tokenizer)
    oracle = patching.path_patch_heads_oracle(model, pairs)
    if name == "tiny-random-gemma2":
        with pytest.raises(patching.UnsupportedArchitecture, match="attn_out = o_proj"):
            patching.path_patch_heads(model, pairs)
        scores = oracle
    else:
        scores = patching.path_patch_heads(model, pairs)
        torch.testing.assert_close(scores.per_pair, oracle.per_pair, atol=1e-4, rtol=0)
    heads = scores.top_heads(2, sign="both")
    assert len(heads) == 2
    setup = tuning.prepare("spt", model, heads, include_kv=True)
    examples = tuning.prepare_examples(model.tokenizer, worker.conversations(4))
    config = tuning.TrainConfig(steps=2, batch_size=2, micro_batch_size=2, lr=1e-2)
    result = tuning.train(setup, examples, config, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    ids = examples[0][0][None]
    with torch.no_grad():
        tuned = setup.model(input_ids=ids).logits
    folder = tuning.export_hf(setup, model.tokenizer, tmp_path / "spt", base_model=name)
    reloaded, _ = tuning.load_tuned(folder)
    assert reloaded.original_model.config.model_type == name.removeprefix(models.TINY_PREFIX)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, return_type="logits"), tuned, atol=1e-5,
                                   rtol=0)
        assert not torch.allclose(models.load_model(name, device="cpu")(ids), tuned)


def test_fsdp2_sft_on_two_gloo_processes_matches_single_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tuning_fsdp_worker as fsdp_worker
    from safetensors.torch import load_file

    out = tmp_path / "fsdp.safetensors"
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(repo), str(repo / "tests"),
                                         os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(Path(fsdp_worker.__file__)), str(out)],
        env=env, cwd=repo, timeout=600, capture_output=True, text=True,
    )
    # the workers' own output names the cause when torchrun fails
    assert run.returncode == 0, f"torchrun exited {run.returncode}:\n{run.stderr[-4000:]}"
    sharded = load_file(str(out))
    with one_thread():  # as each rank ran
        single = fsdp_worker.train_sft(shard=False)
    assert set(sharded) == set(single)
    losses = single.pop(fsdp_worker.LOSSES)
    torch.testing.assert_close(sharded.pop(fsdp_worker.LOSSES), losses, atol=1e-6, rtol=0)
    base = models.clean_state_dict(models.load_model(models.TINY_MODEL, device="cpu")
                                   .original_model)
    assert all(not torch.equal(tensor, base[name]) for name, tensor in single.items())
    for name, tensor in single.items():
        # only the order of the gradient sums differs (shard partial sums, reduce-scatter)
        torch.testing.assert_close(sharded[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_shard_fully_and_sharded_export_refuse_misuse(tiny_model):
    setup = tuning.prepare("spt", models.load_model(models.TINY_MODEL, device="cpu"), [(0, 1)])
    with pytest.raises(ValueError, match="FSDP2 is for full SFT, not 'spt'"):
        tuning.shard_fully(setup, "cpu")
    sft = tuning.prepare("sft", models.load_model(models.TINY_MODEL, device="cpu"))
    with pytest.raises(ValueError, match="2 or more ranks"):
        tuning.shard_fully(sft, "cpu")
    sft.sharded = True  # as shard_fully leaves it
    with pytest.raises(ValueError, match="state=full_state_dict"):
        tuning.export_hf(sft, tiny_model.tokenizer, "unused", base_model=models.TINY_MODEL)
    with pytest.raises(ValueError, match="checkpoint_every"):
        tuning.train(sft, [(torch.tensor([1, 2]), torch.tensor([0, 1]))],
                     tuning.TrainConfig(checkpoint_every=1), progress=False)


def test_command_line_trains_spt_on_a_split_model(tmp_path, split_map):
    import json

    from spt_utils import io, patching

    run = io.provenance(models.TINY_MODEL, models.make_tiny_tokenizer(), profile=None, seed=0)
    patching.save_heads(tmp_path / "heads.json", [(0, 1)], provenance=run)
    records = [{"id": str(i), "kind": "insist", "source": "test", "messages": c}
               for i, c in enumerate(worker.conversations(3))]
    io.write_jsonl(tmp_path / "data" / "train.jsonl", records)
    tuning.main(["--model", models.TINY_MODEL, "--run-dir", str(tmp_path), "--steps", "2",
                 "--batch-size", "2", "--micro-batch-size", "1", "--checkpoint-every", "0",
                 "--lr", "1e-2", "--device-map", json.dumps(split_map),
                 "--offload-folder", str(tmp_path / "offload")])
    deltas = tmp_path / "tuned" / "spt_head_deltas.safetensors"
    base = models.load_model(models.TINY_MODEL, device="cpu")
    before = models.clean_state_dict(base.original_model)["model.layers.0.self_attn.q_proj.weight"]
    before = before.clone()
    metadata = tuning.apply_head_deltas(base.original_model, deltas)
    assert metadata["heads"] == "[[0, 1]]"
    after = models.clean_state_dict(base.original_model)["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(after[16:32], before[16:32]) and torch.equal(after[:16], before[:16])
