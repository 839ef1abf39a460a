import pytest

from spt_utils import pipeline


def test_profiles_name_existing_notebooks():
    prefixes = {path.name[:2] for path in pipeline.notebook_paths()}
    assert "00" in prefixes
    for profile, overrides in pipeline.PROFILES.items():
        assert set(overrides) <= {f"{i:02d}" for i in range(10)}, profile


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'gpu'"):
        pipeline.parameters_for(pipeline.notebook_paths()[0], "gpu", {})
