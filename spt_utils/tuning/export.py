"""Export of a tuned model (a Hugging Face folder or the head deltas) and its loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from spt_utils import models
from spt_utils.io import (
    atomic_folder,
    atomic_write,
    check_provenance,
    tokenizer_fingerprint,
    write_json,
)
from spt_utils.models import d_head_of
from spt_utils.patching import validate_heads
from spt_utils.tuning.heads import CheckpointError, check_tokenizer
from spt_utils.tuning.methods import TuningSetup

TUNING_FILE = "spt_tuning.json"
DELTAS_FORMAT = "spt-head-deltas/1"


def finalize(setup: TuningSetup) -> PreTrainedModel:
    """The tuned plain HF model: SPT slices written into the weights, LoRA merged."""
    for finalizer in setup.finalizers:
        finalizer()
    if setup.head_params is not None:
        setup.head_params.materialize()
        return setup.model
    if setup.method in ("lora_attn", "lora_heads"):
        return setup.model.merge_and_unload()
    return setup.model


def export_hf(
    setup: TuningSetup, tokenizer: PreTrainedTokenizerBase, folder: str | Path, *,
    base_model: str, seed: int = 0, extra: dict | None = None,
    state: dict[str, Tensor] | None = None,
    provenance: dict | None = None,
) -> Path:
    """Save the tuned model to ``folder`` (written atomically) with ``spt_tuning.json``.

    Weight methods give a plain HF folder (``save_pretrained``, LoRA merged) loadable by
    ``models.load_model(str(folder))`` and ``AutoModelForCausalLM``; prompt tuning gives a
    peft adapter folder over ``base_model``. A sharded (FSDP) setup needs ``state``, its
    :func:`full_state_dict` gathered on every rank. ``provenance``
    (:func:`spt_utils.io.provenance` of the base model) is recorded in ``spt_tuning.json`` and
    checked by :func:`load_tuned`.
    """
    if setup.sharded and state is None:
        raise ValueError("export_hf: a sharded setup needs state=full_state_dict(setup), "
                         "gathered on every rank")
    folder = Path(folder)
    record = {"method": setup.method, "base_model": base_model, "base_seed": seed,
              "heads": [list(h) for h in setup.heads],
              "tokenizer": tokenizer_fingerprint(tokenizer), "provenance": provenance,
              **(extra or {})}
    with atomic_folder(folder) as staging:
        if setup.method == "prompt_tuning":
            setup.model.save_pretrained(str(staging))
        else:
            tuned = setup.model if setup.sharded else finalize(setup)
            # A merged LoRA model can keep unloaded adapter modules under the bridge's
            # alias paths; their tensors are not part of the plain model.
            state = state or {n: t for n, t in models.clean_state_dict(tuned).items()
                              if ".lora_" not in n}
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(tuned.config)
            missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
            tied = set(getattr(plain, "_tied_weights_keys", None) or {"lm_head.weight"})
            if unexpected or set(missing) - tied:
                raise CheckpointError(f"export: unexpected {unexpected}, missing {missing}")
            plain.tie_weights()
            plain.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_json(staging / TUNING_FILE, record)
    return folder


def load_tuned(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    base: TransformerBridge | None = None,
    expect: dict | None = None,
):
    """Load any method's output folder for evaluation: ``(bridge, hf_model_for_generation)``.

    For ``spt``, ``sft``, ``lora_attn`` and ``lora_heads`` the bridge is the tuned model and
    the second item is its ``bridge.original_model``. For ``prompt_tuning`` the bridge is the
    *base* model and the second item the peft model wrapping ``bridge.original_model`` with the
    soft prompt: pass it as ``chat.generate(bridge, convs, hf_model=...)``; running the bridge
    itself gives the untuned model. With ``base`` (the loaded base model) nothing is loaded
    twice: a tuned model reuses the base's unchanged tensors (``models.load_model(...,
    share_with=base)``, its placement and dtype) and a soft prompt wraps ``base`` itself.
    Raises :class:`CheckpointError` when the folder is not a tuned folder or its tokenizer
    does not match the recorded one, and :class:`spt_utils.io.ProvenanceError` when
    ``expect`` is given and the recorded provenance (the base model's) does not match it.
    """
    folder = Path(folder)
    try:
        record = json.loads((folder / TUNING_FILE).read_text())
        method = record["method"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{folder / TUNING_FILE}: not a tuned-model folder ({error})") \
            from error
    check_provenance(record.get("provenance"), expect, str(folder / TUNING_FILE))
    if method == "prompt_tuning":
        import peft

        bridge = base or models.load_model(record["base_model"], device=device, dtype=dtype,
                                           seed=record.get("base_seed", 0))
        flags = [(p, p.requires_grad) for p in bridge.original_model.parameters()]
        hf_model = peft.PeftModel.from_pretrained(bridge.original_model, str(folder))
        hf_model.eval()
        for parameter, flag in flags:  # peft freezes the base: a shared base keeps its flags
            parameter.requires_grad_(flag)
    elif base is not None:
        bridge = models.load_model(str(folder), dtype=dtype, share_with=base)
        hf_model = bridge.original_model
    else:
        bridge = models.load_model(str(folder), device=device, dtype=dtype)
        hf_model = bridge.original_model
    check_tokenizer(bridge.original_model, bridge.tokenizer, str(folder))
    if tokenizer_fingerprint(bridge.tokenizer) != record["tokenizer"]:
        raise CheckpointError(
            f"{folder}: the tokenizer does not match the one recorded in {TUNING_FILE} "
            "(field 'tokenizer'): tokenizer and checkpoint do not belong together"
        )
    return bridge, hf_model


def head_deltas(setup: TuningSetup) -> dict[str, Tensor]:
    """Trained slice minus base slice for every SPT parameter, in float64 (exact)."""
    if setup.head_params is None:
        raise ValueError(f"head deltas exist only for method 'spt', not {setup.method!r}")
    sparse = setup.head_params
    return {n: p.detach().double().cpu() - sparse.initial[n].double().cpu()
            for n, p in sparse.params.items()}


def save_head_deltas(
    path: str | Path, setup: TuningSetup, *, base_model: str, provenance: dict | None = None
) -> Path:
    """A small safetensors file of the head deltas + metadata (model, heads, d_head…,
    ``provenance`` as JSON)."""
    sparse = setup.head_params
    deltas = head_deltas(setup)
    config = sparse.model.config
    metadata = {"format": DELTAS_FORMAT, "model": base_model,
                "heads": json.dumps([list(h) for h in sparse.heads]),
                "d_head": str(sparse.d_head), "n_heads": str(config.num_attention_heads),
                "n_kv_heads": str(config.num_key_value_heads),
                "include_kv": str(sparse.include_kv), "provenance": json.dumps(provenance)}
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        handle.write(save(deltas, metadata=metadata))
    return path


@torch.no_grad()
def apply_head_deltas(
    hf_model: PreTrainedModel, path: str | Path, *, expect: dict | None = None
) -> dict[str, str]:
    """Add the deltas of :func:`save_head_deltas` to a base model in place; return metadata.

    Checks the file's shape metadata against the model and, with ``expect``, its provenance
    (a clear error on mismatch)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            deltas = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: corrupt or missing head-delta file ({error})") from error
    if metadata.get("format") != DELTAS_FORMAT:
        raise CheckpointError(f"{path}: field 'format' is not {DELTAS_FORMAT!r}")
    try:
        recorded = json.loads(metadata.get("provenance", "null"))
    except ValueError as error:
        raise CheckpointError(f"{path}: field 'provenance' is not JSON ({error})") from error
    check_provenance(recorded, expect, str(path))
    if models.is_offloaded(hf_model):
        raise CheckpointError(f"{path}: the model keeps offloaded weights (CPU/disk "
                              "device_map) that cannot be written: load it on devices")
    config = hf_model.config
    d_head = d_head_of(config)
    expected = {"d_head": d_head, "n_heads": config.num_attention_heads,
                "n_kv_heads": config.num_key_value_heads}
    for key, value in expected.items():
        if int(metadata[key]) != value:
            raise CheckpointError(
                f"{path}: field {key!r} is {metadata[key]} but the model has {value}"
            )
    validate_heads(json.loads(metadata["heads"]), config.num_hidden_layers,
                   config.num_attention_heads)
    try:
        models.add_head_deltas(hf_model, deltas, str(path))
    except models.ModelLoadError as error:
        raise CheckpointError(str(error)) from error
    return metadata


def save_index(
    tuned_dir: str | Path, entries: dict[str, dict[str, Any]], *, provenance: dict | None = None
) -> None:
    """Write ``tuned_dir/index.json``: per method its folder, losses and settings."""
    write_json(Path(tuned_dir) / "index.json", {"methods": entries, "provenance": provenance})
