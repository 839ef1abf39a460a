"""Pinpoint tuning (SPT) of chosen attention heads, the baselines, checkpoints and export.

**Head-sparse parameters.** For each selected head ``(layer, h)`` the *values* of its query
rows ``q_proj.weight[h·d:(h+1)·d, :]`` and output-projection columns
``o_proj.weight[:, h·d:(h+1)·d]`` (optionally the key/value rows of its KV group
``g = h // (n_heads // n_kv_heads)``, shared by the heads of a group) become the only
``nn.Parameter`` objects the optimizer sees; every base parameter has ``requires_grad=False``.
A forward hook on each touched ``nn.Linear`` swaps the slices into a copy of the frozen weight
(``weight.index_copy(dim, index, slices)``), so AdamW's state and its weight decay (0.1 in the
paper's code, applied to the weights themselves) act on the trained slices exactly as in the
paper and nowhere else. Every other tensor stays bit-identical; the paper's gradient mask on
full matrices fails that, because decoupled weight decay still moves the masked entries.
Backward stops at the first trained layer (nothing below it needs a gradient) and computes no
weight gradient for frozen matrices (MLPs, embeddings, the unembedding).

**Frozen-layer cache** (:class:`LayerCache`): every layer below the lowest tuned head is frozen,
so its output for a training example never changes. :func:`train` computes the input of that
layer once per example (alone, unpadded) and reuses it, so an SPT step runs only the layers it
trains and those above; the sweep (:func:`sweep`) shares one cache across settings.

**One training loop for every method** (:func:`train`): AdamW, cosine decay with linear warmup
(to 0), gradient accumulation over micro-batches, clipping, loss only on the final assistant
turn, bf16 autocast on CUDA, seeded data order, a ``tqdm.auto`` bar, an eval callback,
atomic checkpoints (safetensors of the trainable tensors + optimizer, scheduler, RNG state and
step) and exact resume. Data parallel: launched with ``torchrun``, each rank takes its share of
every global batch and the few trainable gradients are all-reduced (works on gloo and nccl).

**Methods**: ``spt`` (above), ``sft`` (every parameter), ``lora_attn`` (peft LoRA on q/k/v/o of
every layer), ``lora_heads`` (peft LoRA on q_proj/o_proj of the selected heads' layers, the
adapter masked to those heads' slices: q's LoRA output rows and o's LoRA input columns outside
the heads are zeroed in the forward pass and before merging, so the merged update touches only
the heads' slices), ``prompt_tuning`` (peft soft prompt) and few-shot prompting
(:func:`few_shot_conversation`, no training).

**Export**: :func:`export_hf` writes a plain Hugging Face folder (LoRA merged, tokenizer,
``spt_tuning.json``); :func:`save_head_deltas` a small safetensors file of the head slices'
deltas against the base weights (float64, so base + delta reproduces the tuned weights bit for
bit), applied with :func:`apply_head_deltas`. :func:`load_tuned` loads any method's folder.

The submodules, lowest first:

* :mod:`~spt_utils.tuning.heads`: model plumbing and the head-sparse parameters;
* :mod:`~spt_utils.tuning.methods`: each method's preparation of a model (:func:`prepare`);
* :mod:`~spt_utils.tuning.distributed`: ranks, FSDP2 sharding, the gradients' all-reduce;
* :mod:`~spt_utils.tuning.examples`: training conversations, examples and few-shot prompts;
* :mod:`~spt_utils.tuning.cache`: the frozen-layer cache;
* :mod:`~spt_utils.tuning.checkpoints`: checkpoints and their exact restore;
* :mod:`~spt_utils.tuning.loop`: the training loop;
* :mod:`~spt_utils.tuning.sweeps`: the sweep;
* :mod:`~spt_utils.tuning.export`: export, head deltas and :func:`load_tuned`;
* :mod:`~spt_utils.tuning.cli`: the ``torchrun`` command line (``-m spt_utils.tuning``).
"""

from spt_utils.tuning.cache import LayerCache, first_trained_layer
from spt_utils.tuning.checkpoints import (
    CHECKPOINT_STATE,
    CHECKPOINT_WEIGHTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from spt_utils.tuning.cli import main
from spt_utils.tuning.distributed import full_state_dict, shard_fully
from spt_utils.tuning.examples import (
    Example,
    few_shot_conversation,
    load_training_conversations,
    prepare_examples,
)
from spt_utils.tuning.export import (
    DELTAS_FORMAT,
    TUNING_FILE,
    apply_head_deltas,
    export_hf,
    finalize,
    head_deltas,
    load_tuned,
    save_head_deltas,
    save_index,
)
from spt_utils.tuning.heads import (
    HEAD_PROJECTIONS,
    CheckpointError,
    HeadSparseParameters,
    check_head_layout,
    check_tokenizer,
    execution_device,
)
from spt_utils.tuning.loop import (
    Objective,
    TrainConfig,
    TrainResult,
    batch_indices,
    cosine_with_warmup,
    evaluate_loss,
    final_turn_loss_sum,
    masked_loss_sum,
    train,
)
from spt_utils.tuning.loop import _optimizer as _optimizer  # used by the tests
from spt_utils.tuning.methods import (
    LORA_ATTN_TARGETS,
    METHODS,
    PROMPT_INIT_TEXT,
    TuningSetup,
    lora_setup,
    prepare,
)
from spt_utils.tuning.sweeps import SWEEP_METHODS, SweepSetting, sweep

__all__ = [
    "CHECKPOINT_STATE",
    "CHECKPOINT_WEIGHTS",
    "DELTAS_FORMAT",
    "HEAD_PROJECTIONS",
    "LORA_ATTN_TARGETS",
    "METHODS",
    "PROMPT_INIT_TEXT",
    "SWEEP_METHODS",
    "TUNING_FILE",
    "CheckpointError",
    "Example",
    "HeadSparseParameters",
    "LayerCache",
    "Objective",
    "SweepSetting",
    "TrainConfig",
    "TrainResult",
    "TuningSetup",
    "apply_head_deltas",
    "batch_indices",
    "check_head_layout",
    "check_tokenizer",
    "cosine_with_warmup",
    "evaluate_loss",
    "execution_device",
    "export_hf",
    "few_shot_conversation",
    "final_turn_loss_sum",
    "finalize",
    "first_trained_layer",
    "full_state_dict",
    "head_deltas",
    "latest_checkpoint",
    "load_checkpoint",
    "load_training_conversations",
    "load_tuned",
    "lora_setup",
    "main",
    "masked_loss_sum",
    "prepare",
    "prepare_examples",
    "save_checkpoint",
    "save_head_deltas",
    "save_index",
    "shard_fully",
    "sweep",
    "train",
]
