"""The README's examples run as written; its first commands, links and config paths are the ones that exist."""

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


def test_readme_alignment_example_runs():
    """The alignment example runs on the library example's model, batch and method."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "seqtp.alignment(" in b)
    namespace: dict = {}
    exec(compile(blocks[0] + example, str(README), "exec"), namespace)  # noqa: S102 - our own README
    align = namespace["align"]
    assert -1 <= align["cosine"] <= 1 and align["norm_ratio"] > 0
    assert align["step_shift_norm"].shape == (namespace["x"].shape[1],)


DOCS = [README, *(README.parent / "docs" / name for name in ("performance.md", "development.md", "results/README.md"))]


def test_readme_opens_with_install_then_tests():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block, "README has no bash block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    commands = [c for c in commands if c]
    assert commands[:2] == ["pip install -e . && seqtp compare configs/temporal_order.yaml", "python -m pytest -q"]
    cpu_advice = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert cpu_advice in text[: first_block.end()], "the CPU-torch advice must come before (or in) the first block"


def test_docs_links_and_configs_exist():
    root = README.parent
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            path = target.split("#")[0]
            assert not path or (doc.parent / path).exists(), f"{doc.name}: broken link {target}"
        for config in set(re.findall(r"configs/[\w/]+\.yaml", text)):
            assert (root / config).is_file(), f"{doc.name}: no {config}"
