"""The live head lab (viz.HeadLab) and what it measures (ablation.pair_metrics,
ablation.KnockoutProbe, steering.SteeringProbe): clicks toggle the knocked-out or steered set,
the shown numbers and reply equal the same computation done without the widget, the α slider,
reset/save, the headless script, the update queue."""

import json
import re
import threading
import types

import pytest
import torch

from spt_utils import ablation, chat, data, grading, patching, steering, viz

SCORE = torch.tensor([[0.5, -0.9, 0.1, 0.0], [0.2, 0.3, -0.2, 0.4]])  # the tiny model's 2×4


@pytest.fixture(scope="module")
def questions():
    return data.load_starter().select(range(3)).to_list()


@pytest.fixture(scope="module")
def answers(questions):
    """Scripted first answers: each question's correct answer text."""
    return {q["id"]: {"answer": q["correct_answer"], "correct": True} for q in questions}


@pytest.fixture(scope="module")
def means(tiny_model):
    rows = data.load_starter().select(range(10, 14))
    conversations = [data.challenge_conversation(r, data.REFERENCE_CHALLENGE) for r in rows]
    activations = ablation.collect_z(tiny_model, ablation.challenge_tokens(tiny_model,
                                                                            conversations))
    return ablation.HeadMeans.from_activations(activations)


@pytest.fixture(scope="module")
def probe(tiny_model, questions, answers, means):
    return ablation.KnockoutProbe(tiny_model, questions, answers, protocol="free_form",
                                  means=means, max_new_tokens=6, n_boot=200)


@pytest.fixture(scope="module")
def steer_pairs(tiny_model):
    """Patching pairs of other questions than the lab's, to read the steering vectors off."""
    rows = data.load_starter().select(range(20, 26)).to_list()
    answers = {q["id"]: {"answer": q["correct_answer"], "correct": True} for q in rows}
    return data.build_patching_pairs(rows, tiny_model.tokenizer, answers=answers,
                                     protocol="free_form")


@pytest.fixture(scope="module")
def steer_probe(tiny_model, questions, answers, means, steer_pairs):
    return steering.SteeringProbe(tiny_model, questions, answers, steer_pairs=steer_pairs,
                                  protocol="free_form", means=means, max_new_tokens=6,
                                  n_boot=200)


def direct_logit_diffs(model, pairs, heads, means, intervention=None):
    """Each side's logit difference per pair, one unpadded prompt at a time under
    ``knockout`` of ``heads``, or under ``intervention()`` when given (no batching, no
    padding: independent of ``ablated_logit_diffs``)."""
    def context():
        return (ablation.knockout(model, heads, "mean", means=means) if intervention is None
                else intervention())

    result = {}
    for side in ablation.SIDES:
        tokens, last = getattr(pairs, side), getattr(pairs, f"{side}_last")
        values = []
        for row in range(len(pairs)):
            prompt = tokens[row, : int(last[row]) + 1][None]
            with torch.no_grad(), context():
                logits = model(prompt, return_type="logits")[:, -1]  # [1, d_vocab]
            values.append(patching.answer_logit_diff(logits, pairs.apology_ids,
                                                     pairs.confirm_ids)[0])
        result[side] = torch.stack(values)
    return result


def shown(lab):
    """The lab's number cells as ``data-key → full-precision value``."""
    cells = re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', lab.numbers.value)
    return {key: float(value) for key, value in cells}


def click(lab, layer, head):
    """What plotly's front end sends for a click on a heatmap cell (x = head, y = layer)."""
    points = types.SimpleNamespace(xs=[head], ys=[layer], point_inds=[[layer, head]])
    lab.selector.on_click(lab.selector.figure.data[0], points, None)


# --- pair_metrics and the probe --------------------------------------------------------


def test_pair_metrics_equal_one_prompt_at_a_time(tiny_model, probe, means):
    heads = [(0, 1), (1, 2)]
    metrics = ablation.pair_metrics(tiny_model, probe.pairs, heads, "mean", means=means,
                                    n_boot=200)
    clean = direct_logit_diffs(tiny_model, probe.pairs, [], means)
    ablated = direct_logit_diffs(tiny_model, probe.pairs, heads, means)
    for i, pair in enumerate(metrics["per_pair"]):
        assert pair["question_id"] == probe.pairs.question_ids[i]
        for side in ablation.SIDES:
            assert pair[f"clean_{side}"] == pytest.approx(float(clean[side][i]), abs=1e-4)
            assert pair[side] == pytest.approx(float(ablated[side][i]), abs=1e-4)
        own = ((ablated["reference"][i] - ablated["counterfactual"][i])
               / (clean["reference"][i] - clean["counterfactual"][i]))
        assert pair["remaining"] == pytest.approx(float(own), rel=1e-3, abs=1e-3)
    expected = ((ablated["reference"] - ablated["counterfactual"]).mean()
                / (clean["reference"] - clean["counterfactual"]).mean())
    assert metrics["remaining"]["value"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)
    for side in ablation.SIDES:
        assert metrics[side]["value"] == pytest.approx(float(ablated[side].mean()), abs=1e-4)
        assert metrics[f"clean_{side}"] == pytest.approx(float(clean[side].mean()), abs=1e-4)
    for key in ("reference", "counterfactual", "remaining"):
        assert metrics[key]["low"] <= metrics[key]["value"] <= metrics[key]["high"]
    assert metrics["heads"] == [[0, 1], [1, 2]] and metrics["n_pairs"] == len(probe.pairs)


def test_interchange_pair_metrics_equal_both_sides_run_in_full(tiny_model, probe):
    """The counterfactual side holds no doubting span, so pair_metrics takes its clean run
    for it: equal to running both sides under the knockout, one prompt at a time."""
    heads = [(0, 1), (1, 2)]
    interchange = ablation.Interchange.from_challenges(tiny_model.tokenizer)
    metrics = ablation.pair_metrics(tiny_model, probe.pairs, heads, "interchange",
                                    interchange=interchange, n_boot=200)
    ablated = direct_logit_diffs(tiny_model, probe.pairs, heads, None, lambda: (
        ablation.knockout(tiny_model, heads, "interchange", interchange=interchange)))
    for i, pair in enumerate(metrics["per_pair"]):
        for side in ablation.SIDES:
            assert pair[side] == pytest.approx(float(ablated[side][i]), abs=1e-4)
    assert any(abs(pair["reference"] - pair["clean_reference"]) > 1e-3
               for pair in metrics["per_pair"])  # the doubting side did change


def test_pair_metrics_without_heads_leave_the_whole_effect(tiny_model, probe, means):
    metrics = ablation.pair_metrics(tiny_model, probe.pairs, [], "mean", means=means)
    assert metrics["remaining"]["value"] == pytest.approx(1.0)
    assert metrics["remaining"]["low"] == pytest.approx(1.0)
    assert metrics["reference"]["value"] == pytest.approx(metrics["clean_reference"])
    with pytest.raises(ValueError, match="out of range"):
        ablation.pair_metrics(tiny_model, probe.pairs, [(2, 0)], "zero")


def test_probe_reply_is_the_knocked_out_generation_judged(tiny_model, probe, questions,
                                                          answers, means):
    heads = [(1, 3)]
    result = probe.reply(heads, "mean", 1)
    conversation = data.challenge_conversation(
        questions[1], data.REFERENCE_CHALLENGE, answer=answers[questions[1]["id"]]["answer"],
        protocol="free_form")
    with ablation.knockout(tiny_model, heads, "mean", means=means):
        reply, = chat.generate(tiny_model, [conversation], max_new_tokens=6)
    assert result["reply"] == reply
    assert result["admitted"] == grading.judge_admission(
        questions[1], answers[questions[1]["id"]]["answer"], reply)
    assert result["kept"] == grading.grade_free_form(reply, questions[1])
    assert probe.conversation(1) == conversation


def test_probe_replies_checked_against_the_last_reply_are_each_sets_generation(
        tiny_model, questions, answers, means):
    """Each reply starts from its question's previous one as a draft (chat.greedy_from_draft):
    whatever came before, it is the generation under its own set."""
    interchange = ablation.Interchange.from_challenges(tiny_model.tokenizer)
    probe = ablation.KnockoutProbe(tiny_model, questions, answers, protocol="free_form",
                                   means=means, interchange=interchange, max_new_tokens=6)
    clicks = [([], "mean", 1), ([(1, 3)], "mean", 1), ([(0, 1), (1, 3)], "zero", 1),
              ([(0, 1), (1, 3)], "zero", 2), ([(0, 2)], "interchange", 1), ([], "mean", 1)]
    last, drafts_right = {}, []
    for heads, method, question in clicks:
        with ablation.knockout(tiny_model, heads, method, means=means, interchange=interchange):
            reply, = chat.generate(tiny_model, [probe.conversation(question)], max_new_tokens=6)
        assert probe.reply(heads, method, question)["reply"] == reply
        if question in last and (not heads or method in probe.split_invariant_methods):
            drafts_right.append(last[question] == reply)  # a drafted click
        last[question] = reply
    assert set(drafts_right) == {True, False}  # drafts right and wrong were both checked


def test_an_interchange_reply_is_not_drafted_from_a_reply_holding_the_span(
        tiny_model, questions, answers):
    """Generated token by token, a reply's own tokens are never a span the twin replaces; in
    one pass over a draft that holds one they would be."""
    probe = ablation.KnockoutProbe(tiny_model, questions, answers, protocol="free_form",
                                   max_new_tokens=6)
    prompt = chat.tokens(tiny_model.tokenizer, probe.conversation(1))
    plain, = chat.greedy_continuations(tiny_model, [prompt], max_new_tokens=6)
    span = plain[1:4]  # a span of the reply itself, not of its prompt
    interchange = ablation.Interchange(span, (span + 1) % 100)
    assert interchange.first_span(prompt) is None
    probe.interchange = interchange
    probe.reply([], "interchange", 1)  # the draft: the plain reply, which holds the span
    heads = [(layer, head) for layer in range(2) for head in range(4)]
    with ablation.knockout(tiny_model, heads, "interchange", interchange=interchange):
        reply, = chat.generate(tiny_model, [probe.conversation(1)], max_new_tokens=6)
    passes = []  # each forward pass's input, before the knockout appends twins
    handle = tiny_model.original_model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(kwargs["input_ids"][0]), with_kwargs=True)
    try:
        assert probe.reply(heads, "interchange", 1)["reply"] == reply
    finally:
        handle.remove()
    assert passes and all(interchange.first_span(ids) is None for ids in passes)


def test_a_knockout_whose_values_depend_on_the_pass_is_generated_token_by_token(
        tiny_model, questions, answers):
    """Mean ablation's values are aligned from each forward pass's end: its reply is never
    checked against a draft in one pass (it would see other means than generation does)."""
    cfg = tiny_model.cfg
    # means that change strongly with the position: the alignment decides the reply
    z = 20 * torch.randn(64, cfg.n_layers, cfg.n_heads, cfg.d_head)
    means = ablation.HeadMeans(z, counts=torch.ones(64, dtype=torch.long), n_prompts=1)
    probe = ablation.KnockoutProbe(tiny_model, questions, answers, protocol="free_form",
                                   means=means, max_new_tokens=6)
    heads = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    for question in range(len(questions)):
        probe.reply(heads, "zero", question)  # a draft: the reply under another set
        with ablation.knockout(tiny_model, heads, "mean", means=means):
            reply, = chat.generate(tiny_model, [probe.conversation(question)], max_new_tokens=6)
        assert probe.reply(heads, "mean", question)["reply"] == reply


def test_probe_offers_only_methods_with_values_and_needs_correct_first_answers(
    tiny_model, questions, answers
):
    probe = ablation.KnockoutProbe(tiny_model, questions, answers)
    assert probe.methods == ("zero",)
    wrong = {**answers, questions[2]["id"]: {"answer": "no idea", "correct": False}}
    with pytest.raises(data.DataError, match=questions[2]["id"]):
        ablation.KnockoutProbe(tiny_model, questions, wrong)


# --- the lab on the tiny model ---------------------------------------------------------


def test_script_clicks_toggle_the_set_and_the_shown_numbers_equal_a_direct_computation(
    tiny_model, probe, questions, answers, means, tmp_path
):
    lab = viz.HeadLab(probe, SCORE, tmp_path / "heads.json")
    assert lab.state.request.heads == () and shown(lab)["pairs.remaining"] == pytest.approx(1)
    state = lab.run_script([(0, 1), (1, 2)])
    heads = [(0, 1), (1, 2)]
    assert state.request.heads == tuple(heads) and lab.selector.selection == heads
    assert sorted(zip(lab.selector.figure.data[1].y, lab.selector.figure.data[1].x,
                      strict=True)) == heads  # the markers are drawn on the set
    clean = direct_logit_diffs(tiny_model, probe.pairs, [], means)
    ablated = direct_logit_diffs(tiny_model, probe.pairs, heads, means)
    numbers = shown(lab)
    for side in ablation.SIDES:
        assert numbers[f"pair.{side}"] == pytest.approx(float(ablated[side][0]), abs=1e-4)
        assert numbers[f"pair.clean_{side}"] == pytest.approx(float(clean[side][0]), abs=1e-4)
        assert numbers[f"pairs.{side}"] == pytest.approx(float(ablated[side].mean()), abs=1e-4)
    remaining = ((ablated["reference"] - ablated["counterfactual"]).mean()
                 / (clean["reference"] - clean["counterfactual"]).mean())
    assert numbers["pairs.remaining"] == pytest.approx(float(remaining), rel=1e-3, abs=1e-3)
    assert list(lab.bars.data[2].y) == [pytest.approx(numbers["pairs.remaining"])]

    conversation = probe.conversation(0)
    with ablation.knockout(tiny_model, heads, "mean", means=means):
        reply, = chat.generate(tiny_model, [conversation], max_new_tokens=6)
    baseline, = chat.generate(tiny_model, [conversation], max_new_tokens=6)
    assert state.reply["reply"] == reply and state.baseline["reply"] == baseline
    assert viz.LAB_REPLY_CLASS in lab.conversation_view.value

    lab.run_script([(0, 1)])  # a second click on a head takes it out again
    assert lab.state.request.heads == ((1, 2),)
    assert 'data-state="ready"' in lab.status.value
    assert not (tmp_path / "heads.json").exists()  # only "save" writes heads.json


def test_reset_save_and_the_saved_state(probe, tmp_path):
    lab = viz.HeadLab(probe, SCORE, tmp_path / "heads.json", question=2)
    lab.run_script([(1, 0), (0, 2)])
    lab.save()
    record = json.loads((tmp_path / "heads.json").read_text())
    assert patching.load_heads(tmp_path / "heads.json") == [(1, 0), (0, 2)]
    assert record["scores"] == [pytest.approx(0.2), pytest.approx(0.1)]
    state = lab.save_state(tmp_path / "lab_state.json")
    assert json.loads((tmp_path / "lab_state.json").read_text()) == state
    assert state["heads"] == [[1, 0], [0, 2]] and state["script"] == [[1, 0], [0, 2]]
    assert state["question"]["id"] == probe.questions[2]["id"]
    assert state["reply"] == lab.state.reply["reply"]
    pair = state["pair"]
    assert pair["question_id"] == probe.questions[2]["id"]
    assert pair == next(p for p in state["per_pair"] if p["question_id"] == pair["question_id"])
    lab.reset()
    lab.wait()
    assert lab.selector.selection == [] and lab.state.request.heads == ()
    assert shown(lab)["pairs.remaining"] == pytest.approx(1)
    assert patching.load_heads(tmp_path / "heads.json") == [(1, 0), (0, 2)]  # not saved yet


def test_live_clicks_and_dropdowns_update_off_the_calling_thread(probe, tmp_path):
    lab = viz.HeadLab(probe, SCORE, tmp_path / "heads.json")
    click(lab, 1, 3)
    assert lab.wait(timeout=60)
    assert lab.state.request == viz.LabRequest(((1, 3),), "mean", 0)
    lab.question_dropdown.value = 1
    lab.method_dropdown.value = "zero"
    assert lab.wait(timeout=60)
    assert lab.state.request == viz.LabRequest(((1, 3),), "zero", 1)
    assert lab.state.reply == probe.reply([(1, 3)], "zero", 1)
    assert 'data-state="ready"' in lab.status.value


def test_the_lab_refuses_unknown_methods_questions_and_heads(probe, tiny_model, questions,
                                                             answers, tmp_path):
    with pytest.raises(ValueError, match="'resample' is not one of the probe's"):
        viz.HeadLab(probe, SCORE, tmp_path / "h.json", method="resample")
    with pytest.raises(ValueError, match="question 3 is not in 0…2"):
        viz.HeadLab(probe, SCORE, tmp_path / "h.json", question=3)
    lab = viz.HeadLab(probe, SCORE, tmp_path / "h.json")
    with pytest.raises(ValueError, match="out of range"):
        lab.run_script([(0, 4)])


# --- steering mode ---------------------------------------------------------------------


def test_the_steering_probe_steers_the_clicked_heads_with_vectors_read_off_its_pairs(
    tiny_model, steer_probe, steer_pairs, means
):
    heads, alpha = [(0, 1), (1, 2)], 2.0
    assert steer_probe.methods == ("zero", "mean", "steer")
    assert steer_probe.scaled_methods == ("steer",)
    direct = steering.head_steering(tiny_model, steer_pairs, heads)  # only these heads' layers
    vectors = steer_probe.steering(heads)
    assert vectors.heads == tuple(heads) and vectors.n_pairs == len(steer_pairs)
    torch.testing.assert_close(vectors.vectors, direct.vectors, rtol=0, atol=1e-6)

    with steering.steer(tiny_model, direct, alpha):
        reply, = chat.generate(tiny_model, [steer_probe.conversation(1)], max_new_tokens=6)
    assert steer_probe.reply(heads, "steer", 1, alpha)["reply"] == reply

    metrics = steer_probe.pair_metrics(heads, "steer", alpha)
    clean = direct_logit_diffs(tiny_model, steer_probe.pairs, [], means)
    steered = direct_logit_diffs(tiny_model, steer_probe.pairs, heads, means,
                                 intervention=lambda: steering.steer(tiny_model, direct, alpha))
    for side in ablation.SIDES:
        assert metrics[side]["value"] == pytest.approx(float(steered[side].mean()), abs=1e-4)
        assert metrics[f"clean_{side}"] == pytest.approx(float(clean[side].mean()), abs=1e-4)
    assert not torch.allclose(steered["reference"], clean["reference"])  # it did steer
    expected = ((steered["reference"] - steered["counterfactual"]).mean()
                / (clean["reference"] - clean["counterfactual"]).mean())
    assert metrics["remaining"]["value"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)
    assert metrics["method"] == "steer" and metrics["heads"] == [[0, 1], [1, 2]]
    # the knockout methods are the knockout probe's, untouched
    assert steer_probe.pair_metrics(heads, "mean") == ablation.pair_metrics(
        tiny_model, steer_probe.pairs, heads, "mean", means=means, n_boot=200)


def test_alpha_goes_with_the_scaled_methods_alone(probe, steer_probe):
    with pytest.raises(ValueError, match="'mean' takes no alpha"):
        probe.reply([(0, 1)], "mean", 0, 1.0)
    with pytest.raises(ValueError, match="'steer' takes an alpha"):
        steer_probe.pair_metrics([(0, 1)], "steer")
    with pytest.raises(ValueError, match="'zero' takes no alpha"):
        steer_probe.pair_metrics([(0, 1)], "zero", 2.0)


def test_the_lab_steers_with_the_alpha_slider(tiny_model, steer_probe, steer_pairs, means,
                                              tmp_path):
    lab = viz.HeadLab(steer_probe, SCORE, tmp_path / "heads.json", method="steer", alpha=1.5)
    assert not lab.alpha_slider.disabled
    heads = [(0, 1), (1, 2)]
    state = lab.run_script(heads)
    assert state.request == viz.LabRequest(tuple(heads), "steer", 0, 1.5)
    direct = steering.head_steering(tiny_model, steer_pairs, heads)
    steered = direct_logit_diffs(tiny_model, steer_probe.pairs, heads, means,
                                 intervention=lambda: steering.steer(tiny_model, direct, 1.5))
    numbers = shown(lab)
    for side in ablation.SIDES:
        assert numbers[f"pair.{side}"] == pytest.approx(float(steered[side][0]), abs=1e-4)
        assert numbers[f"pairs.{side}"] == pytest.approx(float(steered[side].mean()), abs=1e-4)
    with steering.steer(tiny_model, direct, 1.5):
        reply, = chat.generate(tiny_model, [steer_probe.conversation(0)], max_new_tokens=6)
    assert state.reply["reply"] == reply
    assert "steered" in lab.conversation_view.value and "α=1.5" in lab.status.value
    assert lab.save_state(tmp_path / "state.json")["alpha"] == 1.5

    lab.alpha_slider.value = 0.0  # α = 0: the unsteered model
    assert lab.wait(timeout=60)
    assert lab.state.request.alpha == 0.0
    assert shown(lab)["pairs.remaining"] == pytest.approx(1.0)
    assert lab.state.reply == lab.state.baseline

    lab.method_dropdown.value = "mean"  # a knockout: no strength, the slider is off
    assert lab.wait(timeout=60)
    assert lab.alpha_slider.disabled and lab.state.request == viz.LabRequest(
        tuple(heads), "mean", 0, None)
    assert "knocked out" in lab.conversation_view.value
    before = lab.state
    lab.alpha_slider.value = 3.0  # moves nothing under a knockout
    assert lab.wait(timeout=60) and lab.state is before


# --- the update queue ------------------------------------------------------------------


class BlockingProbe:
    """A probe whose knocked-out replies wait for ``release``; records every request."""

    questions = [{"id": "q0", "question": "Q?"}]
    methods = ("zero",)
    scaled_methods = ()

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.computed: list[tuple] = []
        self.measured: list[tuple] = []
        self.fail_on: tuple | None = None

    def conversation(self, question):
        return [{"role": "user", "content": "Q?"}]

    def reply(self, heads, method, question, alpha=None):
        if heads:
            self.started.set()
            assert self.release.wait(timeout=30), "the test never released the update"
            if tuple(heads) == self.fail_on:
                raise RuntimeError("probe failed")
            self.computed.append(tuple(heads))
        return {"reply": f"reply to {list(heads)}", "admitted": False, "kept": True}

    def pair_metrics(self, heads, method, alpha=None):
        self.measured.append(tuple(heads))
        interval = {"value": 1.0, "low": 1.0, "high": 1.0}
        return {"n_pairs": 1, "clean_reference": 1.0, "clean_counterfactual": 0.0,
                "reference": interval, "counterfactual": interval, "remaining": interval,
                "per_pair": [{"question_id": "q0", "clean_reference": 1.0,
                              "clean_counterfactual": 0.0, "reference": 1.0,
                              "counterfactual": 0.0, "remaining": float(len(heads))}]}


def test_clicks_during_an_update_queue_one_pending_update_latest_wins(tmp_path):
    probe = BlockingProbe()
    lab = viz.HeadLab(probe, SCORE, tmp_path / "h.json", method="zero")
    click(lab, 0, 0)  # starts an update that blocks in the probe
    assert probe.started.wait(timeout=30)
    click(lab, 0, 1)  # queued
    click(lab, 0, 2)  # replaces the queued one
    # the clicks returned while the update is still blocked: the caller never waited
    assert not probe.release.is_set() and lab._worker.busy
    assert 'data-state="busy"' in lab.status.value
    probe.release.set()
    assert lab.wait(timeout=30)
    assert probe.computed == [((0, 0),), ((0, 0), (0, 1), (0, 2))]
    # the superseded update's pairs were never measured
    assert probe.measured == [(), ((0, 0), (0, 1), (0, 2))]
    assert lab._worker.replaced == 1
    assert lab.state.request.heads == ((0, 0), (0, 1), (0, 2))
    assert "reply to [(0, 0), (0, 1), (0, 2)]" in lab.conversation_view.value
    assert shown(lab)["pair.remaining"] == 3.0


def test_a_failed_update_is_shown_and_the_lab_goes_on(tmp_path):
    probe = BlockingProbe()
    probe.release.set()
    probe.fail_on = ((1, 1),)
    lab = viz.HeadLab(probe, SCORE, tmp_path / "h.json", method="zero")
    click(lab, 1, 1)
    assert lab.wait(timeout=30)
    assert 'data-state="error"' in lab.status.value and "probe failed" in lab.status.value
    assert isinstance(lab.error, RuntimeError) and lab.state.request.heads == ()
    with pytest.raises(RuntimeError, match="the last update failed"):
        lab.save_state(tmp_path / "state.json")  # would show the older request's state
    assert not (tmp_path / "state.json").exists()
    click(lab, 1, 2)
    assert lab.wait(timeout=30)
    assert lab.state.request.heads == ((1, 1), (1, 2)) and lab.error is None


def test_latest_wins_runs_one_request_at_a_time_and_survives_a_failing_callback():
    gate, results, failures = threading.Event(), [], []

    def work(request):
        assert gate.wait(timeout=30)
        return request * 10

    def done(request, result):
        if request == 2:
            raise ValueError("display broke")
        results.append(result)

    worker = viz.LatestWins(work, done, lambda request, error: failures.append(str(error)))
    for request in (1, 2, 3, 4):
        worker.submit(request)
    assert worker.busy and worker.pending and worker.replaced == 2
    gate.set()
    assert worker.wait(timeout=30)
    assert results == [10, 40] and not worker.busy and not worker.pending
    worker.submit(2)  # the failing callback is reported; the worker stays usable
    worker.submit(5)
    assert worker.wait(timeout=30)
    assert failures == ["display broke"] and results == [10, 40, 50]
