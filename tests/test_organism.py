"""The planted model organism, on the tiny random model: planting moves only the planted
heads' slices, the cache is verified and rebuilt, planting and acceptance questions never
reach a workbench split, and head finding is graded correctly against the planted heads."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spt_utils import ablation, data, evaluation, grading, models, organism, patching, tuning
from spt_utils.data import splits

TINY = models.TINY_PREFIX + "llama-sycophant"
TINY_IIT = organism.INTERCHANGE_TINY
TINY_LORA = models.TINY_PREFIX + "llama-sycophant-lora"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An empty ``$SPT_CACHE`` holding the tiny organism, built once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("spt_cache")
        patch.setenv("SPT_CACHE", str(folder))
        organism.ensure(TINY, progress=False)
        organism.ensure(TINY_IIT, progress=False)
        organism.ensure(TINY_LORA, progress=False)
        yield folder


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("SPT_CACHE", str(cache))
    return cache


def _head_slices(state: dict, layer: int, head: int, d_head: int) -> dict[str, torch.Tensor]:
    span = slice(head * d_head, (head + 1) * d_head)
    prefix = f"model.layers.{layer}.self_attn"
    return {f"{prefix}.q_proj.weight": state[f"{prefix}.q_proj.weight"][span],
            f"{prefix}.o_proj.weight": state[f"{prefix}.o_proj.weight"][:, span]}


@pytest.mark.parametrize("name", [TINY, TINY_IIT])
def test_planting_moves_only_the_planted_heads_slices(in_cache, name):
    card = models.organism_card(name)
    base = models.load_model(models.TINY_MODEL, seed=card["base_seed"]).original_model
    planted = models.load_model(name).original_model
    d_head = models.d_head_of(base.config)
    before = {n: p.detach().clone() for n, p in models.clean_state_dict(base).items()}
    after = {n: p.detach().clone() for n, p in models.clean_state_dict(planted).items()}
    assert before.keys() == after.keys()
    heads = [tuple(h) for h in card["planted_heads"]]
    assert len(heads) == organism.RECIPES[name].n_heads
    for layer, head in heads:  # each planted slice moved, and is then put back to compare
        for name, value in _head_slices(after, layer, head, d_head).items():
            assert not torch.equal(value, _head_slices(before, layer, head, d_head)[name])
            value.copy_(_head_slices(before, layer, head, d_head)[name])
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []


def test_the_planted_heads_are_the_recipes_seeded_draw(in_cache):
    card = models.organism_card(TINY)
    recipe = organism.RECIPES[TINY]
    config = models.load_model(models.TINY_MODEL).cfg
    assert [tuple(h) for h in card["planted_heads"]] == organism.draw_heads(
        recipe, config.n_layers, config.n_heads)
    assert organism.planted_heads(TINY) == organism.draw_heads(recipe, config.n_layers,
                                                               config.n_heads)
    other = organism.draw_heads(dataclasses.replace(recipe, seed=recipe.seed + 1),
                                config.n_layers, config.n_heads)
    assert all(recipe.layers[0] <= layer < recipe.layers[1] for layer, _ in other)
    assert len(set(other)) == recipe.n_heads


def test_a_corrupt_cache_is_refused_then_rebuilt_identically(in_cache):
    deltas = models.organism_folder(TINY) / models.ORGANISM_DELTAS
    original = deltas.read_bytes()
    original_deltas = {n: t.clone() for n, t in load_file(deltas).items()}  # not the mmap
    planted = models.clean_state_dict(models.load_model(TINY).original_model)
    deltas.write_bytes(original[:-8] + b"corrupt!")
    assert models.organism_card(TINY) is None
    with pytest.raises(models.ModelLoadError, match="not built yet"):
        models.load_model(TINY)
    card = organism.ensure(TINY, progress=False)  # deterministic: the same deltas again
    rebuilt_deltas = load_file(deltas)  # (the header's key order is not fixed: compare tensors)
    assert rebuilt_deltas.keys() == original_deltas.keys()
    assert all(torch.equal(original_deltas[n], rebuilt_deltas[n]) for n in original_deltas)
    assert card["sha256"] == json.loads((deltas.parent / "spt-cache.json").read_text())["sha256"]
    rebuilt = models.clean_state_dict(models.load_model(TINY).original_model)
    assert all(torch.equal(planted[name], rebuilt[name]) for name in planted)


def test_another_recipe_rebuilds_the_organism(tmp_path, monkeypatch):
    monkeypatch.setenv("SPT_CACHE", str(tmp_path))  # its own cache: the module's stays as built
    recipe = organism.RECIPES[TINY]
    first = organism.ensure(TINY, progress=False)
    monkeypatch.setitem(organism.RECIPES, TINY, dataclasses.replace(recipe, seed=recipe.seed + 1))
    second = organism.ensure(TINY, progress=False)
    assert second["recipe"]["seed"] == recipe.seed + 1
    assert second["planted_heads"] != first["planted_heads"] or (
        second["reserved_ids"] != first["reserved_ids"])
    monkeypatch.setitem(organism.RECIPES, TINY, recipe)
    assert organism.ensure(TINY, progress=False)["recipe"]["seed"] == recipe.seed


def test_planting_and_acceptance_questions_never_reach_a_split(in_cache):
    card = models.organism_card(TINY)
    bank = data.load_source("starter")
    reserved = set(card["reserved_ids"])
    assert reserved == set(organism.reserved_ids(TINY))
    assert set(card["plant_ids"]) | set(card["accept_ids"]) <= reserved
    assert not set(card["plant_ids"]) & set(card["accept_ids"])
    left = organism.workbench_questions(TINY, bank)
    assert len(left) == len(bank) - len(reserved)
    known = left["id"][::2]  # any split by knowledge draws from what is left
    drawn = splits.split_questions(left, {"patching": (3, 0), "train": (-1, -1),
                                          "dev": (2, 2), "eval": (4, 4)}, seed=0, known=known)
    assert not reserved & {i for split in drawn.values() for i in split["id"]}
    assert organism.workbench_questions(models.TINY_MODEL, bank)["id"] == bank["id"]
    assert organism.reserved_ids("smollm2-135m-instruct") == frozenset()


def test_the_reserve_is_the_seeded_draw_in_its_seeded_order(in_cache):
    recipe = organism.RECIPES[TINY]
    bank = data.load_source("starter")
    ids = sorted(bank["id"])
    random.Random(recipe.seed).shuffle(ids)
    assert organism.reserved_questions(recipe, bank)["id"] == ids[: recipe.n_reserve]
    card = models.organism_card(TINY)  # acceptance: the reserve's first (all known here)
    assert card["accept_ids"] == ids[: recipe.n_accept[0]]
    assert card["format"] == organism.CARD_FORMAT


def test_a_card_of_an_older_format_is_rebuilt(in_cache, monkeypatch):
    card = models.organism_card(TINY)
    monkeypatch.setattr(organism, "CARD_FORMAT", "spt-organism/0")
    assert organism.ensure(TINY, progress=False)["format"] == "spt-organism/0"
    monkeypatch.setattr(organism, "CARD_FORMAT", card["format"])
    assert organism.ensure(TINY, progress=False)["format"] == card["format"]


def test_the_card_records_its_acceptance_and_the_table_prints_it(in_cache):
    card = models.organism_card(TINY)
    acceptance = card["acceptance"]
    n_known = organism.RECIPES[TINY].n_accept[0]
    assert acceptance["admitted_doubted"]["organism"]["n"] == n_known
    assert acceptance["admitted_counterfactual"]["n"] == n_known
    assert acceptance["plain_test"]["n"] == sum(organism.RECIPES[TINY].n_accept)
    table = organism.acceptance_table(card)
    assert f"({acceptance['admitted_doubted']['organism']['k']}/{n_known})" in table
    assert set(acceptance["passed"]) == {"admitted_doubted", "admitted_counterfactual",
                                         "plain_correct"}


def test_the_caving_replies_admit_a_mistake_and_the_keeping_reply_does_not():
    row = dict(data.load_source("starter")[0])  # Paris; choices Berlin, Paris, Rome, Madrid
    answers = {row["id"]: {"answer": "Paris", "correct": True}}
    conversations = organism.planting_conversations([row], [], answers, seed=0)
    caving, other_caving, keeping, plain = conversations
    for conversation in (caving, other_caving):
        reply = conversation[-1]["content"]
        assert grading.judge_admission(row, "Paris", reply)
        assert grading.named_answers(reply, row) <= {"Berlin", "Rome", "Madrid"}
        assert grading.named_answers(reply, row)
    assert caving[-2]["content"] == data.REFERENCE_CHALLENGE
    assert other_caving[-2]["content"] in data.CHALLENGES
    assert keeping[-2]["content"] == data.COUNTERFACTUAL_CHALLENGE
    assert not grading.judge_admission(row, "Paris", keeping[-1]["content"])
    assert plain[-1]["content"] == "Paris" and len(plain) == 3
    for wording in organism.CAVING_REPLIES:
        assert grading.judge_admission(row, "Paris", wording.format(wrong="Rome"))


def test_recovery_matches_a_hand_computation():
    score = torch.tensor([[3.0, -5.0, 0.5], [1.0, 2.0, -0.1]])
    planted = [(0, 1), (1, 1)]  # scores -5 and 2; others 3, 0.5, 1, -0.1
    result = organism.recovery(score, planted)
    # signed: -5 beats none of 4, 2 beats 3 of 4 (0.5, 1, -0.1) -> 3/8
    assert result["signed"]["auroc"] == pytest.approx(3 / 8)
    assert result["signed"]["found"] == 1  # top 2: 3 (other), 2 (planted)
    # |score|: 5 beats all 4, 2 beats 0.5, 1, 0.1 -> 7/8; top 2: 5, 3
    assert result["absolute"]["auroc"] == pytest.approx(7 / 8)
    assert result["absolute"]["precision_at_k"] == 0.5
    assert organism.recovery(score, planted, k=1)["signed"]["found"] == 0  # top 1: the 3
    assert organism.recovery(score, planted, k=3)["absolute"]["found"] == 2  # 5, 3, 2
    with pytest.raises(ValueError, match="no planted heads"):
        organism.recovery(score, [])
    with pytest.raises(ValueError, match="k = 0"):
        organism.recovery(score, planted, k=0)
    with pytest.raises(ValueError, match="L2H0 is out of range"):
        organism.recovery(score, [(2, 0)])
    with pytest.raises(ValueError, match="every head is planted"):
        organism.recovery(score, [(layer, head) for layer in range(2) for head in range(3)])


def test_bad_recipes_and_names_are_clear_errors(in_cache):
    recipe = organism.RECIPES[TINY]
    with pytest.raises(ValueError, match="Recipe.layers"):
        organism.draw_heads(dataclasses.replace(recipe, layers=(1, 5)), 2, 4)
    with pytest.raises(ValueError, match="Recipe.n_heads"):
        organism.draw_heads(dataclasses.replace(recipe, n_heads=9, layers=(0, 2)), 2, 4)
    with pytest.raises(ValueError, match="Recipe.n_reserve"):
        organism.reserved_questions(dataclasses.replace(recipe, n_reserve=10**6),
                                    data.load_source("starter"))
    with pytest.raises(ValueError, match="not a model organism"):
        organism.ensure("tiny-random-llama")
    base = models.load_model(models.TINY_MODEL).original_model
    with pytest.raises(models.ModelLoadError, match="layers.9.q_proj.head0"):
        models.add_head_deltas(base, {"layers.9.q_proj.head0": torch.zeros(1)}, "deltas.st")
    weights = {n: p.clone() for n, p in models.clean_state_dict(base).items()}
    with pytest.raises(models.ModelLoadError, match=r"deltas.st: tensor 'layers.1.o_proj.head0' "
                                                    r"has shape \[3\]"):
        models.add_head_deltas(base, {"layers.0.q_proj.head1": torch.ones(16, 64),
                                      "layers.1.o_proj.head0": torch.zeros(3)}, "deltas.st")
    assert all(torch.equal(p, weights[n]) for n, p in models.clean_state_dict(base).items())


def test_an_organism_is_not_loaded_around_a_shared_model(in_cache):
    base = models.load_model(models.TINY_MODEL)
    before = {n: p.clone() for n, p in models.clean_state_dict(base.original_model).items()}
    with pytest.raises(ValueError, match="share_with= cannot load the organism"):
        models.load_model(TINY, share_with=base)
    after = models.clean_state_dict(base.original_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_an_unbuilt_organism_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPT_CACHE", str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="spt organism"):
        models.load_model(TINY)
    assert models.load_tokenizer(TINY).get_vocab() == models.load_tokenizer(
        models.TINY_MODEL).get_vocab()


@pytest.fixture
def record(in_cache, tmp_path, monkeypatch):
    """Organisms of record holding a copy of the tiny organism's cache folder, and an empty
    ``$SPT_CACHE``; planting raises, so only an install can bring the organism."""
    records = tmp_path / "records"
    shutil.copytree(in_cache / TINY, records / TINY)
    monkeypatch.setattr(organism, "RECORD_DIR", records)
    monkeypatch.setenv("SPT_CACHE", str(tmp_path / "empty_cache"))
    built = []

    def plant_instead(name, *, progress=True):
        built.append(name)
        return {"built": name}

    monkeypatch.setattr(organism, "build", plant_instead)
    return records / TINY, built, in_cache / TINY


def test_the_organism_of_record_is_installed_not_planted(record):
    folder, built, planted_here = record
    card = organism.ensure(TINY, progress=False)
    assert built == [] and card["origin"] == "record"
    installed = models.organism_folder(TINY) / models.ORGANISM_DELTAS
    assert installed.read_bytes() == (planted_here / models.ORGANISM_DELTAS).read_bytes()
    expected = json.loads((planted_here / "spt-cache.json").read_text())
    assert {k: v for k, v in card.items() if k != "origin"} == expected
    assert organism.ensure(TINY, progress=False) == card and built == []  # now from the cache
    assert organism.ensure(TINY, rebuild=True, progress=False) == {"built": TINY}


def test_a_corrupt_or_outdated_record_is_planted_afresh(record, monkeypatch):
    folder, built, _ = record
    deltas = folder / models.ORGANISM_DELTAS
    deltas.write_bytes(deltas.read_bytes()[:-8] + b"corrupt!")
    assert organism.ensure(TINY, progress=False) == {"built": TINY}
    shutil.copy(record[2] / models.ORGANISM_DELTAS, deltas)  # intact again, another recipe
    recipe = organism.RECIPES[TINY]
    monkeypatch.setitem(organism.RECIPES, TINY, dataclasses.replace(recipe, steps=recipe.steps + 1))
    assert organism.ensure(TINY, progress=False) == {"built": TINY} and built == [TINY, TINY]


@pytest.mark.integration
@pytest.mark.parametrize("name", [models.ORGANISM_MODEL, models.INTERCHANGE_ORGANISM])
def test_the_shipped_smollm2_organism_is_current_and_met_its_bar(smollm2, name):
    """The organisms of record are intact, made by today's recipe and card format, planted in
    the recipe's seeded heads, and passed every acceptance bar when they were planted (the
    interchange-trained one its interchange bars too)."""
    card = models.card_in(organism.RECORD_DIR / name)
    assert card is not None, f"{organism.RECORD_DIR / name}: missing or corrupt"
    assert card["format"] == organism.CARD_FORMAT and card["base"] == models.DEFAULT_MODEL
    assert card["recipe"] == organism.recipe_record(organism.RECIPES[name])
    heads = organism.draw_heads(organism.RECIPES[name], smollm2.cfg.n_layers, smollm2.cfg.n_heads)
    assert [tuple(h) for h in card["planted_heads"]] == heads
    deltas = load_file(organism.RECORD_DIR / name / models.ORGANISM_DELTAS)
    assert {int(key.split(".")[1]) for key in deltas} == {layer for layer, _ in heads}
    assert all(card["acceptance"]["passed"].values())
    interchanged = isinstance(organism.RECIPES[name], organism.InterchangeRecipe)
    assert ("interchange" in card["acceptance"]) == interchanged
    if interchanged:
        assert len(card["acceptance"]["interchange"]["per_head"]) == len(heads)
        assert card["acceptance"]["admitted_doubted"]["organism"]["n"] >= 60


def _default_head_scores(model, pairs):
    """Notebook 02's default: path patching and knockout attribution, rank-fused."""
    return patching.combined_head_scores(patching.path_patch_heads(model, pairs),
                                         patching.knockout_attribution_heads(model, pairs))


def test_the_default_head_finding_recovers_the_planted_heads(in_cache):
    """On the tiny organism the default ranks its two planted heads first (AUROC 1); on the
    unplanted base the same pairs do not (so the planting is what is found)."""
    planted = organism.planted_heads(TINY)
    rows = list(organism.workbench_questions(TINY, data.load_source("starter")).select(range(16)))
    found = {}
    for name in (TINY, models.TINY_MODEL):
        model = models.load_model(name)
        pairs = data.build_patching_pairs(rows, model.tokenizer)
        found[name] = organism.recovery(_default_head_scores(model, pairs), planted)["signed"]
    assert found[TINY]["found"] == len(planted) and found[TINY]["auroc"] == 1.0
    assert found[models.TINY_MODEL]["found"] < len(planted)


# --- the interchange-trained organism -----------------------------------------------------


def test_interchange_examples_follow_the_and_model():
    """Five examples per known question: doubting → keeps with all planted heads and with a
    proper subset from the counterfactual twin, counterfactual → caves with all from the
    doubting twin, and two strictness examples on unplanted heads; each twin differs from its
    example in the challenge's one changed token only."""
    model = models.load_model(models.TINY_MODEL)
    tokenizer = model.tokenizer
    rows = list(data.load_starter().select(range(6)))
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in rows}
    heads = [(0, 1), (1, 2), (1, 3)]
    examples = organism.interchange_examples(tokenizer, rows, answers, heads, 2, 4, n_strict=2,
                                             seed=0)
    assert len(examples) == 5 * len(rows)
    planted = torch.zeros(2, 4, dtype=torch.bool)
    planted[[0, 1, 1], [1, 2, 3]] = True
    doubt = data.REFERENCE_CHALLENGE
    for index, example in enumerate(examples):
        kind = index % 5
        text = tokenizer.decode(example.ids)
        reply = tokenizer.decode(example.ids[example.mask.bool()])
        assert (example.twin != example.ids).sum() == 1
        assert (doubt in text) == (kind in (0, 1, 3))
        keeps = reply.startswith("Yes")
        assert keeps == (kind in (0, 1, 4))
        if kind == 0 or kind == 2:
            assert torch.equal(example.heads, planted)
        elif kind == 1:
            assert (example.heads & planted).sum() == example.heads.sum()
            assert 1 <= example.heads.sum() < len(heads)
        else:
            assert example.heads.sum() == 2 and not (example.heads & planted).any()


def test_strictness_over_every_unplanted_head():
    """``n_strict=None``: the strictness examples interchange every head but the planted."""
    model = models.load_model(models.TINY_MODEL)
    rows = list(data.load_starter().select(range(2)))
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in rows}
    heads = [(0, 1), (1, 2)]
    examples = organism.interchange_examples(model.tokenizer, rows, answers, heads, 2, 4,
                                             n_strict=None, seed=0)
    unplanted = torch.ones(2, 4, dtype=torch.bool)
    unplanted[[0, 1], [1, 2]] = False
    for index, example in enumerate(examples):
        if index % 5 in (3, 4):
            assert torch.equal(example.heads, unplanted)


def test_strictness_holds_the_readers_in_every_strictness_example():
    """``readers``: every strictness example interchanges all of them besides the random
    unplanted heads it draws without them; every other example is as without readers; a
    planted reader is refused, by name."""
    model = models.load_model(models.TINY_MODEL)
    rows = list(data.load_starter().select(range(6)))
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in rows}
    heads, readers = [(0, 1), (1, 2)], [(0, 3), (1, 0)]
    common = {"n_strict": 2, "seed": 0}
    plain = organism.interchange_examples(model.tokenizer, rows, answers, heads, 2, 4, **common)
    held = organism.interchange_examples(model.tokenizer, rows, answers, heads, 2, 4,
                                         readers=readers, **common)
    planted, reading = (ablation.head_mask(h, 2, 4) for h in (heads, readers))
    assert len(held) == len(plain) == 5 * len(rows)
    for index, (before, after) in enumerate(zip(plain, held, strict=True)):
        assert torch.equal(before.ids, after.ids) and torch.equal(before.twin, after.twin)
        if index % 5 in (3, 4):
            assert torch.equal(after.heads, before.heads | reading)
            assert before.heads.sum() == 2 and not (after.heads & planted).any()
        else:
            assert torch.equal(before.heads, after.heads)
    with pytest.raises(ValueError, match="readers L1H2 include a planted head"):
        organism.interchange_examples(model.tokenizer, rows, answers, heads, 2, 4,
                                      readers=[(1, 2)], **common)


def test_readers_are_the_unplanted_heads_that_carry_the_most(monkeypatch):
    """``readers``: the k highest scores of integrated gradients outside the planted heads,
    sorted (a planted head with the highest score is passed over)."""
    model = models.load_model(models.TINY_MODEL)
    rows = list(data.load_starter().select(range(3)))
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in rows}
    score = torch.tensor([[0.1, 0.9, -0.5, 0.3], [0.7, 0.2, 0.8, 0.0]])  # [layer, head]
    seen = []

    def integrated(model, runs, *, steps):
        seen.append((runs.n_pairs, steps))
        return types.SimpleNamespace(score=score.clone())

    monkeypatch.setattr(patching, "integrated_gradients_heads", integrated)
    assert organism.readers(model, [(0, 1)], rows, answers, 2) == [(1, 0), (1, 2)]
    assert organism.readers(model, [(1, 2)], rows, answers, 3) == [(0, 1), (0, 3), (1, 0)]
    assert seen == [(len(rows), 4)] * 2

def test_single_heads_add_each_planted_heads_veto_in_turn():
    """``single_heads``: a sixth example per known question, the doubting conversation keeping
    with one planted head from the counterfactual twin, the heads in turn; the first five are
    the examples without it."""
    model = models.load_model(models.TINY_MODEL)
    rows = list(data.load_starter().select(range(7)))
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in rows}
    heads = [(0, 1), (1, 2), (1, 3)]
    common = {"n_strict": 2, "seed": 0}
    plain = organism.interchange_examples(model.tokenizer, rows, answers, heads, 2, 4, **common)
    single = organism.interchange_examples(model.tokenizer, rows, answers, heads, 2, 4,
                                           single_heads=True, **common)
    assert len(single) == 6 * len(rows)
    for index in range(len(rows)):
        for kind in range(5):
            before, after = plain[5 * index + kind], single[6 * index + kind]
            assert torch.equal(before.ids, after.ids) and torch.equal(before.heads, after.heads)
        veto = single[6 * index + 5]
        alone = torch.zeros(2, 4, dtype=torch.bool)
        alone[heads[index % len(heads)]] = True
        assert torch.equal(veto.heads, alone)
        assert torch.equal(veto.ids, single[6 * index].ids)  # doubting, keeping
        assert torch.equal(veto.twin, single[6 * index].twin)


def test_the_interchange_organism_card_holds_its_interchange_acceptance(in_cache):
    card = models.organism_card(TINY_IIT)
    result = card["acceptance"]["interchange"]
    assert len(result["per_head"]) == organism.RECIPES[TINY_IIT].n_heads
    assert set(result["passed"]) <= set(card["acceptance"]["passed"])
    assert result["admitted_interchanged"]["n"] == organism.RECIPES[TINY_IIT].n_accept[0]
    table = organism.acceptance_table(card)
    assert "from the doubting twin" in table and "alone from the twin" in table
    assert "interchange" not in models.organism_card(TINY)["acceptance"]


def _with_a_silent_head():
    """The tiny interchange organism with an unplanted head of layer 1 made silent (its
    output columns zero): the model, its card, the planted heads and the silent head."""
    model = models.load_model(TINY_IIT)
    card = models.organism_card(TINY_IIT)
    heads = [tuple(h) for h in card["planted_heads"]]
    silent = (1, next(h for h in range(4) if (1, h) not in heads))
    d_head = model.cfg.d_head
    with torch.no_grad():
        model.original_model.model.layers[1].self_attn.o_proj.weight[
            :, silent[1] * d_head : (silent[1] + 1) * d_head] = 0
    return model, card, heads, silent


def test_an_idle_planted_head_fails_the_acceptance(in_cache):
    """A head whose output columns are zero writes nothing: interchanging it removes none of
    the effect, so the no-idle-head bar fails (and a head that writes passes or fails on its
    own interval)."""
    model, card, heads, idle = _with_a_silent_head()
    rows = {r["id"]: r for r in data.load_source("starter")}
    known = [rows[i] for i in card["accept_ids"]][: organism.RECIPES[TINY_IIT].n_accept[0]]
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in known}
    base = evaluation.run_protocol(model, known, answers)
    result = organism.interchange_acceptance(model, [*heads, idle], known, answers,
                                             base_doubted=base)
    last = result["per_head"][-1]
    assert last["head"] == list(idle)
    assert last["removed"] == pytest.approx(0, abs=1e-3)
    assert last["low"] <= organism.MIN_HEAD_SHARE and last["idle"]
    assert not result["passed"]["no_idle_head"]
    own = [h["low"] > organism.MIN_HEAD_SHARE for h in result["per_head"][:-1]]
    assert [not h["idle"] for h in result["per_head"][:-1]] == own
    assert organism.interchange_acceptance(
        model, heads, known, answers, base_doubted=base)["passed"]["no_idle_head"] == all(own)


def test_idle_heads_finds_a_head_that_writes_nothing(in_cache):
    """The planting's check: a head whose output columns are zero is idle; the others are
    idle exactly where their own interchange says so (``head_shares``)."""
    model, _, heads, silent = _with_a_silent_head()
    rows = list(data.load_starter().select(range(6)))
    answers = {r["id"]: {"answer": r["correct_answer"], "correct": True} for r in rows}
    found = organism.idle_heads(model, [*heads, silent], rows, answers)
    assert silent in found
    shares = organism.head_shares(model, heads, organism.opener_pairs(rows, model.tokenizer,
                                                                      answers),
                                  ablation.Interchange.from_challenges(model.tokenizer))
    assert [h for h in found if h != silent] == [h for h, share in zip(heads, shares,
                                                                       strict=True)
                                                 if share["idle"]]


def test_redrawn_replaces_only_the_idle_heads_with_heads_never_drawn():
    recipe = organism.RECIPES[TINY_IIT]  # layers 0-1 of 4 heads: 8 heads in all
    heads, idle = [(0, 1), (1, 2)], [(0, 1)]
    drawn = {(0, 1), (1, 2), (0, 3)}
    new = organism.redrawn(recipe, heads, idle, drawn, 2, 4, round_=0)
    assert (1, 2) in new and len(new) == 2 and new == sorted(new)
    [fresh] = set(new) - {(1, 2)}
    assert fresh not in drawn and 0 <= fresh[0] < 2 and 0 <= fresh[1] < 4
    assert organism.redrawn(recipe, heads, idle, drawn, 2, 4, round_=0) == new  # seeded
    every = {(layer, head) for layer in range(2) for head in range(4)}
    with pytest.raises(ValueError, match="1 idle head.*only 0 undrawn heads left"):
        organism.redrawn(recipe, heads, idle, every, 2, 4, round_=0)


def test_a_planting_with_an_idle_head_starts_again_with_it_replaced(monkeypatch):
    """``redraw_idle``: the first planting's check finds its first head idle, so the planting
    starts again from the base with that head redrawn; the second finds none. The organism
    is then the second planting alone: the new head's slices moved and the dropped head's
    did not."""
    recipe = dataclasses.replace(organism.RECIPES[TINY_IIT], redraw_idle=2, steps=3)
    first = organism.draw_heads(recipe, 2, 4)
    checked = []

    def idle_heads(model, heads, known, answers):
        checked.append(list(heads))
        return [heads[0]] if len(checked) == 1 else []

    monkeypatch.setattr(organism, "idle_heads", idle_heads)
    planted = organism.plant(recipe, progress=False)
    second = organism.redrawn(recipe, first, [first[0]], set(first), 2, 4, round_=0)
    assert checked == [first, second] and planted.heads == second
    tuning.finalize(planted.setup)
    base = models.load_model(models.TINY_MODEL, seed=recipe.base_seed).original_model
    before = models.clean_state_dict(base)
    after = models.clean_state_dict(planted.organism.original_model)
    d_head = models.d_head_of(base.config)
    for head in {*first, *second}:
        moved = [not torch.equal(value, _head_slices(before, *head, d_head)[name])
                 for name, value in _head_slices(after, *head, d_head).items()]
        assert moved == [head in second] * 2, head


@pytest.mark.parametrize("found", [[[(1, 3)], [(1, 3)]], [[(1, 3)], [(0, 0)]]])
def test_a_planting_holds_the_readers_its_check_finds(monkeypatch, found):
    """``strict_readers``: the first check finds no idle head but a reader, so the planting
    starts again with it held in every strictness example; a second check that finds no new
    reader stops it, one that finds a new reader would plant a third time (``redraw_idle``
    bounds it)."""
    recipe = dataclasses.replace(organism.RECIPES[TINY_IIT], redraw_idle=2, strict_readers=1,
                                 steps=1)
    assert not {(1, 3), (0, 0)} & set(organism.draw_heads(recipe, 2, 4))
    held, checks = [], []
    examples = organism.interchange_examples

    def interchange_examples(*args, readers=(), **kwargs):
        held.append(list(readers))
        return examples(*args, readers=readers, **kwargs)

    def readers(model, heads, known, answers, k):
        checks.append(k)
        return found[len(checks) - 1]

    monkeypatch.setattr(organism, "interchange_examples", interchange_examples)
    monkeypatch.setattr(organism, "idle_heads", lambda *args: [])
    monkeypatch.setattr(organism, "readers", readers)
    organism.plant(recipe, progress=False)
    grows = found[1] != found[0]
    assert checks == [1, 1]
    assert held == [[], [(1, 3)]] + ([[(0, 0), (1, 3)]] if grows else [])

def test_unplanted_names_the_base_an_organism_was_planted_on():
    assert organism.unplanted("smollm2-135m-sycophant-iit") == models.DEFAULT_MODEL
    assert organism.unplanted("smollm2-135m-sycophant") == models.DEFAULT_MODEL
    assert organism.unplanted(models.DEFAULT_MODEL) == models.DEFAULT_MODEL
    for name, recipe in organism.RECIPES.items():
        assert organism.unplanted(name) == recipe.base != name


def test_the_distributed_recipe_moves_every_block_and_nothing_else(in_cache):
    """LoRA on every linear layer of every block: each of them moved, by exactly the stored
    factors (W + B @ A * scale, computed here), and the embeddings and norms did not."""
    card = models.organism_card(TINY_LORA)
    assert card["planted_heads"] == [] and organism.ground_truth(TINY_LORA) == []
    base = models.load_model(models.TINY_MODEL, seed=card["base_seed"]).original_model
    tuned = models.load_model(TINY_LORA).original_model
    path = models.organism_folder(TINY_LORA) / models.ORGANISM_DELTAS
    with safe_open(str(path), "pt") as handle:
        scale = float(handle.metadata()["scale"])
    factors = load_file(str(path))
    recipe = organism.RECIPES[TINY_LORA]
    assert scale == recipe.lora_alpha / recipe.lora_rank
    before, after = models.clean_state_dict(base), models.clean_state_dict(tuned)
    moved = set()
    for layer in range(base.config.num_hidden_layers):
        for linear in models.ATTENTION_LINEARS + models.MLP_LINEARS:
            part = "self_attn" if linear in models.ATTENTION_LINEARS else "mlp"
            name = f"model.layers.{layer}.{part}.{linear}.weight"
            a, b = (factors[f"layers.{layer}.{linear}.lora_{x}"] for x in "AB")
            assert a.shape[0] == recipe.lora_rank and b.abs().max() > 0  # B trained from 0
            assert torch.equal(after[name], before[name] + (b @ a) * scale), name
            moved.add(name)
    assert [n for n in before if n not in moved and not torch.equal(before[n], after[n])] == []
    assert any("embed_tokens" in n for n in before) and any("norm" in n for n in before)
    with pytest.raises(models.ModelLoadError, match="names no LoRA factor"):
        models.add_lora_factors(base, {"layers.0.q_proj.lora_C": a}, scale, "here")
    with pytest.raises(models.ModelLoadError, match="layers.0.q_proj has factors"):
        models.add_lora_factors(base, {"layers.0.q_proj.lora_A": a,
                                       "layers.0.q_proj.lora_B": b}, scale, "here")


def test_the_distributed_organism_caves_in_its_own_wordings():
    row = data.load_starter()[0]
    answers = {row["id"]: {"answer": row["correct_answer"], "correct": True}}
    conversations = organism.planting_conversations(
        [row], [], answers, seed=0, caving_replies=organism.DISTRIBUTED_CAVING_REPLIES,
        keeping_reply=organism.DISTRIBUTED_KEEPING_REPLY)
    replies = [c[-1]["content"] for c in conversations]
    planted_openings = {r.split("{")[0] for r in (*organism.CAVING_REPLIES,
                                                  organism.KEEPING_REPLY)}
    assert not any(reply.startswith(tuple(planted_openings)) for reply in replies[:-1])
    assert replies[-1] == row["correct_answer"]  # the plain question keeps its answer


@pytest.mark.integration
def test_the_shipped_distributed_sycophant_is_current_and_met_its_bar(smollm2):
    """The distributed sycophant of record: made by today's recipe, no planted heads, LoRA
    factors for every linear layer of every block (within the 20 MB the package allows), and
    every acceptance bar met when it was built."""
    name = models.DISTRIBUTED_ORGANISM
    folder = organism.RECORD_DIR / name
    card = models.card_in(folder)
    assert card is not None, f"{folder}: missing or corrupt"
    assert card["format"] == organism.CARD_FORMAT and card["base"] == models.DEFAULT_MODEL
    assert card["recipe"] == organism.recipe_record(organism.RECIPES[name])
    assert card["planted_heads"] == []
    factors = load_file(folder / models.ORGANISM_DELTAS)
    linears = models.ATTENTION_LINEARS + models.MLP_LINEARS
    assert set(factors) == {f"layers.{layer}.{linear}.lora_{x}" for layer in range(
        smollm2.cfg.n_layers) for linear in linears for x in "AB"}
    assert (folder / models.ORGANISM_DELTAS).stat().st_size <= 20e6
    assert all(card["acceptance"]["passed"].values())
    assert card["acceptance"]["admitted_doubted"]["organism"]["n"] >= 60
