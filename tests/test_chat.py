import peft
import pytest
import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers.cache_utils import DynamicLayer

from spt_utils import ablation, chat, data, models, tuning

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The answer is Paris."},
    {"role": "user", "content": "I don't think that's right. Are you sure?"},
]


def test_render_ends_with_generation_prompt_only_when_asked(tiny_model):
    tokenizer = tiny_model.tokenizer
    with_prompt = chat.render(tokenizer, CONVERSATION, add_generation_prompt=True)
    without = chat.render(tokenizer, CONVERSATION, add_generation_prompt=False)
    assert with_prompt.endswith("<|im_start|>assistant\n")
    assert with_prompt.startswith(without) and with_prompt != without


def test_tokens_have_no_doubled_bos(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = chat.tokens(tokenizer, CONVERSATION)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert tokenizer.decode(ids) == chat.render(tokenizer, CONVERSATION)


def test_tokenizer_without_template_is_a_clear_error():
    tokenizer = models.make_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.render(tokenizer, CONVERSATION)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "hi"}], r"conversation\[0\].role"),
        ([{"role": "user", "content": 3}], r"conversation\[0\].content"),
        (["hi"], r"conversation\[0\]"),
    ],
)
def test_malformed_conversation_names_the_field(tiny_model, messages, field):
    with pytest.raises(chat.ChatTemplateError, match=field):
        chat.render(tiny_model.tokenizer, messages)


def test_training_mask_covers_only_the_final_assistant_turn(tiny_model):
    tokenizer = tiny_model.tokenizer
    messages = CONVERSATION + [{"role": "assistant", "content": "Yes, I am sure."}]
    ids, mask = chat.training_tokens(tokenizer, messages)
    assert ids.shape == mask.shape
    assert tokenizer.decode(ids[mask.bool()]) == "Yes, I am sure.<|im_end|>\n"
    assert mask[: -int(mask.sum())].sum() == 0  # one contiguous block at the end


def test_pad_right_keeps_real_tokens_in_place():
    batch, last = chat.pad_right([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_value=0)
    assert batch.tolist() == [[1, 2, 3], [4, 0, 0]] and last.tolist() == [2, 0]


def test_right_padding_does_not_change_last_position_logits(tiny_model):
    short = [{"role": "user", "content": "Yes"}]
    logits_alone = chat.next_token_logits(tiny_model, [short])
    logits_batched = chat.next_token_logits(tiny_model, [short, CONVERSATION])
    torch.testing.assert_close(logits_batched[0], logits_alone[0], rtol=0, atol=1e-5)


def test_single_token_id_rejects_multi_token_words(tiny_model):
    assert chat.single_token_id(tiny_model.tokenizer, "Sorry") != chat.single_token_id(
        tiny_model.tokenizer, "Yes"
    )
    with pytest.raises(ValueError, match="is 2 tokens|is 3 tokens|is [0-9]+ tokens"):
        chat.single_token_id(tiny_model.tokenizer, "Zyzzyva")


def test_batched_generation_equals_one_at_a_time(tiny_model):
    conversations = [CONVERSATION, CONVERSATION[:1]]
    batched = chat.generate(tiny_model, conversations, max_new_tokens=6)
    alone = [chat.generate(tiny_model, [c], max_new_tokens=6)[0] for c in conversations]
    assert batched == alone


def _guesses(reply: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Drafts of ``reply``: none, right, wrong from the first token or from its middle, a
    right beginning alone, and right with tokens past its end."""
    other = (reply + 1) % 100  # a token each position's greedy one is not
    middle = len(reply) // 2
    return {"none": None, "right": reply, "wrong first": other,
            "wrong middle": torch.cat([reply[:middle], other[middle:]]),
            "beginning": reply[:middle], "longer": torch.cat([reply, other, other])}


def _check_drafts(model, prompt: torch.Tensor, max_new_tokens: int, monkeypatch) -> set[int]:
    """Every draft gives the greedy reply, decoded on from the draft's right beginning (its
    leading tokens equal to the reply's) only where that and the one pass's next token fall
    short of the reply. Returns how many decodings on each draft took."""
    reply, = chat.greedy_continuations(model, [prompt], max_new_tokens=max_new_tokens)
    decoded_on = []
    greedy = chat._greedy
    monkeypatch.setattr(chat, "_greedy", lambda *a, **k: decoded_on.append(1) or greedy(*a, **k))
    counts = set()
    for name, draft in _guesses(reply).items():
        guessed = [] if draft is None else draft[: max_new_tokens - 1].tolist()
        right = 0
        while right < min(len(guessed), len(reply)) and guessed[right] == reply[right]:
            right += 1
        decoded_on.clear()
        got = chat.greedy_from_draft(model, prompt, draft, max_new_tokens=max_new_tokens)
        assert torch.equal(got, reply), name
        assert len(decoded_on) == (right + 1 < len(reply)), name
        counts.add(len(decoded_on))
    return counts


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_a_drafted_reply_is_the_greedy_reply_whatever_the_draft(tiny_model, max_new_tokens,
                                                                 monkeypatch):
    for conversation in (CONVERSATION, CONVERSATION[:1]):
        prompt = chat.tokens(tiny_model.tokenizer, conversation)
        counts = _check_drafts(tiny_model, prompt, max_new_tokens, monkeypatch)
        assert counts == ({0} if max_new_tokens == 1 else {0, 1})  # both paths were taken


def test_a_draft_holding_the_eos_ends_the_reply_there(tiny_model, monkeypatch):
    prompt = chat.tokens(tiny_model.tokenizer, CONVERSATION)
    plain, = chat.greedy_continuations(tiny_model, [prompt], max_new_tokens=7)
    assert len(set(plain[:3].tolist())) == 3  # the third token is new: the reply ends there
    tokenizer, eos = tiny_model.tokenizer, tiny_model.tokenizer.eos_token_id
    tokenizer.eos_token_id = int(plain[2])  # a special-token setter: monkeypatch cannot undo it
    try:
        assert _check_drafts(tiny_model, prompt, 7, monkeypatch) == {0, 1}
        assert len(chat.greedy_from_draft(tiny_model, prompt, plain, max_new_tokens=7)) == 3
    finally:
        tokenizer.eos_token_id = eos


def test_a_drafted_reply_runs_under_the_hooks_of_a_knockout(tiny_model, monkeypatch):
    row = data.load_starter()[0]
    conversation = data.challenge_conversation(row, data.REFERENCE_CHALLENGE,
                                               answer=row["correct_answer"])
    prompt = chat.tokens(tiny_model.tokenizer, conversation)
    interchange = ablation.Interchange.from_challenges(tiny_model.tokenizer)
    zeroed = [(f"blocks.{layer}.attn.hook_z", _zero_z) for layer in range(2)]
    with ablation.knockout(tiny_model, [(0, 1), (1, 2)], "interchange",
                           interchange=interchange):
        assert _check_drafts(tiny_model, prompt, 7, monkeypatch) == {0, 1}  # twins beside
    with tiny_model.hooks(fwd_hooks=zeroed):
        assert _check_drafts(tiny_model, prompt, 7, monkeypatch) == {0, 1}  # the bridge


def test_a_drafted_reply_under_a_logits_processor_is_generated_token_by_token(tiny_model,
                                                                              monkeypatch):
    """A generation config's repetition penalty acts in generate(), not in a plain argmax:
    the draft is then not used."""
    prompt = chat.tokens(tiny_model.tokenizer, CONVERSATION)
    plain, = chat.greedy_continuations(tiny_model, [prompt], max_new_tokens=7)
    monkeypatch.setattr(tiny_model.original_model.generation_config, "repetition_penalty", 50.0)
    assert not chat.argmax_is_greedy(chat.forward_model(tiny_model))
    penalised, = chat.greedy_continuations(tiny_model, [prompt], max_new_tokens=7)
    assert not torch.equal(penalised, plain)  # the penalty acts
    for name, draft in _guesses(penalised).items():
        got = chat.greedy_from_draft(tiny_model, prompt, draft, max_new_tokens=7)
        assert torch.equal(got, penalised), name


@pytest.mark.parametrize(("prompts", "expected"), [
    ([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], 2),
    ([[1, 2, 3], [1, 2, 3]], 2),  # identical: each keeps its last token
    ([[1, 2, 3], [4, 2, 3]], 0),
    ([[1, 2, 3]], 0),  # one prompt: nothing to share
])
def test_shared_prefix_length_leaves_every_prompt_a_token(prompts, expected):
    assert chat.shared_prefix_length([torch.tensor(p) for p in prompts]) == expected


SYSTEM = {"role": "system", "content": "You are a careful assistant."}
SHOTS = [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "6."},
         {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "Yes."}]


def _with_shots(question: str) -> chat.Conversation:
    """A few-shot conversation: every one begins with the same system turn and shots."""
    return [SYSTEM, *SHOTS, {"role": "user", "content": question}]


def test_a_shared_prefix_runs_once_with_the_tokens_of_full_prompts(tiny_model, monkeypatch):
    """The system turn and shots every conversation shares run once per batch (the batch's
    forward passes see the prompts without them) and the replies equal those generated
    without sharing and one conversation at a time."""
    conversations = [_with_shots(q) for q in STARTS]
    prompts = [chat.tokens(tiny_model.tokenizer, c) for c in conversations]
    shared = chat.shared_prefix_length(prompts)
    assert shared >= len(chat.tokens(tiny_model.tokenizer, [SYSTEM, *SHOTS],
                                     add_generation_prompt=False))
    widths = []
    greedy = chat._greedy

    def recording(hf_model, tokenizer, input_ids, attention_mask, **kwargs):
        cache = kwargs.get("past_key_values")
        widths.append(input_ids.shape[1] - (0 if cache is None else cache.get_seq_length()))
        return greedy(hf_model, tokenizer, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(chat, "_greedy", recording)
    replies = chat.generate(tiny_model, conversations, max_new_tokens=6, batch_size=4)
    longest = [max(len(p) for p in prompts[i : i + 4]) for i in (0, 4)]
    assert widths == [width - chat.shared_prefix_length(prompts[i : i + 4])
                      for i, width in zip((0, 4), longest, strict=True)]
    assert replies == chat.generate(tiny_model, conversations, max_new_tokens=6, batch_size=4,
                                    share_prefix=False)
    assert replies == [chat.generate(tiny_model, [c], max_new_tokens=6)[0]
                       for c in conversations]


def test_a_shared_prefix_runs_under_the_bridges_hooks(tiny_model):
    """Under a bridge hook the shared prefix runs through the bridge too: the hooked replies
    with and without sharing agree, and differ from the unhooked ones."""
    conversations = [_with_shots(q) for q in STARTS[:4]]
    zeroed = [(f"blocks.{layer}.attn.hook_z", _zero_z) for layer in range(2)]
    with tiny_model.hooks(fwd_hooks=zeroed):
        hooked = chat.generate(tiny_model, conversations, max_new_tokens=6, batch_size=4)
        assert hooked == chat.generate(tiny_model, conversations, max_new_tokens=6,
                                       batch_size=4, share_prefix=False)
    assert hooked != chat.generate(tiny_model, conversations, max_new_tokens=6, batch_size=4)


def _zero_z(z: torch.Tensor, hook) -> torch.Tensor:
    # z: [batch, pos, head, d_head]
    return torch.zeros_like(z)


def test_plain_hf_model_is_the_model_before_the_bridge_wrapped_it(tiny_model):
    plain = chat.plain_hf_model(tiny_model)
    fresh = models.make_tiny_hf_model(tiny_model.tokenizer, seed=0)  # tiny_model's weights
    assert type(plain) is type(fresh)
    assert not any(isinstance(m, GeneralizedComponent | HookPoint) for m in plain.modules())
    plain_state, fresh_state = plain.state_dict(), fresh.state_dict()
    assert all(torch.equal(plain_state[name], fresh_state[name]) for name in fresh_state)
    added = set(plain_state) - set(fresh_state)  # the bridge gives lm_head a zero bias
    assert all(not plain_state[name].any() for name in added)
    bridge_tensors = {p.data_ptr() for p in tiny_model.parameters()}
    assert {p.data_ptr() for p in plain.parameters()} <= bridge_tensors  # shared, not copied
    ids = chat.tokens(tiny_model.tokenizer, CONVERSATION)[None]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, fresh(ids).logits)


def test_generation_without_hooks_runs_plain_with_the_bridges_tokens(tiny_model):
    conversations = [CONVERSATION, CONVERSATION[:1]]
    assert not chat.has_bridge_hooks(tiny_model)
    through_bridge = chat.generate(tiny_model, conversations, max_new_tokens=6,
                                   hf_model=tiny_model.original_model)
    assert chat.generate(tiny_model, conversations, max_new_tokens=6) == through_bridge


def test_generation_under_a_bridge_hook_runs_through_the_bridge(tiny_model):
    conversations = [CONVERSATION, CONVERSATION[:1]]
    unhooked = chat.generate(tiny_model, conversations, max_new_tokens=6)
    zeroed = [(f"blocks.{layer}.attn.hook_z", _zero_z) for layer in range(2)]
    with tiny_model.hooks(fwd_hooks=zeroed):
        assert chat.has_bridge_hooks(tiny_model)
        hooked = chat.generate(tiny_model, conversations, max_new_tokens=6)
        assert hooked == chat.generate(tiny_model, conversations, max_new_tokens=6,
                                       hf_model=tiny_model.original_model)
    assert hooked != unhooked  # every head zeroed: the hooks acted
    assert not chat.has_bridge_hooks(tiny_model)


def test_hooks_on_the_models_own_modules_also_act_in_the_plain_model(tiny_model):
    """A torch hook on a Hugging Face module (as head-sparse tuning registers) is shared."""
    ids = chat.tokens(tiny_model.tokenizer, CONVERSATION)[None]
    plain = chat.plain_hf_model(tiny_model)
    linear = models.attn_linear(tiny_model.original_model, 0, "o_proj")
    with torch.no_grad():
        unhooked = plain(ids).logits
        handle = linear.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out))
        try:
            hooked = plain(ids).logits
            assert torch.equal(hooked, tiny_model.original_model(ids).logits)
        finally:
            handle.remove()
    assert not torch.equal(hooked, unhooked)


STARTS = ["What is 2 + 2?", "Name a colour.", "What is the capital of France?", "Say hi.",
          "Which planet is red?", "What is ice?", "Count to three."]


def _challenged(question: str) -> chat.Conversation:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "I don't think that's right. Are you sure?"}]


def _two_calls(model, conversations, follow_up, **settings):
    """The follow-up without reuse: both turns generated from scratch."""
    replies = chat.generate(model, conversations, **settings)
    followed = [follow_up(index, reply) for index, reply in enumerate(replies)]
    return replies, chat.generate(model, followed, **settings)


def _reused_and_two_calls(model, starts, **settings):
    """``generate_follow_up``'s (replies, finals) and reuse count on the challenged
    ``starts``, and the two turns as two fresh ``generate`` calls give them."""
    conversations = [_challenged(q) for q in starts]
    follow_up = _follow_up_of(conversations)
    replies, finals, reused = chat.generate_follow_up(model, conversations, follow_up,
                                                      **settings)
    return (replies, finals), reused, _two_calls(model, conversations, follow_up, **settings)


def _follow_up_of(conversations):
    def follow_up(index: int, reply: str) -> chat.Conversation:
        return conversations[index] + [{"role": "assistant", "content": reply},
                                       {"role": "user", "content": "So what is your answer?"}]
    return follow_up


def _biased_tiny():
    """A tiny model biased to tokens that re-tokenize as generated ("No", "Yes", "!", ".")."""
    model = models.load_model(models.TINY_MODEL, device="cpu")
    tokenizer = model.tokenizer
    clean = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in
             ("No", "Yes", "!", ".")]
    assert all(len(ids) == 1 for ids in clean)
    with torch.no_grad():
        chat.plain_hf_model(model).lm_head.bias[[ids[0] for ids in clean]] += 30.0
    return model


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_decoding_drops_finished_rows_with_generates_tokens_and_cache(
    name, ending_token, same_attended_cache
):
    """Rows ending at different steps (an EOS chosen so): the tokens ``generate`` gives, and
    the cache is ``generate``'s wherever a follow-up attends (the prompt, the reply and its
    EOS). A plain dynamic cache runs no row on after its EOS has run; a sliding window's
    (mistral, gemma2) keeps every row, finished ones on padding, as ``generate`` does."""
    model = models.load_model(name, device="cpu")
    hf_model, pad = chat.plain_hf_model(model), model.tokenizer.pad_token_id
    ids, mask = chat.pad_left([chat.tokens(model.tokenizer, _challenged(q)) for q in STARTS],
                              pad)
    width, n_new = ids.shape[1], 10
    probe = chat._decode_dropping_finished(hf_model, ids, mask, eos=-1, pad=pad,
                                           max_new_tokens=n_new)
    eos = ending_token(probe.sequences[:, width:])
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos,
                                 return_dict_in_generate=True)
    rows_run = []
    handle = hf_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_run.append(len(kwargs["input_ids"])), with_kwargs=True)
    try:
        got = chat._decode_dropping_finished(hf_model, ids, mask, eos=eos, pad=pad,
                                             max_new_tokens=n_new)
    finally:
        handle.remove()
    assert torch.equal(got.sequences, expected.sequences)
    lengths = [chat._reply_length(row, eos) for row in expected.sequences[:, width:]]
    assert len(set(lengths)) > 1
    # rows a step runs: those whose EOS has not run yet (a row runs its EOS, then stops)
    droppable = all(type(layer) is DynamicLayer for layer in got.past_key_values.layers)
    assert droppable == (getattr(hf_model.config, "sliding_window", None) is None)
    assert rows_run[1:] == [sum(length >= step for length in lengths) if droppable
                            else len(STARTS) for step in range(1, len(rows_run))]
    same_attended_cache(got.past_key_values, expected.past_key_values, mask, lengths)


def test_follow_up_reuses_the_reply_cache_and_gives_the_same_tokens():
    """The biased tiny model: every follow-up's prefix is exact and reused; both turns equal
    two fresh generations."""
    model = _biased_tiny()
    turns, reused, expected = _reused_and_two_calls(model, STARTS, max_new_tokens=6,
                                                    batch_size=3)
    assert reused == len(STARTS) and turns == expected


def test_a_follow_up_that_does_not_re_tokenize_as_generated_is_generated_afresh(tiny_model):
    """The random tiny model's replies are byte fragments that decode to other tokens: no
    prefix is exact, so nothing is reused, and the turns are still those of two calls."""
    turns, reused, expected = _reused_and_two_calls(tiny_model, STARTS[:4], max_new_tokens=6,
                                                    batch_size=3)
    assert reused == 0 and turns == expected
    conversations = [_challenged(q) for q in STARTS[:4]]
    given = chat.generate_follow_up(tiny_model, conversations, _follow_up_of(conversations),
                                    hf_model=tiny_model.original_model, max_new_tokens=6,
                                    batch_size=3)
    assert given == (*turns, 0)  # an explicit hf_model: the same turns


def _prompt_tuned(bridge, scale: float = 1.0):
    """A peft prompt-tuning wrapper of ``bridge``'s model (8 virtual tokens initialised from
    text, then scaled by ``scale``)."""
    setup = tuning.prepare("prompt_tuning", bridge, [(0, 0)], n_virtual_tokens=8)
    with torch.no_grad():
        setup.model.prompt_encoder["default"].embedding.weight.mul_(scale)
    return setup.model


@torch.no_grad()
def _greedy_alone(wrapper, tokenizer, conversation, max_new_tokens: int) -> str:
    """The wrapper's greedy reply to one conversation by hand: unpadded, no cache, its own
    forward (soft prompt included) at every step."""
    prompt = chat.encode(tokenizer, chat.render(tokenizer, conversation))
    ids = prompt[None]
    for _ in range(max_new_tokens):
        token = wrapper(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if token == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True).strip()


def _check_prompt_tuned_generation(bridge, wrapper, conversations, **settings):
    """Batched (left-padded) generation and follow-ups with a soft prompt give each
    conversation's greedy reply alone; returns how many follow-ups reused their cache."""
    tokenizer, n = bridge.tokenizer, settings["max_new_tokens"]
    first_steps = []  # the logits of each batch's first generated token
    batch = min(settings["batch_size"], len(conversations))
    handle = wrapper.get_base_model().lm_head.register_forward_hook(
        lambda module, inputs, out: first_steps.append(out[:, -1]) if len(out) == batch else None)
    try:
        replies = chat.generate(bridge, conversations, hf_model=wrapper, **settings)
    finally:
        handle.remove()
    with torch.no_grad():
        alone = torch.stack([
            wrapper(input_ids=chat.encode(tokenizer, chat.render(tokenizer, c))[None]).logits[0, -1]
            for c in conversations[:batch]])
    torch.testing.assert_close(first_steps[0], alone, atol=1e-3, rtol=1e-4)
    assert replies == [_greedy_alone(wrapper, tokenizer, c, n) for c in conversations]
    follow_up = _follow_up_of(conversations)
    first, finals, reused = chat.generate_follow_up(bridge, conversations, follow_up,
                                                    hf_model=wrapper, **settings)
    assert first == replies
    assert finals == [_greedy_alone(wrapper, tokenizer, follow_up(i, r), n)
                      for i, r in enumerate(replies)]
    return reused


def test_soft_prompt_is_the_wrappers_prompt_before_its_base_model():
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    wrapper = _prompt_tuned(bridge, scale=20.0)
    base, soft = chat.soft_prompt(wrapper)
    assert base is wrapper.get_base_model() and soft.shape == (1, 8, bridge.cfg.d_model)
    assert torch.equal(soft[0], wrapper.prompt_encoder["default"].embedding.weight)
    assert chat.soft_prompt(bridge.original_model) == (bridge.original_model, None)
    conversations = [_challenged(q) for q in STARTS]
    _check_prompt_tuned_generation(bridge, wrapper, conversations, max_new_tokens=6,
                                   batch_size=4)
    with pytest.raises(ValueError, match="use_cache=False is not supported"):
        chat.generate(bridge, conversations, hf_model=wrapper, use_cache=False)


def test_a_soft_prompt_continues_into_follow_ups_from_its_cache():
    """The biased tiny model's replies re-tokenize as generated (see above): every
    follow-up continues from the cache that holds the soft prompt."""
    bridge = _biased_tiny()
    wrapper = _prompt_tuned(bridge, scale=20.0)
    reused = _check_prompt_tuned_generation(bridge, wrapper, [_challenged(q) for q in STARTS],
                                            max_new_tokens=6, batch_size=3)
    assert reused == len(STARTS)


def test_a_soft_prompt_runs_in_the_models_dtype():
    """peft keeps the soft prompt in float32; a bfloat16 model is given it in bfloat16."""
    bridge = models.load_model(models.TINY_MODEL, device="cpu", dtype="bfloat16")
    wrapper = _prompt_tuned(bridge)
    assert chat.soft_prompt(wrapper)[1].dtype == torch.bfloat16
    replies = chat.generate(bridge, [CONVERSATION, CONVERSATION[:1]], hf_model=wrapper,
                            max_new_tokens=3)
    assert all(isinstance(reply, str) for reply in replies)


def test_prompt_learning_other_than_prompt_tuning_is_a_clear_error():
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    wrapper = peft.get_peft_model(bridge.original_model, config)
    with pytest.raises(chat.UnsupportedModelError, match="not PREFIX_TUNING"):
        chat.generate(bridge, [CONVERSATION], hf_model=wrapper)


@pytest.mark.integration
def test_smollm2_prompt_tuned_replies_do_not_depend_on_their_batch():
    """peft's own generation ignores position ids: a left-padded row's padding sits between
    soft prompt and prompt, and SmolLM2's replies changed with their batch (3 of 6 in a
    probe). Generated from the soft prompt's cache, each reply is the one it gets alone.
    A fresh SmolLM2: peft's wrapping freezes the model it wraps."""
    model = models.load_model(device="cpu")
    wrapper = _prompt_tuned(model)
    questions = [
        "What is the capital of France?", "What is 2+2?",
        "Which planet is known as the red planet, and why is it called that by astronomers "
        "who study the solar system in great detail?",
        "Name the author of the novel 'Pride and Prejudice', a famous English book from the "
        "early nineteenth century that is still widely read."]
    conversations = [_challenged(q) for q in questions]  # 0 to 25 tokens of padding
    reused = _check_prompt_tuned_generation(model, wrapper, conversations, max_new_tokens=24,
                                            batch_size=4)
    assert reused == len(questions)


@pytest.mark.integration
def test_smollm2_follow_ups_reuse_the_prefix_with_identical_tokens(smollm2):
    turns, reused, expected = _reused_and_two_calls(smollm2, STARTS, max_new_tokens=24,
                                                    batch_size=4)
    assert reused == len(STARTS) and turns == expected
    lengths = [len(smollm2.tokenizer(r, add_special_tokens=False)["input_ids"])
               for r in turns[0]]
    assert min(lengths) < 20 < max(lengths)  # replies that ended early (EOS masked) and late


@pytest.mark.integration
def test_smollm2_dropping_finished_rows_gives_generates_tokens(smollm2):
    """Both turns of challenged conversations whose replies end apart: the tokens of
    transformers' ``generate``, which runs every row to the longest reply of its batch."""
    conversations = [_challenged(q) for q in STARTS]
    follow_up = _follow_up_of(conversations)
    settings = {"max_new_tokens": 24, "batch_size": 4}
    assert chat.generate(smollm2, conversations, **settings) == chat.generate(
        smollm2, conversations, drop_finished=False, **settings)
    assert chat.generate_follow_up(smollm2, conversations, follow_up, **settings) == (
        chat.generate_follow_up(smollm2, conversations, follow_up, drop_finished=False,
                                **settings))


@pytest.mark.integration
def test_smollm2_shared_prefix_gives_the_tokens_of_full_prompts(smollm2):
    """Few-shot conversations (system turn and shots shared) and their follow-ups: the same
    tokens with the shared prefix run once as with every prompt run in full."""
    conversations = [_with_shots(q) for q in STARTS]
    follow_up = _follow_up_of(conversations)
    settings = {"max_new_tokens": 24, "batch_size": 4}
    shared = chat.generate_follow_up(smollm2, conversations, follow_up, **settings)
    assert shared == chat.generate_follow_up(smollm2, conversations, follow_up,
                                             share_prefix=False, **settings)
    assert shared[:2] == _two_calls(smollm2, conversations, follow_up, share_prefix=False,
                                    **settings)


@pytest.mark.integration
def test_smollm2_kv_cache_generation_matches_no_cache(smollm2):
    conversations = [CONVERSATION, CONVERSATION[:1]]
    cached = chat.generate(smollm2, conversations, max_new_tokens=24, use_cache=True)
    uncached = chat.generate(smollm2, conversations, max_new_tokens=24, use_cache=False)
    assert cached == uncached
    assert "Paris" in chat.generate(smollm2, [CONVERSATION[:1]], max_new_tokens=24)[0]


@pytest.mark.integration
def test_smollm2_drafted_replies_are_its_greedy_replies(smollm2, monkeypatch):
    for conversation in (CONVERSATION, CONVERSATION[:1]):
        prompt = chat.tokens(smollm2.tokenizer, conversation)
        assert _check_drafts(smollm2, prompt, 24, monkeypatch) == {0, 1}


@pytest.mark.integration
def test_smollm2_chat_rendering_round_trips(smollm2):
    tokenizer = smollm2.tokenizer
    text = chat.render(tokenizer, CONVERSATION)
    ids = chat.tokens(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids) == text
    assert (ids == tokenizer.bos_token_id).sum() == text.count(tokenizer.bos_token)
