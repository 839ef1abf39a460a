import pytest

from spt_utils import data, patching


def test_calibration_convention():
    calibration = patching.Calibration(reference=2.0, counterfactual=-1.0)
    calibration.check()
    assert calibration.normalise(2.0) == 0 and calibration.normalise(-1.0) == 1
    assert calibration.normalise(0.5) == 0.5


def test_calibration_without_an_effect_is_an_error():
    with pytest.raises(ValueError, match="no effect"):
        patching.Calibration(reference=1.0, counterfactual=1.0)


def test_calibrate_on_the_tiny_model(tiny_model):
    pairs = data.build_patching_pairs(data.load_starter().select(range(3)), tiny_model.tokenizer)
    calibration = patching.calibrate(tiny_model, pairs)
    assert calibration.reference != calibration.counterfactual


def test_ratio_metric_warns_near_zero_denominator():
    import torch

    logits = torch.tensor([[1.0, -1.0 + 1e-5]])
    with pytest.warns(RuntimeWarning, match="denominator"):
        patching.apology_ratio(logits, [0], [1])


def test_heads_round_trip_and_range_check(tmp_path):
    path = tmp_path / "heads.json"
    patching.save_heads(path, [(1, 2), (0, 3)], metric="logit_diff")
    assert patching.load_heads(path) == [(1, 2), (0, 3)]
    assert patching.validate_heads([(1, 3)], n_layers=2, n_heads=4) == [(1, 3)]
    with pytest.raises(ValueError, match=r"heads\[0\] = L2H0 is out of range"):
        patching.validate_heads([(2, 0)], n_layers=2, n_heads=4)
    path.write_text('{"heads": [[1]]}')
    with pytest.raises(ValueError, match="field 'heads'"):
        patching.load_heads(path)
