"""The README's library example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tp_backward_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "tp_backward" in b)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert isinstance(namespace["loss"], float)
    assert all(p.grad is not None for p in namespace["net"].parameters())


def test_readme_library_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert torch.isfinite(namespace["loss"])
    targets, states = namespace["targets"], namespace["states"]
    assert targets.shape == states.shape and targets.dtype == torch.float64
    assert all(p.grad is not None for p in namespace["model"].parameters())
