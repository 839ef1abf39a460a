"""Atomic file output (a failed write never replaces a good file with a half-written one) and
provenance: what every saved result records about the run that made it.

A provenance record (:func:`provenance`) holds the model id, the tokenizer's fingerprint, the
TransformerLens version, the profile, the seed and the git commit. Savers store it with their
result; loaders given ``expect=`` check it with :func:`check_provenance`, so a result made with
another model or tokenizer is refused. Without ``expect`` nothing is checked (the default, so
files written before provenance was kept still load); with it, a file without provenance is an
error too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
PROVENANCE_FIELDS = ("model", "tokenizer", "transformer_lens", "profile", "seed", "git_commit")
IDENTITY_FIELDS = ("model", "tokenizer")  # a result made with other values is refused


class ProvenanceError(ValueError):
    """A saved result lacks provenance, has a damaged record, or belongs to another model."""


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(descriptor, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A hidden staging folder beside ``folder`` that replaces it only when the block
    succeeds: a failed write never leaves a half-written folder in place of a good one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | Path, value: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary (token → id)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where models and first answers are cached across runs: ``$SPT_CACHE`` or
    ``~/.cache/spt_utils``."""
    return Path(os.environ.get("SPT_CACHE", Path.home() / ".cache" / "spt_utils"))


def git_commit() -> str | None:
    """The repository's checked-out commit (None outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(model_name: str, tokenizer: Any, *, profile: str | None, seed: int) -> dict:
    """The record a saved result keeps about the run that made it (see the module doc)."""
    return {
        "model": model_name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "transformer_lens": metadata.version("transformer-lens"),
        "profile": profile,
        "seed": seed,
        "git_commit": git_commit(),
    }


def check_provenance(recorded: Any, expected: Mapping | None, where: str) -> None:
    """Raise :class:`ProvenanceError` naming ``where`` and the field when ``recorded`` is
    missing or incomplete, or its model or tokenizer differ from ``expected``'s. Nothing is
    checked when ``expected`` is None."""
    if expected is None:
        return
    if recorded is None:
        raise ProvenanceError(
            f"{where}: no provenance recorded (written before results kept one): rerun the "
            "step that wrote it"
        )
    if not isinstance(recorded, Mapping):
        raise ProvenanceError(f"{where}: field 'provenance' must be a mapping, got {recorded!r}")
    missing = [name for name in PROVENANCE_FIELDS if name not in recorded]
    if missing:
        raise ProvenanceError(f"{where}: field 'provenance.{missing[0]}' is missing")
    for name in IDENTITY_FIELDS:
        if recorded[name] != expected[name]:
            raise ProvenanceError(
                f"{where}: field 'provenance.{name}' is {recorded[name]!r} but this run's is "
                f"{expected[name]!r}: the result was made with another {name}"
            )
