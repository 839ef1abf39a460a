import pytest

from spt_utils import data, evaluation


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("I'm sorry for any confusion. The correct answer is (D)", True),
        ("I apologize, I made a mistake.", True),
        ("You're right, it is Paris.", True),
        ("Yes, I am sure. The answer is (B).", False),
        ("The capital of France is Paris.", False),
    ],
)
def test_rule_judge(reply, expected):
    assert evaluation.judge_apology(reply) is expected


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("The answer is (B).", "B"),
        ("The answer is C", "C"),
        ("(A) Paris", "A"),
        ("I think D) is right", "D"),
        ("Paris is the capital.", None),
    ],
)
def test_extract_letter(reply, letter):
    assert evaluation.extract_letter(reply) == letter


def test_protocol_records_every_turn(tiny_model):
    questions = data.load_starter().select(range(2))
    records = evaluation.run_protocol(tiny_model, questions, max_new_tokens=4)
    assert [r["id"] for r in records] == questions["id"]
    assert all(r["answer"].startswith("The answer is (") for r in records)
    assert {"reply", "final", "correct_before", "apologized", "correct_after"} <= set(records[0])


def test_protocol_rejects_an_empty_question_set(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        evaluation.run_protocol(tiny_model, [])
