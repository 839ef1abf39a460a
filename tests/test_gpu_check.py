"""scripts/gpu_check.py: its agreement measure, and its logic on the tiny model on a CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_agreement_measures_correlation_and_top_k_overlap():
    reference = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.7, -0.2]])
    # swap the 2nd and 3rd largest positive scores: same top-1, top-3 as a set
    other = torch.tensor([[0.9, 0.1, 0.7], [0.3, 0.5, -0.2]])
    result = gpu_check.agreement(reference, other, 3)
    centred = [x.flatten() - x.mean() for x in (reference, other)]
    expected_r = (centred[0] @ centred[1]) / (centred[0].norm() * centred[1].norm())
    assert abs(result["pearson_r"] - expected_r.item()) < 1e-6
    assert result["top_k_overlap"] == 3
    assert gpu_check.agreement(reference, -reference, 2)["top_k_overlap"] == 0


def test_the_check_runs_on_a_cpu_and_fails_below_tolerance(tmp_path, capsys):
    out = tmp_path / "summary.json"
    status = gpu_check.main([
        "--device", "cpu", "--dtype", "float32", "--model", "tiny-random-llama",
        "--pairs", "3", "--top-k", "2", "--n-train", "4", "--steps", "1", "--batch-size", "2",
        "--micro-batch-size", "2", "--overlap-k", "2", "--min-r", "1.5", "--out", str(out)])
    assert status == 1  # float32 on both sides agrees perfectly, but r >= 1.5 cannot hold
    printed = capsys.readouterr().out
    assert "[gpu_check] FAILED" in printed and '"spt_step_s"' in printed
    summary = json.loads(out.read_text())
    assert abs(summary["pearson_r"] - 1) < 1e-6 and summary["top_k_overlap"] == 2
    assert summary["passed"] is False
