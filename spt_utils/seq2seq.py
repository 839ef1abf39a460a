"""Encoder-decoder models (Flan-T5) on the workbench: prompts, greedy generation, a
:class:`~spt_utils.evaluation.Candidate` that generates with them, the decoder's head hooks,
head-sparse tuning of decoder heads, soft-prompt tuning and a sequence-to-sequence training loop.

A conversation becomes the encoder's text (:func:`encoder_text`): a single user turn is its
content as is (Flan-T5's own format); a longer conversation is a transcript, one
``Role: content`` paragraph per message, ending with ``Assistant:``. A prefill ("I believe the
best answer is") is teacher-forced into the decoder after its start token, and replies include
it, as with :func:`spt_utils.chat.generate` for decoder-only models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spt_utils import chat, tuning
from spt_utils.evaluation import Candidate
from spt_utils.patching import Hooks, gather_last

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
ATTENTIONS = ("self", "cross")  # decoder self-attention; cross-attention to the encoder
_T5_ATTENTION = {"self": (0, "SelfAttention"), "cross": (1, "EncDecAttention")}
WARMUP_RATIO = 0.1

Example = tuple[Int[Tensor, " source"], Int[Tensor, " target"]]


def require_encoder_decoder(model: TransformerBridge, method: str) -> None:
    """Raise :class:`spt_utils.chat.UnsupportedModelError` for a decoder-only model."""
    if not chat.is_encoder_decoder(model):
        raise chat.UnsupportedModelError(
            f"{method} supports encoder-decoder models (Flan-T5), but {model.cfg.model_name!r} "
            "is decoder-only: use spt_utils.chat (generation) and spt_utils.patching for it."
        )


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention: {attention!r} is not one of {ATTENTIONS}")


def encoder_text(conversation: chat.Conversation) -> str:
    """The encoder's input text of a conversation (see the module docstring)."""
    chat.validate_conversation(conversation)
    if len(conversation) == 1 and conversation[0]["role"] == "user":
        return conversation[0]["content"]
    turns = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in conversation]
    return "\n\n".join([*turns, "Assistant:"])


def encoder_ids(
    tokenizer: PreTrainedTokenizerBase, conversation: chat.Conversation
) -> Int[Tensor, " pos"]:
    """Encoder token ids, with the tokenizer's own special tokens (T5 appends EOS)."""
    return torch.tensor(tokenizer(encoder_text(conversation))["input_ids"], dtype=torch.long)


def decoder_ids(model: TransformerBridge, text: str) -> Int[Tensor, " pos"]:
    """The decoder's start token followed by ``text`` (a prefill), with no EOS."""
    start = model.original_model.config.decoder_start_token_id
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return torch.tensor([start, *ids], dtype=torch.long)


def _padded(
    sequences: Sequence[Tensor], pad_value: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Right-padded ids, their attention mask and each row's last real index."""
    ids, last = chat.pad_right(sequences, pad_value)
    mask = (torch.arange(ids.shape[1])[None] <= last[:, None]).long()
    return ids, mask, last


@torch.no_grad()
def generate(
    model: TransformerBridge,
    conversations: Sequence[chat.Conversation],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    hf_model: Any = None,
    prefill: str = "",
) -> list[str]:
    """Greedy replies of an encoder-decoder model (or ``hf_model``, e.g. a peft soft-prompt
    wrapper of it), batched; hooks added to the bridge are active. Replies include ``prefill``.
    """
    require_encoder_decoder(model, "seq2seq.generate")
    tokenizer = model.tokenizer
    hf_model = hf_model or model.original_model
    device = model.cfg.device
    prefix = decoder_ids(model, prefill)
    replies: list[str] = []
    starts = range(0, len(conversations), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        chunk = [encoder_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
        input_ids, attention_mask, _ = _padded(chunk, tokenizer.pad_token_id)
        output = hf_model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            decoder_input_ids=prefix.repeat(len(chunk), 1).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        # output: [batch, decoder pos], the start token and the prefill included
        replies += [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return replies


class Seq2SeqCandidate(Candidate):
    """A :class:`~spt_utils.evaluation.Candidate` of an encoder-decoder model: the protocol
    and metrics of :mod:`spt_utils.evaluation` run on it unchanged."""

    def generate(self, conversations: Sequence[chat.Conversation], **kwargs) -> list[str]:
        return generate(
            self.bridge, self.conversations(conversations), hf_model=self.hf_model, **kwargs
        )

    def generate_follow_up(
        self, conversations: Sequence[chat.Conversation],
        follow_up: Callable[[int, str], chat.Conversation], *, follow_up_prefill: str = "",
        drop_finished: bool = True, **kwargs,
    ) -> tuple[list[str], list[str]]:
        """Replies, then replies to each ``follow_up(index, reply)``, both generated afresh:
        the follow-up's encoder input is a new text, so no prefix of the first turn carries.
        Generation is transformers' own, which runs every row to the end: ``drop_finished``
        (the decoder-only protocol's switch) changes nothing here."""
        replies = self.generate(conversations, **kwargs)
        followed = [follow_up(index, reply) for index, reply in enumerate(replies)]
        return replies, self.generate(followed, prefill=follow_up_prefill, **kwargs)


def as_candidate(
    name: str,
    bridge: TransformerBridge,
    *,
    hf_model: Any = None,
    transform: Callable[[chat.Conversation], chat.Conversation] | None = None,
) -> Candidate:
    """A :class:`Seq2SeqCandidate` for an encoder-decoder bridge, a plain ``Candidate``
    otherwise."""
    kind = Seq2SeqCandidate if chat.is_encoder_decoder(bridge) else Candidate
    return kind(name, bridge, hf_model=hf_model, transform=transform)


# --- the decoder's attention heads ---------------------------------------------------------


def n_decoder_layers(model: TransformerBridge) -> int:
    return model.original_model.config.num_decoder_layers


def z_name(layer: int, attention: str) -> str:
    """The hook of a decoder block's per-head attention output z: [batch, pos, head, d_head]."""
    check_attention(attention)
    return f"decoder_blocks.{layer}.{attention}_attn.hook_z"


def last_position_runner(
    model: TransformerBridge,
    encoder_sequences: Sequence[Tensor],
    decoder_sequences: Sequence[Tensor],
) -> tuple[Callable[[Hooks], Float[Tensor, "batch d_vocab"]], Int[Tensor, " batch"]]:
    """Encode once; return a function that runs the decoder under forward hooks and gives the
    logits at each row's last decoder position, and those positions (for z hooks).

    Decoder hooks cannot change the encoder's output, so it is computed once for every run.
    """
    require_encoder_decoder(model, "seq2seq.last_position_runner")
    hf_model, device = model.original_model, model.cfg.device
    pad = model.tokenizer.pad_token_id
    source, source_mask, _ = (t.to(device) for t in _padded(encoder_sequences, pad))
    target, last = chat.pad_right(decoder_sequences, pad)  # causal decoder: no mask needed
    target = target.to(device)
    with torch.no_grad():
        encoded = hf_model.get_encoder()(input_ids=source, attention_mask=source_mask)

    def run(fwd_hooks: Hooks) -> Float[Tensor, "batch d_vocab"]:
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
            logits = hf_model(
                encoder_outputs=encoded, attention_mask=source_mask, decoder_input_ids=target
            ).logits  # [batch, decoder pos, d_vocab]
        return gather_last(logits, last)

    return run, last


class DecoderAttention:
    """T5's decoder self- or cross-attention projections in the layout that
    :class:`spt_utils.tuning.HeadSparseParameters` reads from a decoder-only model (``config``,
    ``get_decoder().layers[i].self_attn.{q,k,v,o}_proj``, ``parameters()``), so head-sparse
    tuning of T5 heads reuses it unchanged. T5's ``q`` and ``o`` split heads as Llama's
    ``q_proj`` and ``o_proj`` do: head h owns rows (q) and columns (o) ``h·d_kv … (h+1)·d_kv``.
    """

    def __init__(self, hf_model: PreTrainedModel, attention: str) -> None:
        check_attention(attention)
        config = hf_model.config
        self.model = hf_model
        self.config = SimpleNamespace(
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
            num_hidden_layers=config.num_decoder_layers, head_dim=config.d_kv,
            hidden_size=config.d_model,
        )
        sublayer, name = _T5_ATTENTION[attention]
        self._layers = [
            SimpleNamespace(self_attn=SimpleNamespace(
                **{f"{p}_proj": getattr(getattr(block.layer[sublayer], name), p) for p in "qkvo"}
            ))
            for block in hf_model.decoder.block
        ]

    def get_decoder(self) -> SimpleNamespace:
        return SimpleNamespace(layers=self._layers)

    def parameters(self):
        return self.model.parameters()


# --- training ------------------------------------------------------------------------------


def prompt_tuning_model(
    bridge: TransformerBridge, n_virtual_tokens: int, *, seed: int = 0
) -> nn.Module:
    """A peft soft prompt of ``n_virtual_tokens`` in front of the encoder input (Lester et al.),
    initialised from randomly drawn vocabulary embeddings (seeded)."""
    import peft

    require_encoder_decoder(bridge, "seq2seq.prompt_tuning_model")
    config = peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n_virtual_tokens,
        prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(bridge.original_model, config)


def training_example(
    tokenizer: PreTrainedTokenizerBase, conversation: chat.Conversation, target: str
) -> Example:
    """The encoder ids of ``conversation`` and the decoder labels: ``target`` then EOS."""
    labels = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return encoder_ids(tokenizer, conversation), torch.tensor(labels, dtype=torch.long)


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``params`` of an encoder-decoder ``model`` on teacher-forced labels; the loss per
    step. AdamW, linear warmup then cosine decay (:func:`spt_utils.tuning.cosine_with_warmup`),
    gradient clipping and the seeded batches of :func:`spt_utils.tuning.batch_indices`."""
    if not examples:
        raise ValueError("training data: no examples")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    trainable = list(params.values())
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = tuning.cosine_with_warmup(optimizer, math.ceil(WARMUP_RATIO * steps), steps)
    device = trainable[0].device
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="train", disable=not progress):
        batch = [examples[i] for i in tuning.batch_indices(len(examples), batch_size, step, seed)]
        source, source_mask, _ = _padded([e[0] for e in batch], pad_id)
        labels, _ = chat.pad_right([e[1] for e in batch], -100)  # -100: no loss on padding
        loss = model(input_ids=source.to(device), attention_mask=source_mask.to(device),
                     labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
