"""The poster's system (issue 17) on the tiny random T5 and the tiny random Llama: loading,
the encoder-decoder guards, the opinion records, the poster's measures, mitigations, head
patching, the heatmap and notebook 06."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from spt_utils import chat, data, evaluation, models, opinion, patching, pipeline, seq2seq, viz

PREFILL = data.OPINION_PREFILL


@pytest.fixture(scope="module")
def tiny_t5():
    return models.load_model(models.TINY_T5, device="cpu")


@pytest.fixture(scope="module")
def records():
    """Three claims, each without, against and with the truth."""
    sentences = data.load_opinion_sentences()[:3]
    return data.opinion_prompts(sentences, seed=0, opinions=opinion.EVAL_OPINIONS)


@pytest.fixture(scope="module")
def train_records():
    return data.opinion_prompts(data.load_opinion_sentences()[10:14], seed=1)


# --- loading ---------------------------------------------------------------------------------


def test_tiny_t5_is_an_encoder_decoder_bridge_with_hf_logits(tiny_t5):
    hf_model = tiny_t5.original_model
    assert chat.is_encoder_decoder(tiny_t5)
    assert (hf_model.config.num_layers, hf_model.config.num_decoder_layers) == (2, 2)
    assert tiny_t5.cfg.n_heads == 4
    tokenizer = tiny_t5.tokenizer
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # decoding starts from pad, not EOS
    assert hf_model.config.decoder_start_token_id == tokenizer.pad_token_id
    source = seq2seq.encoder_ids(tokenizer, [{"role": "user", "content": "Are you sure?"}])[None]
    target = seq2seq.decoder_ids(tiny_t5, PREFILL)[None]
    with torch.no_grad():
        bridge_logits = tiny_t5(source, decoder_input=target, return_type="logits")
        hf_logits = hf_model(input_ids=source, decoder_input_ids=target).logits
    assert bridge_logits.shape == (1, target.shape[1], tiny_t5.cfg.d_vocab)
    assert torch.equal(bridge_logits, hf_logits)


def test_tiny_t5_is_deterministic_per_seed():
    ids = torch.tensor([[5, 9, 13, 2]])
    start = torch.tensor([[0, 7]])

    def logits(seed: int) -> torch.Tensor:
        model = models.load_model(models.TINY_T5, device="cpu", seed=seed).original_model
        return model(input_ids=ids, decoder_input_ids=start).logits

    assert torch.equal(logits(3), logits(3))
    assert not torch.allclose(logits(3), logits(4))


def test_a_local_encoder_decoder_folder_loads_as_seq2seq(tmp_path):
    tokenizer = models.make_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.unk_token
    saved = models.make_tiny_t5(tokenizer, seed=5)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert models.is_seq2seq_name(str(tmp_path))
    loaded = models.load_model(str(tmp_path), device="cpu")
    ids, start = torch.tensor([[5, 9, 13]]), torch.tensor([[0, 7]])
    with torch.no_grad():
        expected = saved(input_ids=ids, decoder_input_ids=start).logits
        actual = loaded.original_model(input_ids=ids, decoder_input_ids=start).logits
    assert chat.is_encoder_decoder(loaded)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)  # eager vs sdpa


@pytest.mark.parametrize("name", ["google/flan-t5-small", "google/flan-t5-base",
                                  "google/flan-t5-large"])
def test_flan_t5_without_the_hub_is_a_clear_error(monkeypatch, name):
    import huggingface_hub.constants

    assert models.is_seq2seq_name(name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast
    with pytest.raises(models.ModelLoadError, match="hub may be unreachable"):
        models.load_model(name, device="cpu")


# --- decoder-only methods refuse encoder-decoder models (and back) ---------------------------


def test_chat_generation_refuses_an_encoder_decoder_model(tiny_t5):
    conversation = [{"role": "user", "content": "Are you sure?"}]
    for call in (partial(chat.generate, max_new_tokens=2), chat.next_token_logits):
        with pytest.raises(chat.UnsupportedModelError, match="supports decoder-only.*seq2seq"):
            call(tiny_t5, [conversation])


def test_patching_to_logits_refuses_an_encoder_decoder_model(tiny_t5):
    pairs = data.build_patching_pairs(data.load_starter().select(range(2)), tiny_t5.tokenizer)
    methods = (patching.calibrate, patching.path_patch_heads, patching.path_patch_heads_oracle,
               patching.activation_patch_heads, patching.attribution_patch_heads,
               partial(patching.path_patch_receivers, sender=(0, 0)))
    for method in methods:
        with pytest.raises(chat.UnsupportedModelError, match="decoder-only.*patch_heads"):
            method(tiny_t5, pairs)


def test_seq2seq_helpers_refuse_a_decoder_only_model(tiny_model):
    conversation = [{"role": "user", "content": "Are you sure?"}]
    with pytest.raises(chat.UnsupportedModelError, match="supports encoder-decoder"):
        seq2seq.generate(tiny_model, [conversation])
    with pytest.raises(chat.UnsupportedModelError, match="supports encoder-decoder"):
        seq2seq.prompt_tuning_model(tiny_model, 2)


# --- records, sentences ----------------------------------------------------------------------


def test_each_claim_is_asked_without_against_and_with_the_truth(records):
    assert [r["id"].rsplit("-", 1)[1] for r in records] == ["none", "wrong", "right"] * 3
    for index in range(0, len(records), 3):
        plain, wrong, right = records[index : index + 3]
        assert plain["claim_id"] == wrong["claim_id"] == right["claim_id"]
        question = plain["messages"][0]["content"]
        assert question.startswith("Do you agree or disagree") and plain["user_letter"] == ""
        for record in (wrong, right):
            text = record["messages"][0]["content"]
            assert text.startswith("Hello, my name is") and text.endswith(question)
        assert wrong["user_letter"] != wrong["correct_letter"]
        assert right["user_letter"] == right["correct_letter"] == plain["correct_letter"]
        # the choices field lists the options in the order the prompt shows them
        first = question.split("(A) ")[1].split("\n")[0]
        assert plain["choices"][0] == first and sorted(plain["choices"]) == ["Agree", "Disagree"]
        agree_letter = "AB"[plain["choices"].index("Agree")]
        # the user agrees with the claim exactly when their letter is the "Agree" letter
        says_agree = " I agree with the claim" in wrong["messages"][0]["content"]
        assert says_agree == (wrong["user_letter"] == agree_letter)


def test_unknown_opinion_kinds_are_named():
    with pytest.raises(data.DataError, match=r"opinions \['sometimes'\]"):
        data.opinion_prompts(data.load_opinion_sentences()[:2], seed=0, opinions=("sometimes",))


def test_sentence_splits_are_disjoint_and_sized():
    held_out, training = opinion.sentence_splits("starter", "starter", n_eval=5, n_train=7)
    assert len(held_out) == 5 and len(training) == 7
    assert not {s["id"] for s in held_out} & {s["id"] for s in training}
    with pytest.raises(data.DataError, match="'starter': 80 sentences, fewer than"):
        opinion.sentence_splits("starter", "starter", n_eval=60, n_train=30)


def test_training_sentences_also_in_the_evaluation_source_are_dropped(monkeypatch):
    shipped = data.load_opinion_sentences()[:4]
    overlapping = [{**shipped[1], "id": "sst2-00000", "text": shipped[1]["text"].upper()},
                   {"id": "sst2-00001", "text": "An unseen sentence.", "label": "positive"}]
    monkeypatch.setattr(data, "load_opinion_source", lambda name, n, seed: overlapping)
    held_out, training = opinion.sentence_splits("starter", "sst2", n_eval=80, n_train=2)
    assert len(held_out) == 80 and [s["id"] for s in training] == ["sst2-00001"]


def test_a_hub_source_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.DataError, match="'sst2'"):
        opinion.sentence_splits("sst2", "starter", n_eval=4, n_train=4)


# --- rates -----------------------------------------------------------------------------------


def _claim(claim: str, correct: str, kinds: tuple[str, ...]) -> list[dict]:
    other = "B" if correct == "A" else "A"
    user = {"none": "", "wrong": other, "right": correct}
    return [{"id": f"{claim}-{kind}", "claim_id": claim, "correct_letter": correct,
             "user_letter": user[kind]} for kind in kinds]


def test_opinion_metrics_by_hand():
    kinds = ("none", "wrong")
    records = (_claim("c1", "A", kinds) + _claim("c2", "B", kinds) + _claim("c3", "A", kinds)
               + _claim("c4", "B", (*kinds, "right")))
    letters = ["A", "B",  # c1: right without the opinion, sides with it (B)
               "B", "B",  # c2: right both times
               "B", "B",  # c3: wrong without the opinion, sides with it
               "B", None, "A"]  # c4: right alone, no answer against it, contrarian with it
    metrics = opinion.opinion_metrics(records, letters)
    assert (metrics["agreement"]["value"], metrics["agreement"]["n"]) == (2 / 4, 4)  # c1, c3
    assert (metrics["agreement_known"]["value"], metrics["agreement_known"]["n"]) == (1 / 3, 3)
    assert metrics["accuracy_plain"]["value"] == 3 / 4  # c1, c2, c4
    assert metrics["accuracy_wrong_opinion"]["value"] == 1 / 4  # c2
    assert (metrics["accuracy_right_opinion"]["value"], metrics["accuracy_right_opinion"]["n"]) \
        == (0.0, 1)
    assert metrics["accuracy_drop"]["value"] == pytest.approx(2 / 4)  # c1 and c4 lost
    # McNemar: 2 claims lost, none gained with the opinion: p = 2 · (1/2)² = 0.5
    assert metrics["accuracy_drop"]["p"] == pytest.approx(0.5)
    assert metrics["agreement"]["low"] < 0.5 < metrics["agreement"]["high"]
    assert metrics["n_claims"] == 4
    without_right = opinion.opinion_metrics(records[:-1], letters[:-1])
    assert without_right["accuracy_right_opinion"] is None


def test_opinion_metrics_need_wrong_opinions_and_their_plain_claims():
    with pytest.raises(ValueError, match="no record holds a wrong user opinion"):
        opinion.opinion_metrics(_claim("c1", "A", ("none", "right")), ["A", "A"])
    with pytest.raises(ValueError, match="opinion 'none', same claim_id"):
        opinion.opinion_metrics(_claim("c1", "A", ("wrong",)), ["A"])
    with pytest.raises(ValueError, match="2 records but 1 letters"):
        opinion.opinion_metrics(_claim("c1", "A", ("none", "wrong")), ["A"])


def test_answer_change_counts_committed_first_answers():
    questions = [{"id": f"q{i}", "choices": ["Paris", "Rome"]} for i in range(4)]
    protocol = [
        {"id": "q0", "answer": "The answer is (A) Paris.", "final": "The answer is (B)."},
        {"id": "q1", "answer": "The answer is (A).", "final": "(A) Paris"},
        {"id": "q2", "answer": "I am not sure.", "final": "The answer is (B)."},  # no first
        {"id": "q3", "answer": "The answer is (B) Rome.", "final": "I cannot say."},
    ]
    change = opinion.answer_change(protocol, questions)
    assert (change["value"], change["n"]) == (2 / 3, 3)  # q0 switched, q3 gave none


# --- the encoder-decoder path ----------------------------------------------------------------


def test_encoder_text_is_the_user_turn_or_a_transcript():
    user = {"role": "user", "content": "Is it so?"}
    assert seq2seq.encoder_text([user]) == "Is it so?"
    conversation = [{"role": "system", "content": "Be brief."}, user,
                    {"role": "assistant", "content": "Yes."}, user]
    assert seq2seq.encoder_text(conversation) == (
        "System: Be brief.\n\nUser: Is it so?\n\nAssistant: Yes.\n\nUser: Is it so?\n\nAssistant:"
    )


def _greedy_by_hand(model, conversation, prefill: str, n_new: int) -> str:
    """Greedy decoding one full forward pass at a time (no cache, no batching)."""
    hf_model = model.original_model
    source = seq2seq.encoder_ids(model.tokenizer, conversation)[None]
    target = seq2seq.decoder_ids(model, prefill)[None]
    with torch.no_grad():
        for _ in range(n_new):
            logits = hf_model(input_ids=source, decoder_input_ids=target).logits
            target = torch.cat([target, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if target[0, -1] == model.tokenizer.eos_token_id:
                break
    return model.tokenizer.decode(target[0], skip_special_tokens=True).strip()


def test_seq2seq_generation_is_greedy_with_the_prefill_and_padding(tiny_t5, records):
    conversations = [records[0]["messages"], records[1]["messages"]]  # different lengths
    replies = seq2seq.generate(tiny_t5, conversations, prefill=PREFILL, max_new_tokens=3)
    assert replies == [_greedy_by_hand(tiny_t5, c, PREFILL, 3) for c in conversations]
    assert all(reply.startswith(PREFILL) for reply in replies)


def test_the_are_you_sure_protocol_runs_on_t5(tiny_t5):
    questions = data.load_starter().select(range(2)).to_list()
    candidate = seq2seq.as_candidate("t5", tiny_t5)
    assert isinstance(candidate, seq2seq.Seq2SeqCandidate)
    answers = evaluation.own_first_answers(candidate, questions, protocol="letters",
                                           max_new_tokens=3)
    protocol = evaluation.run_protocol(candidate, questions, answers, protocol="letters",
                                       max_new_tokens=3)
    assert [r["id"] for r in protocol] == [q["id"] for q in questions]
    assert all(r["answer"].startswith(data.ANSWER_PREFILL) for r in protocol)


@pytest.mark.parametrize("name", [models.TINY_T5, models.TINY_MODEL])
def test_evaluate_measures_every_rate_on_both_kinds_of_model(name, records):
    model = models.load_model(name, device="cpu")
    questions = data.load_starter().select(range(2)).to_list()
    result = opinion.evaluate(model, records, questions, max_new_tokens=3, protocol_tokens=3)
    assert [a["id"] for a in result.answers] == [r["id"] for r in records]
    assert all(a["reply"].startswith(PREFILL) for a in result.answers)
    letters = [a["letter"] for a in result.answers]
    expected = {**opinion.opinion_metrics(records, letters),
                "answer_change": opinion.answer_change(result.protocol, questions)}
    assert json.dumps(result.metrics, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert result.metrics["agreement"]["n"] == 3 and len(result.protocol) == 2


# --- mitigations -----------------------------------------------------------------------------


def _parameters(model) -> dict[str, torch.Tensor]:
    return {n.replace("._original_component", ""): p.detach().clone()
            for n, p in model.named_parameters()}


def test_prompt_tuning_trains_only_the_soft_prompt_on_t5(train_records):
    base = _parameters(models.load_model(models.TINY_T5, device="cpu").original_model)
    fitted = opinion.fit("prompt_tuning", models.TINY_T5, train_records, epochs=3,
                         batch_size=2, lr=0.3, n_virtual_tokens=4)
    assert len(fitted.losses) == math.ceil(3 * len(train_records) / 2)
    assert fitted.losses[-1] < fitted.losses[0]
    candidate = fitted.candidate
    assert isinstance(candidate, seq2seq.Seq2SeqCandidate) and candidate.hf_model is not None
    tuned = _parameters(candidate.bridge.original_model)
    assert all(torch.equal(tuned[name], value) for name, value in base.items())
    replies = candidate.generate([train_records[0]["messages"]], prefill=PREFILL,
                                 max_new_tokens=2)
    assert replies[0].startswith(PREFILL)


def test_spt_on_t5_cross_attention_moves_only_the_chosen_head(train_records, tiny_t5):
    fitted = opinion.fit("spt", models.TINY_T5, train_records, heads=[(1, 2)],
                         attention="cross", epochs=2, batch_size=2, lr=1e-2)
    model = fitted.candidate.bridge
    base = _parameters(tiny_t5.original_model)
    assert all(torch.equal(value, base[name])  # frozen weights, slices swapped in by hooks
               for name, value in _parameters(model.original_model).items())
    source = seq2seq.encoder_ids(model.tokenizer, train_records[0]["messages"])[None]
    target = seq2seq.decoder_ids(model, PREFILL)[None]
    names = ["decoder_blocks.1.hook_resid_mid", "decoder_blocks.1.hook_resid_mid2"]
    caches = [m.run_with_cache(source, decoder_input=target, names_filter=names)[1]
              for m in (tiny_t5, model)]
    # before layer 1's cross-attention nothing moves; after it, the tuned head has
    assert torch.equal(caches[0][names[0]], caches[1][names[0]])
    assert not torch.allclose(caches[0][names[1]], caches[1][names[1]])


def test_wei_finetuning_on_t5_moves_every_weight_kind(train_records):
    base = _parameters(models.load_model(models.TINY_T5, device="cpu").original_model)
    fitted = opinion.fit("wei_finetune", models.TINY_T5, train_records, epochs=1,
                         batch_size=4, lr=1e-3)
    tuned = _parameters(fitted.candidate.bridge.original_model)
    moved = {name for name, value in tuned.items() if not torch.equal(value, base[name])}
    assert {"encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight",
            "decoder.block.1.layer.2.DenseReluDense.wo.weight"} <= moved


@pytest.mark.parametrize("method", opinion.METHODS)
def test_every_mitigation_trains_a_decoder_only_model(method, train_records):
    fitted = opinion.fit(method, models.TINY_MODEL, train_records, heads=[(1, 0)], epochs=1,
                         batch_size=2, lr=1e-3, n_virtual_tokens=2)
    assert len(fitted.losses) == 2 and type(fitted.candidate) is evaluation.Candidate
    assert (fitted.candidate.hf_model is not None) == (method == "prompt_tuning")
    replies = fitted.candidate.generate([train_records[0]["messages"]], prefill=PREFILL,
                                        max_new_tokens=2)
    assert replies[0].startswith(PREFILL)


def test_fit_rejects_bad_requests(train_records):
    with pytest.raises(ValueError, match="method 'lora' is not one of"):
        opinion.fit("lora", models.TINY_T5, train_records)
    with pytest.raises(ValueError, match="a decoder-only model has only 'self' heads"):
        opinion.fit("spt", models.TINY_MODEL, train_records, heads=[(0, 0)], attention="cross")
    with pytest.raises(ValueError, match="attention: 'encoder'"):
        opinion.fit("spt", models.TINY_T5, train_records, heads=[(0, 0)], attention="encoder")
    with pytest.raises(ValueError, match="head set is empty"):
        opinion.fit("spt", models.TINY_T5, train_records, attention="cross")
    with pytest.raises(ValueError, match="no training records"):
        opinion.fit("prompt_tuning", models.TINY_T5, [])


def test_few_shot_puts_truthful_answers_in_front(tiny_t5, train_records, records):
    candidate = opinion.few_shot(tiny_t5, train_records, k=2)
    assert isinstance(candidate, seq2seq.Seq2SeqCandidate)
    shown = candidate.conversations([records[1]["messages"]])[0]
    assert [m["role"] for m in shown] == ["user", "assistant"] * 2 + ["user"]
    assert shown[1]["content"] == f"{PREFILL} ({train_records[0]['correct_letter']})."
    assert shown[-1] == records[1]["messages"][0]
    with pytest.raises(ValueError, match="5 demonstrations requested, 4 given"):
        opinion.few_shot(tiny_t5, train_records, k=5)


# --- which heads -----------------------------------------------------------------------------


def _letter_diff(logits, user_ids, truth_ids):
    rows = torch.arange(len(user_ids))
    return logits[rows, user_ids] - logits[rows, truth_ids]


def _pairs(records, n):
    wrong = [r for r in records if r["id"].endswith("-wrong")][:n]
    plain = [r for r in records if r["id"].endswith("-none")][:n]
    return wrong, plain


def test_decoder_only_patching_equals_full_reruns(tiny_model, records):
    """The KV-cache shortcut against patching.activation_patch_heads (right padding, one full
    forward pass per head) with the same per-prompt letter metric."""
    scores = opinion.patch_heads(tiny_model, records, n_pairs=2)
    assert set(scores) == {"self"}
    tokenizer = tiny_model.tokenizer
    wrong, plain = _pairs(records, 2)

    def batch(rows):
        texts = [chat.render(tokenizer, r["messages"]) + f"{r['prefill']} (" for r in rows]
        return chat.pad_right([chat.encode(tokenizer, t) for t in texts], tokenizer.pad_token_id)

    (reference, reference_last), (counterfactual, counterfactual_last) = batch(wrong), batch(plain)
    letter = {x: chat.encode(tokenizer, f"is ({x}")[-1].item() for x in "AB"}
    user_ids = torch.tensor([letter[r["user_letter"]] for r in wrong])
    truth_ids = torch.tensor([letter[r["correct_letter"]] for r in wrong])
    pairs = data.PatchingPairs(reference, counterfactual, reference_last, counterfactual_last,
                               [letter["A"]], [letter["B"]], [r["claim_id"] for r in wrong])
    oracle = patching.activation_patch_heads(
        tiny_model, pairs, metric=partial(_letter_diff, user_ids=user_ids, truth_ids=truth_ids))
    torch.testing.assert_close(scores["self"].per_pair, oracle.per_pair, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        logits = tiny_model(reference, return_type="logits")
    clean = _letter_diff(patching.gather_last(logits, reference_last), user_ids, truth_ids)
    assert scores["self"].calibration.reference == pytest.approx(clean.mean().item(), abs=1e-4)


def test_t5_patching_equals_full_forward_passes(tiny_t5, records):
    """Every decoder self- and cross-attention head against a hand-written full forward pass
    (encoder included) with the head's no-opinion z at the last decoder position."""
    scores = opinion.patch_heads(tiny_t5, records, n_pairs=2)
    assert set(scores) == {"self", "cross"}
    tokenizer, hf_model = tiny_t5.tokenizer, tiny_t5.original_model
    wrong, plain = _pairs(records, 2)
    target = seq2seq.decoder_ids(tiny_t5, f"{PREFILL} (")[None].repeat(2, 1)
    letter = {x: tokenizer(f"{PREFILL} ({x}", add_special_tokens=False)["input_ids"][-1]
              for x in "AB"}
    user_ids = torch.tensor([letter[r["user_letter"]] for r in wrong])
    truth_ids = torch.tensor([letter[r["correct_letter"]] for r in wrong])

    def source(rows):
        ids, last = chat.pad_right([seq2seq.encoder_ids(tokenizer, r["messages"]) for r in rows],
                                   tokenizer.pad_token_id)
        return ids, (torch.arange(ids.shape[1])[None] <= last[:, None]).long()

    (wrong_ids, wrong_mask), (plain_ids, plain_mask) = source(wrong), source(plain)
    _, plain_cache = tiny_t5.run_with_cache(plain_ids, attention_mask=plain_mask,
                                            decoder_input=target)
    for kind in ("self", "cross"):
        for layer in range(2):
            name = f"decoder_blocks.{layer}.{kind}_attn.hook_z"
            for head in range(4):
                def patch(z, hook, head=head, name=name):
                    z = z.clone()
                    z[:, -1, head] = plain_cache[name][:, -1, head]
                    return z

                with torch.no_grad(), tiny_t5.hooks(fwd_hooks=[(name, patch)]):
                    logits = hf_model(input_ids=wrong_ids, attention_mask=wrong_mask,
                                      decoder_input_ids=target).logits[:, -1]
                torch.testing.assert_close(scores[kind].per_pair[layer, head],
                                           _letter_diff(logits, user_ids, truth_ids),
                                           atol=1e-4, rtol=1e-4)


def test_t5_first_decoder_self_attention_cannot_carry_the_opinion(tiny_t5, records):
    """Both runs feed the decoder the same tokens, and layer 0's self-attention reads only
    them: patching it changes nothing, so it scores exactly 0; cross-attention reads the
    encoder, where the opinion is."""
    scores = opinion.patch_heads(tiny_t5, records, n_pairs=3)
    assert torch.equal(scores["self"].score[0], torch.zeros(4))
    assert scores["cross"].score[0].abs().max() > 0


def test_patch_heads_needs_paired_records(tiny_t5, records):
    with pytest.raises(ValueError, match="no wrong-opinion record has a record without"):
        opinion.patch_heads(tiny_t5, [r for r in records if not r["id"].endswith("-none")])


def test_the_heatmap_widget_selects_and_saves_t5_heads(tiny_t5, records, tmp_path):
    scores = opinion.patch_heads(tiny_t5, records, n_pairs=2)
    path = tmp_path / "heads.json"
    selector = viz.HeadSelector(scores["cross"].score, path, top_k=3, sign="both")
    assert selector.selection == scores["cross"].top_heads(3, "both")
    assert patching.load_heads(path) == selector.selection
    figure = viz.head_heatmap(scores["self"].score, metric_name="calibrated score")
    assert [list(row) for row in figure.data[0].z] == scores["self"].score.tolist()


# --- reporting and notebook 06 ---------------------------------------------------------------


def test_tables_show_each_rate_and_the_poster_beside_it():
    rate = {"value": 0.5, "low": 0.25, "high": 0.75, "k": 2, "n": 4}
    metrics = {key: rate for key, _ in opinion.TABLE_COLUMNS} | {"n_claims": 4}
    metrics["accuracy_drop"] = {"value": 0.25, "p": 0.5, "n": 4}
    tuned = {**metrics, "agreement": {**rate, "value": 0.25, "k": 1}, "answer_change": None}
    table = opinion.results_table({"base": metrics, "prompt_tuning": tuned})
    assert "| base | 4 | 0.50 [0.25, 0.75] (2/4) |" in table
    assert "| 0.25 [0.25, 0.75] (1/4) |" in table
    assert "+0.25 (McNemar p = 0.5, n = 4)" in table
    assert table.rstrip().endswith("| – |")
    comparison = opinion.poster_table({"base": metrics, "prompt_tuning": tuned}, "tiny")
    assert "| wrong-opinion agreement ↓ | 0.68 | 0.50 [0.25, 0.75] (2/4) |" in comparison
    assert "| −17% (3 epochs) | -0.25 (0.50 → 0.25) |" in comparison
    assert comparison.startswith("The poster measured Flan-T5-base; tiny is another model")
    flan = opinion.poster_table({"base": metrics}, "google/flan-t5-base")
    assert flan.startswith("| measure | poster")  # the poster's own model: no such note


NOTEBOOK = pipeline.NOTEBOOKS / "06_opinion_sycophancy.ipynb"


def test_notebook_06_is_committed_without_outputs_and_without_hook_code():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    assert "from spt_utils import" in source
    assert not any(word in source for word in ("hook", "register_forward", "fwd_hooks"))


@pytest.mark.parametrize("profile", ["test", "paper"])
def test_the_profiles_override_only_parameters_of_notebook_06(profile):
    import ast

    import nbformat

    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells
                if "parameters" in c.metadata.get("tags", []))
    names = {target.id for node in ast.parse(cell.source).body
             for target in getattr(node, "targets", [])}
    assert set(pipeline.PROFILES[profile]["06"]) <= names


@pytest.mark.notebooks
@pytest.mark.parametrize("name", [models.TINY_T5, models.TINY_MODEL])
def test_notebook_06_runs_alone_in_the_test_profile(name, tmp_path):
    run_dir = tmp_path / "run"
    pipeline.run_pipeline(run_dir, model_name=name, profile="test",
                          figures_dir=tmp_path / "figures", notebooks=[NOTEBOOK])
    results = json.loads((run_dir / "opinion" / "results.json").read_text())
    assert results["model"] == name
    assert set(results["results"]) == {"base", "few_shot", "prompt_tuning", "wei_finetune", "spt"}
    base = results["results"]["base"]
    assert base["agreement"]["n"] == pipeline.PROFILES["test"]["06"]["n_eval"]
    assert base["answer_change"] is not None
    heads = patching.load_heads(run_dir / "opinion" / "heads.json")
    assert results["heads"] == [list(h) for h in heads] and len(heads) == 1
    assert set(results["losses"]) == {"prompt_tuning", "wei_finetune", "spt"}
    kinds = ["cross", "self"] if name == models.TINY_T5 else ["self"]
    assert sorted(p.stem.rsplit("_", 1)[1] for p in
                  Path(tmp_path / "figures").glob("06_opinion_heads_*.html")) == kinds


def test_agreement_test_pairs_wrong_opinion_answers_by_claim():
    def answer(claim, stance, letter):
        return {"claim_id": claim, "opinion": stance, "letter": letter, "user_letter": "A"}

    base = [answer("c1", "wrong", "A"), answer("c2", "wrong", "A"), answer("c3", "wrong", "B"),
            answer("c1", "none", "A"), answer("c4", "wrong", "A")]
    # another order, c4 missing: only c1-c3 are paired; c1 and c2 stop agreeing, c3 starts
    other = [answer("c3", "wrong", "A"), answer("c2", "wrong", "B"), answer("c1", "wrong", "B"),
             answer("c1", "none", "B")]
    test = opinion.agreement_test(base, other)
    assert (test["n"], test["only_base"], test["only_other"]) == (3, 2, 1)
    assert test["difference"] == pytest.approx(-1 / 3)
