import pytest

from spt_utils import io


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "sub" / "out.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_write(path) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary left


def test_atomic_folder_replaces_only_on_success(tmp_path):
    folder = tmp_path / "model"
    with io.atomic_folder(folder) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_folder(folder) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("boom")
    assert (folder / "weights").read_text() == "v1"
    with io.atomic_folder(folder) as staging:
        (staging / "weights").write_text("v2")
    assert (folder / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left
