import pytest
import torch
import tuning_ddp_worker as worker

from spt_utils import candidates, io, models, tuning
from spt_utils.evaluation import Candidate


def test_load_candidates_loads_plain_folders_and_skips_missing_ones(tiny_model, tmp_path,
                                                                    caplog):
    tokenizer = models.make_tiny_tokenizer()
    folder = tmp_path / "tuned" / "sft"
    models.make_tiny_hf_model(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = candidates.load_candidates(tmp_path, tiny_model, ["base", "sft", "spt"])
    assert [c.name for c in loaded] == ["base", "sft"]
    assert loaded[0].bridge is tiny_model and loaded[1].bridge is not tiny_model
    assert "spt: skipped" in caplog.text




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with SPT and prompt-tuning folders (one training step each), a plain
    SFT-style folder and the training file few-shot prompting reads."""
    root = tmp_path_factory.mktemp("run")
    records = [{"id": str(i), "kind": kind, "source": "test", "messages": conversation}
               for i, (kind, conversation) in enumerate(
                   zip(["insist", "revise"] * 2, worker.conversations(4), strict=True))]
    io.write_jsonl(root / "data" / "train.jsonl", records)
    config = tuning.TrainConfig(steps=1, batch_size=2, micro_batch_size=2, lr=1e-2)
    for method in ("spt", "prompt_tuning"):
        bridge = models.load_model(models.TINY_MODEL, device="cpu")
        setup = tuning.prepare(method, bridge, HEADS, n_virtual_tokens=4)
        examples = tuning.prepare_examples(bridge.tokenizer, [r["messages"] for r in records])
        tuning.train(setup, examples, config, progress=False)
        tuning.export_hf(setup, bridge.tokenizer, root / "tuned" / method,
                         base_model=models.TINY_MODEL)
    tokenizer = models.make_tiny_tokenizer()
    models.make_tiny_hf_model(tokenizer, seed=1).save_pretrained(root / "tuned" / "sft")
    tokenizer.save_pretrained(root / "tuned" / "sft")
    return root


HEADS = [(1, 2)]
TOKENS = torch.tensor([[1, 5, 9, 13, 2]])


def logits(candidate):
    with torch.no_grad():
        if candidate.hf_model is not None:
            return candidate.hf_model(input_ids=TOKENS).logits[:, -TOKENS.shape[1]:]
        return candidate.bridge(TOKENS, return_type="logits")


def snapshot(bridge):
    return {name: (t.data_ptr(), t.detach().clone())
            for name, t in models.clean_state_dict(bridge.original_model).items()}


def test_candidates_come_one_at_a_time_around_the_base(run_dir, tiny_model):
    base_before, base_logits = snapshot(tiny_model), logits(Candidate("base", tiny_model))
    flags = [p.requires_grad for p in tiny_model.original_model.parameters()]
    expected = {}
    for method in ("spt", "sft", "prompt_tuning"):
        alone = candidates.load_candidates(run_dir, models.load_model(models.TINY_MODEL,
                                                                      device="cpu"), [method])
        expected[method] = logits(alone[0])
    seen, previous = [], None
    for candidate in candidates.iter_candidates(run_dir, tiny_model, ["base", "spt", "sft",
                                                                      "lora_attn",
                                                                      "prompt_tuning",
                                                                      "few_shot"]):
        if previous is not None and previous.bridge is not tiny_model:
            # the candidate before this one was released before this one loaded
            assert {p.device.type for p in previous.bridge.original_model.parameters()} == \
                {"meta"}
        if candidate.name in expected:
            assert torch.equal(logits(candidate), expected[candidate.name]), candidate.name
        if candidate.name == "spt":
            base_tensors = models.clean_state_dict(tiny_model.original_model)
            own = {name for name, t in models.clean_state_dict(
                candidate.bridge.original_model).items()
                if t.data_ptr() != base_tensors[name].data_ptr()}
            assert own == {"model.layers.1.self_attn.q_proj.weight",
                           "model.layers.1.self_attn.o_proj.weight"}
        # KL drift applies where the weights or the plain text's prompt changed
        assert candidate.drifts == (candidate.name not in ("base", "few_shot")), candidate.name
        seen.append(candidate.name)
        previous = candidate
    assert seen == ["base", "spt", "sft", "prompt_tuning", "few_shot"]  # lora_attn: missing
    after = snapshot(tiny_model)
    for name, (pointer, value) in base_before.items():
        assert after[name][0] == pointer and torch.equal(after[name][1], value), name
    assert torch.equal(logits(Candidate("base", tiny_model)), base_logits)
    assert [p.requires_grad for p in tiny_model.original_model.parameters()] == flags


def test_open_candidate_releases_even_after_an_error(run_dir, tiny_model):
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with candidates.open_candidate(run_dir, tiny_model, "spt") as candidate:
            raise RuntimeError("evaluation failed")
    assert {p.device.type for p in candidate.bridge.original_model.parameters()} == {"meta"}
    with candidates.open_candidate(run_dir, tiny_model, "lora_heads") as missing:
        assert missing is None


def test_tuned_folders_of_another_model_are_refused(tiny_model, tmp_path):
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    setup = tuning.prepare("spt", bridge, [(0, 0)])
    run = io.provenance(models.TINY_MODEL, bridge.tokenizer, profile="test", seed=0)
    tuning.export_hf(setup, bridge.tokenizer, tmp_path / "tuned" / "spt",
                     base_model=models.TINY_MODEL, provenance=run)
    (loaded,) = candidates.load_candidates(tmp_path, tiny_model, ["spt"], expect=run)
    assert loaded.name == "spt" and loaded.hf_model is None
    with pytest.raises(io.ProvenanceError, match="field 'provenance.model'"):
        candidates.load_candidates(tmp_path, tiny_model, ["spt"],
                                   expect=dict(run, model="smollm2-135m-instruct"))
    with pytest.raises(io.ProvenanceError, match="field 'provenance.model'"):
        next(candidates.iter_candidates(tmp_path, tiny_model, ["spt"],
                                        expect=dict(run, model="smollm2-135m-instruct")))
