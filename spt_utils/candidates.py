"""The candidates an evaluation compares: the base model, tuned folders (SPT, SFT, LoRA,
prompt tuning) and few-shot prompting, each as an :class:`spt_utils.evaluation.Candidate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from transformer_lens.model_bridge import TransformerBridge

from spt_utils import models, tuning
from spt_utils.evaluation import Candidate

METHODS = ("base", "spt", "sft", "lora_attn", "lora_heads", "prompt_tuning", "few_shot")


def load_candidates(
    run_dir: Path,
    base: TransformerBridge,
    methods: Sequence[str] = METHODS,
    *,
    n_shots: int = 2,
) -> list[Candidate]:
    """The candidates to compare; a method whose artifact is missing is skipped with a note.

    ``base`` is the loaded base model. Tuned methods load ``run_dir/tuned/<method>/`` with
    ``tuning.load_tuned`` (a folder written by notebook 04) or as a plain Hugging Face
    folder; ``few_shot`` puts ``n_shots`` demonstrations from ``run_dir/data/train.jsonl``
    in front of every conversation (``tuning.few_shot_conversation``).
    """
    run_dir = Path(run_dir)
    train = run_dir / "data" / "train.jsonl"
    candidates = []
    for method in methods:
        folder = run_dir / "tuned" / method
        if method == "base":
            candidates.append(Candidate("base", base))
        elif method == "few_shot":
            if not train.exists():
                print(f"[05] few_shot: skipped (needs {train})")
                continue
            demonstrations = tuning.load_training_conversations(train)
            transform = partial(
                tuning.few_shot_conversation, demonstrations=demonstrations, k=n_shots
            )
            candidates.append(Candidate("few_shot", base, transform=transform))
        elif not folder.is_dir():
            print(f"[05] {method}: skipped ({folder} does not exist)")
        elif (folder / tuning.TUNING_FILE).exists():
            bridge, hf_model = tuning.load_tuned(folder, device=base.cfg.device)
            hf_model = None if hf_model is bridge.original_model else hf_model
            candidates.append(Candidate(method, bridge, hf_model=hf_model))
        elif (folder / "adapter_config.json").exists():
            print(f"[05] {method}: skipped (a peft adapter without {tuning.TUNING_FILE})")
        else:
            candidates.append(Candidate(method, models.load_model(str(folder))))
    return candidates
