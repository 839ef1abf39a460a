"""Chat conversations: render with the model's own template, tokenize, mask and generate.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts. Rendered text already
holds the template's own start tokens, so it is always tokenized without an automatic BOS
(the TransformerLens ``prepend_bos=False`` convention).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

Message = dict[str, str]
Conversation = list[Message]
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A conversation or tokenizer cannot be rendered as a chat."""


class UnsupportedModelError(ValueError):
    """A decoder-only method was given an encoder-decoder model (e.g. Flan-T5)."""


def is_encoder_decoder(model: TransformerBridge) -> bool:
    """Is the bridge's model an encoder-decoder (T5) rather than a decoder-only chat model?"""
    return bool(getattr(model.original_model.config, "is_encoder_decoder", False))


def require_decoder_only(model: TransformerBridge, method: str) -> None:
    """Raise :class:`UnsupportedModelError`, naming what is supported, for an encoder-decoder
    model given to ``method``, which runs one decoder stack over the whole prompt."""
    if is_encoder_decoder(model):
        raise UnsupportedModelError(
            f"{method} supports decoder-only models (Llama, Mistral, Qwen, SmolLM2), but "
            f"{model.cfg.model_name!r} is an encoder-decoder model. For encoder-decoder models "
            "(Flan-T5) use spt_utils.seq2seq (generation) and spt_utils.opinion.patch_heads "
            "(decoder self- and cross-attention heads)."
        )


def validate_conversation(messages: Sequence[Any], *, where: str = "conversation") -> None:
    """Raise :class:`ChatTemplateError` naming the message and field that is malformed."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatTemplateError(f"{where}: expected a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"{where}[{index}]: expected a dict, got {type(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatTemplateError(f"{where}[{index}].role: {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ChatTemplateError(f"{where}[{index}].content: expected a string")


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The conversation as text, in the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ChatTemplateError(
            f"The tokenizer of {name!r} has no chat template. Use an instruction-tuned "
            "(chat) model, or set `tokenizer.chat_template` to a Jinja template first."
        )
    validate_conversation(messages)
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> Int[Tensor, " pos"]:
    """Token ids of already-rendered chat text, with no BOS added."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def tokens(
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    *,
    add_generation_prompt: bool = True,
) -> Int[Tensor, " pos"]:
    """Render and tokenize a conversation (no doubled BOS)."""
    text = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return encode(tokenizer, text)


def training_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation
) -> tuple[Int[Tensor, " pos"], Int[Tensor, " pos"]]:
    """Token ids and a 0/1 loss mask that covers only the final assistant turn."""
    validate_conversation(messages)
    if messages[-1]["role"] != "assistant":
        raise ChatTemplateError(
            "conversation[-1].role: a training example must end with an assistant turn"
        )
    prompt = tokens(tokenizer, messages[:-1], add_generation_prompt=True)
    full = tokens(tokenizer, messages, add_generation_prompt=False)
    if len(full) <= len(prompt) or not torch.equal(full[: len(prompt)], prompt):
        raise ChatTemplateError(
            "The rendered conversation does not extend its own prompt token for token, so the "
            "final assistant turn cannot be located; check the chat template."
        )
    mask = torch.zeros_like(full)
    mask[len(prompt) :] = 1
    return full, mask


def pad_right(
    sequences: Sequence[Tensor], pad_value: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Stack 1-D sequences with right padding; also return each row's last real index.

    Right padding keeps every real token at its unpadded position, so under causal attention
    the real positions compute exactly what they would alone, with no attention mask.
    """
    if not sequences:
        raise ValueError("pad_right: no sequences")
    lengths = torch.tensor([len(s) for s in sequences])
    batch = torch.full((len(sequences), int(lengths.max())), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return batch, lengths - 1


def pad_left(
    sequences: Sequence[Tensor], pad_value: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack 1-D sequences with left padding (for generation); also return the attention mask."""
    width = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, width - len(sequence) :] = sequence
        mask[row, width - len(sequence) :] = 1
    return batch, mask


@torch.no_grad()
def next_token_logits(
    model: TransformerBridge, conversations: Sequence[Conversation]
) -> Float[Tensor, "batch d_vocab"]:
    """Logits for the token after each conversation's generation prompt."""
    require_decoder_only(model, "chat.next_token_logits")
    tokenizer = model.tokenizer
    batch, last = pad_right([tokens(tokenizer, c) for c in conversations], tokenizer.pad_token_id)
    logits = model(batch.to(model.cfg.device), return_type="logits")
    # logits: [batch, pos, d_vocab]
    return logits[torch.arange(len(last)), last]


def _unwrapped(module: nn.Module) -> nn.Module:
    """``module`` with every bridge component replaced by the original it wraps: shallow copies
    down to the first unchanged subtree, sharing every parameter, buffer and torch hook."""
    while isinstance(module, GeneralizedComponent) and (
            module._modules.get("_original_component") is not None):
        module = module._modules["_original_component"]
    children = {name: None if child is None else _unwrapped(child)
                for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)  # shares _parameters, _buffers and the hook dicts
    clone.__dict__["_modules"] = children
    return clone


def has_bridge_hooks(model: TransformerBridge) -> bool:
    """Whether a hook is registered on one of the bridge's own modules (its hook points and
    wrapping components), e.g. a knockout: generation must then run through the bridge. The
    capture hooks TransformerLens's blocks install for themselves do not count."""
    modules = list(model.modules())
    internal = {handle.id for module in modules
                for handle in getattr(module, "_capture_hook_handles", ())}
    return any(
        (module._forward_hooks.keys() | module._forward_pre_hooks.keys()) - internal
        for module in modules if isinstance(module, GeneralizedComponent | HookPoint)
    )


def plain_hf_model(model: TransformerBridge) -> nn.Module:
    """The bridge's Hugging Face model as it was before the bridge wrapped it: the same
    weights and the same hooks on its own modules, without the bridge's hook points in the
    forward pass (a plain transformers model's speed). Hooks added to the bridge do not fire
    in it (see :func:`has_bridge_hooks`)."""
    return _unwrapped(model.original_model)


def forward_model(model: TransformerBridge, hf_model: Any = None) -> Any:
    """The Hugging Face model to run for ``model``: ``hf_model`` when given, else the bridge's
    model, through the bridge while a hook is registered on it and unwrapped
    (:func:`plain_hf_model`, the same logits) when none is."""
    if hf_model is not None:
        return hf_model
    return model.original_model if has_bridge_hooks(model) else plain_hf_model(model)


# The places in its batch of the rows a forward pass of greedy decoding runs (rows that have
# finished are dropped, :func:`_greedy`); None outside decoding.
_DECODING_ROWS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "decoding_rows", default=None)


def decoding_rows() -> Int[Tensor, " batch"] | None:
    """While :func:`_greedy` decodes, each running row's place in the batch it was given (a
    row that has finished no longer runs, so a hook that picks something per row, such as a
    resample donor, keeps it per place); None outside decoding."""
    return _DECODING_ROWS.get()


@contextlib.contextmanager
def _decoding(rows: Int[Tensor, " batch"]) -> Iterator[None]:
    """:func:`decoding_rows` is ``rows`` inside the block."""
    token = _DECODING_ROWS.set(rows)
    try:
        yield
    finally:
        _DECODING_ROWS.reset(token)


def _greedy(
    hf_model: Any, tokenizer: PreTrainedTokenizerBase, input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"], *, max_new_tokens: int, use_cache: bool = True,
    past_key_values: Any = None, drop_finished: bool = True,
) -> Any:
    """Batched greedy decoding; returns ``sequences`` (the input, then each row's new tokens,
    padded after its EOS) and the KV cache, as ``generate`` does. With ``drop_finished``, the
    cache and no logits processor (:func:`argmax_is_greedy`),
    :func:`_decode_dropping_finished`; otherwise one ``generate`` call."""
    if drop_finished and use_cache and argmax_is_greedy(hf_model):
        return _decode_dropping_finished(
            hf_model, input_ids, attention_mask, eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
            past_key_values=past_key_values)
    return hf_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, past_key_values=past_key_values,
        return_dict_in_generate=True,
    )


def _rows_of_copies(rows: Int[Tensor, " kept"], batch: int, copies: int) -> Int[Tensor, " held"]:
    """A cache's row indices for ``rows`` of a batch when it holds ``copies`` rows per batch
    row (an interchange knockout appends the twins after the batch: 2)."""
    return torch.cat([held * batch + rows for held in range(copies)])


@torch.no_grad()
def _decode_dropping_finished(
    hf_model: Any, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
    *, eos: int, pad: int, max_new_tokens: int, past_key_values: Any = None,
) -> SimpleNamespace:
    """Greedy decoding with the KV cache that stops running a row once it has finished: the
    step after a row's EOS (its EOS is run too, so its cache holds the whole reply for a
    follow-up turn), the row's cache is set aside and the batch goes on without it. A
    decoding step costs about its rows here, and replies end at different lengths, so the
    finished rows ``generate`` would run to the longest reply are not paid for.

    The same tokens as ``generate`` up to floating-point order (the batch shrinks); the cache
    returned is ``generate``'s for every position a row attends to (the prompt, the reply and
    its EOS; later positions are zeros where ``generate`` ran padding, masked by any
    follow-up). ``past_key_values`` covers the first columns of ``input_ids`` (a shared
    prefix), and positions follow the attention mask. Hooks that pick a value per row read
    each running row's place in the batch from :func:`decoding_rows`. A cache with other than
    plain dynamic layers (a sliding window's) keeps its finished rows, which then run on
    padding, as in ``generate``."""
    batch = len(input_ids)
    device = input_ids.device
    past = 0 if past_key_values is None else past_key_values.get_seq_length()
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    running = torch.arange(batch, device=device)  # each running row's place in the batch
    with _decoding(running):
        output = hf_model(input_ids=input_ids[:, past:], attention_mask=attention_mask,
                          position_ids=positions[:, past:], past_key_values=past_key_values,
                          use_cache=True, logits_to_keep=1)
    cache, mask = output.past_key_values, attention_mask
    copies = (cache_rows(cache) or batch) // batch
    droppable = all(type(layer) is DynamicLayer for layer in cache.layers)
    new_tokens = input_ids.new_full((batch, max_new_tokens), pad)
    set_aside: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]] = []  # (rows, per-layer k, v)
    token = output.logits[:, -1].argmax(-1)  # [running]
    done = torch.zeros_like(token, dtype=torch.bool)  # rows whose EOS has been chosen
    steps = 0
    for step in range(max_new_tokens):
        token = token.masked_fill(done, pad)  # a finished row kept running gets padding
        new_tokens[running, step] = token
        steps, done = step + 1, done | (token == eos)
        if done.all() or steps == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=1)
        with _decoding(running):
            output = hf_model(input_ids=token[:, None], attention_mask=mask,
                              position_ids=mask.sum(-1, keepdim=True) - 1,
                              past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = output.logits[:, -1].argmax(-1)
        if droppable and done.any():  # these rows have now run their EOS
            finished = _rows_of_copies(done.nonzero()[:, 0], len(running), copies)
            set_aside.append((running[done], [(layer.keys[finished], layer.values[finished])
                                              for layer in cache.layers]))
            kept = ~done
            _select_cache_rows(cache, kept.nonzero()[:, 0], len(running), device)
            running, mask, token, done = running[kept], mask[kept], token[kept], done[kept]
    if set_aside:
        _reassemble(cache, running, set_aside, batch, copies)
    return SimpleNamespace(sequences=torch.cat([input_ids, new_tokens[:, :steps]], dim=1),
                           past_key_values=cache)


def _reassemble(
    cache: Any, running: Int[Tensor, " running"],
    set_aside: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]], batch: int, copies: int,
) -> None:
    """Put the rows set aside back into ``cache`` in their places (every copy of each), their
    positions after the reply zeros, as long as the rows that ran to the end."""
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # [copies * running, kv_head, pos, d_head]
        full_keys = keys.new_zeros((copies * batch, *keys.shape[1:]))
        full_values = values.new_zeros((copies * batch, *values.shape[1:]))
        places = _rows_of_copies(running, batch, copies)
        full_keys[places], full_values[places] = keys, values
        for rows, layers in set_aside:
            done_keys, done_values = layers[index]
            places, length = _rows_of_copies(rows, batch, copies), done_keys.shape[2]
            full_keys[places, :, :length], full_values[places, :, :length] = (done_keys,
                                                                              done_values)
        layer.keys, layer.values = full_keys, full_values


def shared_prefix_length(prompts: Sequence[Int[Tensor, " pos"]]) -> int:
    """How many leading tokens every prompt shares (e.g. the system turn, or few-shot
    demonstrations), leaving each prompt at least one token of its own; 0 for one prompt."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts) - 1
    # same: [pos], whether every prompt has the first prompt's token there
    same = torch.stack([p[:shortest] for p in prompts]).eq(prompts[0][:shortest]).all(0)
    differs = (~same).nonzero()
    return int(differs[0, 0]) if len(differs) else shortest


def soft_prompt(hf_model: Any) -> tuple[Any, Float[Tensor, "1 virtual d_model"] | None]:
    """The model a generation runs and the soft prompt it starts from: for a peft
    prompt-tuning wrapper, its base model and its virtual tokens' embeddings; else
    ``(hf_model, None)``.

    The soft prompt runs as a cached prefix (:func:`_generation_input`), so positions follow
    the attention mask as for any prompt. peft's own generation ignores position ids and puts
    a left-padded row's padding between the soft prompt and the prompt: each row's reply then
    depends on how long the longest prompt of its batch is."""
    config = getattr(hf_model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return hf_model, None
    if config.peft_type != "PROMPT_TUNING":
        raise UnsupportedModelError(
            f"generation supports peft prompt tuning among prompt-learning methods, not "
            f"{getattr(config.peft_type, 'value', config.peft_type)}")
    base = hf_model.get_base_model()
    # peft keeps the soft prompt in float32 and casts it as it runs; so does this
    return base, hf_model.get_prompt(batch_size=1).detach().to(base.dtype)


def _generation_input(
    hf_model: Any, prompts: Sequence[Int[Tensor, " pos"]], pad_token_id: int, device, *,
    share_prefix: bool, soft: Float[Tensor, "1 virtual d_model"] | None = None,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Any]:
    """A batch's generation input ``(input_ids, attention_mask, past_key_values)``.

    Without a prefix: the prompts left-padded, no cache. With one (a ``soft`` prompt, and
    with ``share_prefix`` the tokens every prompt shares, :func:`shared_prefix_length`), the
    prefix is run once and its KV cache repeated over the batch; the input is the prefix
    (a soft prompt's ids are pad placeholders, read from the cache only), then each prompt's
    rest left-padded, the padding masked in the middle. Positions follow the mask, so every
    real token sits where it does alone: the same greedy decoding up to floating-point
    order. (The padding inside a sequence counts towards a sliding attention window: on a
    sliding-window model, a prompt longer than the window may differ slightly.)"""
    length = shared_prefix_length(prompts) if share_prefix else 0
    rest_ids, rest_mask = pad_left([p[length:] for p in prompts], pad_token_id)
    if length == 0 and soft is None:
        return rest_ids.to(device), rest_mask.to(device), None
    cache = None
    if soft is not None:
        cache = hf_model(inputs_embeds=soft.to(device), use_cache=True,
                         logits_to_keep=1).past_key_values
    prefix = prompts[0][:length]
    if length:
        cache = hf_model(input_ids=prefix[None].to(device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(len(prompts))
    n_virtual = 0 if soft is None else soft.shape[1]
    batch = len(prompts)
    input_ids = torch.cat([torch.full((batch, n_virtual), pad_token_id, dtype=rest_ids.dtype),
                           prefix.expand(batch, -1), rest_ids], dim=1)
    attention_mask = torch.cat(
        [torch.ones(batch, n_virtual + length, dtype=torch.long), rest_mask], dim=1)
    return input_ids.to(device), attention_mask.to(device), cache


def cache_rows(cache: Any) -> int | None:
    """How many rows a KV cache holds (None when it is absent or empty)."""
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else None
    return None if keys is None or keys.numel() == 0 else int(keys.shape[0])


def _select_cache_rows(
    cache: Any, rows: list[int] | Int[Tensor, " kept"], batch: int, device
) -> None:
    """Keep ``rows`` of a batch's KV cache. A cache holding ``k`` rows per batch row (an
    interchange knockout appends each row's twin after the batch: ``k = 2``) keeps every
    copy of each, in the same layout."""
    copies = (cache_rows(cache) or batch) // batch
    cache.batch_select_indices(_rows_of_copies(torch.as_tensor(rows, device=device), batch,
                                               copies))


def _decode(tokenizer: PreTrainedTokenizerBase, new_tokens: Tensor, prefill: str) -> list[str]:
    return [(prefill + text).strip()
            for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def generate(
    model: TransformerBridge,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    use_cache: bool = True,
    progress: bool = False,
    hf_model: Any = None,
    prefill: str = "",
    share_prefix: bool = True,
    drop_finished: bool = True,
) -> list[str]:
    """Greedy replies to each conversation, batched with left padding.

    Runs ``hf_model`` when given (e.g. a peft wrapper of the bridge's model). Otherwise,
    while a hook is registered on the bridge (e.g. a knockout), its underlying Hugging Face
    model runs through the bridge, so the hooks act during generation; with none, the same
    model without the bridge's wrapping (:func:`plain_hf_model`: the same tokens at a plain
    transformers model's speed). ``prefill`` starts the assistant's reply (e.g. ``"The answer
    is ("``); replies include it. With the KV cache, the tokens a batch's prompts share (the
    system turn, few-shot demonstrations) run once (``share_prefix``,
    :func:`shared_prefix_length`), after a prompt-tuning ``hf_model``'s soft prompt
    (:func:`soft_prompt`; it needs the cache). With the cache, a row stops running once it has
    finished (``drop_finished``, :func:`_decode_dropping_finished`; False: transformers'
    ``generate``, which runs every row of a batch to its longest reply).
    """
    require_decoder_only(model, "chat.generate (KV-cache generation)")
    tokenizer = model.tokenizer
    hf_model, soft = soft_prompt(forward_model(model, hf_model))
    if soft is not None and not use_cache:
        raise ValueError("a soft prompt is generated from as a cached prefix: use_cache=False "
                         "is not supported with a prompt-tuning hf_model")
    share_prefix = share_prefix and use_cache
    device = model.cfg.device
    replies: list[str] = []
    starts = range(0, len(conversations), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        chunk = [
            encode(tokenizer, render(tokenizer, c) + prefill)
            for c in conversations[start : start + batch_size]
        ]
        input_ids, attention_mask, cache = _generation_input(
            hf_model, chunk, tokenizer.pad_token_id, device, share_prefix=share_prefix,
            soft=soft)
        output = _greedy(hf_model, tokenizer, input_ids, attention_mask,
                         max_new_tokens=max_new_tokens, use_cache=use_cache,
                         past_key_values=cache, drop_finished=drop_finished)
        replies += _decode(tokenizer, output.sequences[:, input_ids.shape[1]:], prefill)
    return replies


@torch.no_grad()
def greedy_continuations(
    model: TransformerBridge, prompts: Sequence[Int[Tensor, " pos"]], *, max_new_tokens: int,
    batch_size: int = 16,
) -> list[Int[Tensor, " new"]]:
    """Each token prompt's greedy continuation, up to ``max_new_tokens`` tokens or its first
    EOS (included): the reply tokens themselves, for teacher-forcing them later."""
    require_decoder_only(model, "chat.greedy_continuations")
    tokenizer, hf_model = model.tokenizer, forward_model(model)
    replies = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = pad_left(prompts[start : start + batch_size],
                                             tokenizer.pad_token_id)
        output = _greedy(hf_model, tokenizer, input_ids.to(model.cfg.device),
                         attention_mask.to(model.cfg.device), max_new_tokens=max_new_tokens)
        for new in output.sequences[:, input_ids.shape[1]:].cpu():
            replies.append(new[: _reply_length(new, tokenizer.eos_token_id)])
    return replies


def _reply_length(new_tokens: Int[Tensor, " new"], eos_token_id: int) -> int:
    """How many generated tokens a reply holds: up to and including its first EOS."""
    ends = (new_tokens == eos_token_id).nonzero()
    return int(ends[0, 0]) + 1 if len(ends) else len(new_tokens)


# generate()'s logits processors that act under greedy decoding when a model's generation
# config sets them (name → its neutral value): a token checked by plain argmax is the greedy
# one only without them
GREEDY_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                     "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0,
                     "min_new_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
                     "forced_eos_token_id": None, "exponential_decay_length_penalty": None}


def argmax_is_greedy(hf_model: Any) -> bool:
    """Whether ``generate``'s greedy token is the logits' argmax for ``hf_model``: its
    generation config sets none of :data:`GREEDY_PROCESSORS`."""
    config = getattr(hf_model, "generation_config", None)
    return config is None or all(getattr(config, name, None) in (None, neutral)
                                 for name, neutral in GREEDY_PROCESSORS.items())


@torch.no_grad()
def greedy_from_draft(
    model: TransformerBridge, prompt: Int[Tensor, " pos"], draft: Int[Tensor, " new"] | None,
    *, max_new_tokens: int,
) -> Int[Tensor, " new"]:
    """The greedy reply tokens to one token ``prompt`` (up to ``max_new_tokens`` or its first
    EOS, included), checked against a guess of them, ``draft`` (e.g. the reply before a head
    was clicked): one forward pass over the prompt and the draft gives the greedy token after
    each of its prefixes; the draft's tokens are kept up to the first that differs from its
    greedy token, which replaces it, and the reply is decoded on from there with that pass's
    KV cache (cut back to what was kept). Any draft (or none) gives the same greedy reply as
    :func:`greedy_continuations`, up to floating-point order (the kept tokens were run side by
    side, not one at a time); a right draft takes one pass instead of one per token. Runs
    :func:`forward_model`, so hooks on the bridge act as in :func:`generate`; where the
    model's generation config sets a logits processor (:func:`argmax_is_greedy`), the draft
    is not used and the reply is generated token by token."""
    require_decoder_only(model, "chat.greedy_from_draft")
    tokenizer, hf_model = model.tokenizer, forward_model(model)
    device, eos, prompt = model.cfg.device, tokenizer.eos_token_id, prompt.cpu()
    if not argmax_is_greedy(hf_model):
        return greedy_continuations(model, [prompt], max_new_tokens=max_new_tokens)[0]
    draft = (prompt.new_zeros(0) if draft is None else draft.cpu())[: max_new_tokens - 1]
    checked = hf_model(input_ids=torch.cat([prompt, draft])[None].to(device),
                       use_cache=True, logits_to_keep=len(draft) + 1)
    greedy = checked.logits[0].argmax(-1).cpu()  # [len(draft) + 1]: the token after each prefix
    differs = (greedy[:-1] != draft).nonzero()
    kept = int(differs[0, 0]) if len(differs) else len(draft)
    new = torch.cat([draft[:kept], greedy[kept : kept + 1]])
    new = new[: _reply_length(new, eos)]
    if new[-1] == eos or len(new) >= max_new_tokens:
        return new
    cache = checked.past_key_values
    # forget the draft's tokens after the kept ones (a negative crop removes that many)
    cache.crop(len(prompt) + kept - cache.get_seq_length())
    input_ids = torch.cat([prompt, new])[None].to(device)
    output = _greedy(hf_model, tokenizer, input_ids, torch.ones_like(input_ids),
                     max_new_tokens=max_new_tokens - len(new), past_key_values=cache)
    rest = output.sequences[0, input_ids.shape[1]:].cpu()
    return torch.cat([new, rest[: _reply_length(rest, eos)]])


@torch.no_grad()
def generate_follow_up(
    model: TransformerBridge,
    conversations: Sequence[Conversation],
    follow_up: Callable[[int, str], Conversation],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    hf_model: Any = None,
    follow_up_prefill: str = "",
    share_prefix: bool = True,
    drop_finished: bool = True,
) -> tuple[list[str], list[str], int]:
    """Greedy replies to ``conversations``, then greedy replies to each ``follow_up(index,
    reply)`` (the conversation continued by the reply and a new user turn): ``(replies,
    follow-up replies, how many follow-ups reused their prefix)``.

    A follow-up whose tokens begin with exactly its conversation's prompt and generated reply
    tokens (the usual case; not when the reply re-tokenizes differently) continues from the
    KV cache of the reply's generation (after a prompt-tuning ``hf_model``'s soft prompt,
    :func:`soft_prompt`): only its new turn is run, not the whole conversation again. The
    others are generated afresh. The same greedy decoding as :func:`generate` on the two
    turns, up to floating-point order in the reused prefix; the first turn shares its batch's
    common prefix and stops running finished rows as :func:`generate` does (``share_prefix``,
    ``drop_finished``).
    """
    require_decoder_only(model, "chat.generate_follow_up (KV-cache generation)")
    tokenizer, device = model.tokenizer, model.cfg.device
    given = hf_model
    hf_model, soft = soft_prompt(forward_model(model, hf_model))
    replies: list[str] = []
    finals: list[str | None] = []
    fresh: dict[int, Conversation] = {}
    starts = range(0, len(conversations), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        chunk = [encode(tokenizer, render(tokenizer, c))
                 for c in conversations[start : start + batch_size]]
        input_ids, attention_mask, prefix_cache = _generation_input(
            hf_model, chunk, tokenizer.pad_token_id, device, share_prefix=share_prefix,
            soft=soft)
        output = _greedy(hf_model, tokenizer, input_ids, attention_mask,
                         max_new_tokens=max_new_tokens, past_key_values=prefix_cache,
                         drop_finished=drop_finished)
        new_tokens = output.sequences[:, input_ids.shape[1]:].cpu()
        batch_replies = _decode(tokenizer, new_tokens, "")
        replies += batch_replies
        followed = [follow_up(start + row, reply) for row, reply in enumerate(batch_replies)]
        wanted = [encode(tokenizer, render(tokenizer, c) + follow_up_prefill) for c in followed]
        lengths = [_reply_length(tokens, tokenizer.eos_token_id) for tokens in new_tokens]
        cache = output.past_key_values
        exact = [
            row for row, (prompt, target) in enumerate(zip(chunk, wanted, strict=True))
            if cache is not None and len(target) > len(prompt) + lengths[row]
            and torch.equal(target[: len(prompt) + lengths[row]],
                            torch.cat([prompt, new_tokens[row, : lengths[row]]]))
        ]
        batch_finals: list[str | None] = [None] * len(chunk)
        if exact:
            # the cached region: prompt (left padded) and reply, its post-EOS padding masked
            width = new_tokens.shape[1]
            generated_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
            region_ids = output.sequences.cpu()[exact]
            region_mask = torch.cat([attention_mask.cpu(), generated_mask], dim=1)[exact]
            suffixes = [wanted[row][len(chunk[row]) + lengths[row]:] for row in exact]
            suffix_ids, suffix_mask = pad_left(suffixes, tokenizer.pad_token_id)
            _select_cache_rows(cache, exact, len(chunk), device)
            continued = torch.cat([region_ids, suffix_ids], dim=1)
            follow = _greedy(hf_model, tokenizer, continued.to(device),
                             torch.cat([region_mask, suffix_mask], dim=1).to(device),
                             max_new_tokens=max_new_tokens, past_key_values=cache,
                             drop_finished=drop_finished)
            texts = _decode(tokenizer, follow.sequences[:, continued.shape[1]:],
                            follow_up_prefill)
            for row, text in zip(exact, texts, strict=True):
                batch_finals[row] = text
        fresh |= {start + row: followed[row] for row in range(len(chunk)) if row not in exact}
        finals += batch_finals
    if fresh:
        texts = generate(model, list(fresh.values()), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, hf_model=given, prefill=follow_up_prefill,
                         share_prefix=share_prefix, drop_finished=drop_finished)
        for index, text in zip(fresh, texts, strict=True):
            finals[index] = text
    return replies, finals, len(conversations) - len(fresh)


def single_token_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """The id of ``word`` as it starts an assistant reply; an error if it is several tokens."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"Answer word {word!r} is {len(ids)} tokens for this tokenizer ({pieces}); "
            "choose a single-token word or use the explicit first-token policy."
        )
    return ids[0]
