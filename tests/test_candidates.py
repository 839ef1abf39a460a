from spt_utils import candidates, models


def test_load_candidates_loads_plain_folders_and_skips_missing_ones(tiny_model, tmp_path,
                                                                    capsys):
    tokenizer = models.make_tiny_tokenizer()
    folder = tmp_path / "tuned" / "sft"
    models.make_tiny_hf_model(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = candidates.load_candidates(tmp_path, tiny_model, ["base", "sft", "spt"])
    assert [c.name for c in loaded] == ["base", "sft"]
    assert loaded[0].bridge is tiny_model and loaded[1].bridge is not tiny_model
    assert "spt: skipped" in capsys.readouterr().out


