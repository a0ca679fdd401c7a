"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mnist_dir() -> Path:
    """The offline MNIST copy (the two t10k IDX files) beside the repository; skip the test where it is absent."""
    folder = REPO.parent / "shared" / "data" / "mnist"
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no offline MNIST copy at {folder}")
    return folder
