"""Tests of the sequence tasks: shapes, determinism, known answers, baselines, MNIST loading and option checks."""

from __future__ import annotations

import ast
import gzip
import hashlib
import math
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import seqtp.tasks.mnist as mnist_module
from seqtp.tasks import TASKS, Task, make_task
from seqtp.tasks.mnist import MEAN, STD, SUBSET_NOTE, PermutedMNIST, PixelMNIST, load_mnist, read_idx

SYNTHETIC = [
    ("copying", {"seq_len": 7}),
    ("adding", {"seq_len": 12}),
    ("adding", {"seq_len": 30, "variant": "paper"}),
    ("temporal_order", {"seq_len": 10}),
    ("temporal_order", {"seq_len": 23, "bits": 3}),
]
IDS = [f"{name}-{'-'.join(map(str, options.values()))}" for name, options in SYNTHETIC]


def build(name: str, options: dict, seed: int = 0, val_size: int = 64) -> Task:
    return make_task(name, device="cpu", seed=seed, val_size=val_size, **options)


def draw(task: Task, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return task.sample(batch_size, generator=torch.Generator().manual_seed(seed))


def tokens_of(x: torch.Tensor) -> torch.Tensor:
    """The categories of a one-hot input, after checking it is one-hot."""
    assert torch.equal(x.sum(dim=-1), torch.ones(x.shape[:-1]))
    return x.argmax(dim=-1)  # [B, T]


@pytest.mark.parametrize(("name", "options"), SYNTHETIC, ids=IDS)
def test_shapes_and_dtypes(name: str, options: dict) -> None:
    task = build(name, options)
    for x, y in (draw(task, 5, 0), task.validation_set()):
        batch = len(x)
        assert x.dtype == torch.float32 and x.shape == (batch, task.seq_len, task.input_size)
        if task.kind == "regression":
            assert y.dtype == torch.float32 and y.shape == (batch, task.output_size)
        elif task.readout == "all":
            assert y.dtype == torch.long and y.shape == (batch, task.seq_len)
        else:
            assert y.dtype == torch.long and y.shape == (batch,)
    assert len(task.validation_set()[0]) == 64
    outputs = torch.randn(*y.shape[:2] if task.readout == "all" else y.shape[:1], task.output_size)
    assert task.loss(outputs, y).shape == ()
    assert set(task.metrics(outputs, y)) == (set() if task.kind == "regression" else {"accuracy"})


@pytest.mark.parametrize(("name", "options"), SYNTHETIC, ids=IDS)
def test_sampling_is_deterministic(name: str, options: dict) -> None:
    task = build(name, options)
    first, again, other = draw(task, 16, 1), draw(task, 16, 1), draw(task, 16, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(("name", "options"), SYNTHETIC, ids=IDS)
def test_validation_set_is_fixed_by_seed(name: str, options: dict) -> None:
    x, y = build(name, options, seed=3).validation_set()
    x_again, y_again = build(name, options, seed=3).validation_set()
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(x, build(name, options, seed=4).validation_set()[0])
    assert not torch.equal(x, draw(build(name, options, seed=3), 64, 3)[0])  # not the training stream of that seed


def test_copying_answer() -> None:
    delay = 7
    task = build("copying", {"seq_len": delay})
    assert task.seq_len == delay + 20 and (task.input_size, task.output_size) == (10, 9)
    x, y = draw(task, 256, 0)
    tokens = tokens_of(x)  # [B, T + 20]
    symbols = tokens[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert torch.equal(tokens[:, delay + 9], torch.full((256,), 9))
    assert not tokens[:, 10 : delay + 9].any() and not tokens[:, delay + 10 :].any()
    assert torch.equal(y[:, -10:], symbols) and not y[:, :-10].any()


def test_copying_baseline_and_accuracy() -> None:
    delay = 7
    task = build("copying", {"seq_len": delay})
    assert task.baseline == pytest.approx(10 * math.log(8) / (delay + 20))
    x, y = draw(task, 512, 0)
    memoryless = torch.zeros(512, delay + 20, 9)  # [B, T + 20, 9]: blank, then a uniform guess over the symbols
    memoryless[:, : delay + 10, 1:] = -1e4
    memoryless[:, delay + 10 :, 0] = -1e4
    assert task.loss(memoryless, y).item() == pytest.approx(task.baseline, rel=1e-6)
    assert task.metrics(F.one_hot(y, 9).float(), y) == {"accuracy": 1.0}
    assert task.metrics(-memoryless, y) == {"accuracy": 0.0}  # always blank: right on every step but the recall ones


@pytest.mark.parametrize(("variant", "seq_len"), [("le2015", 12), ("le2015", 3), ("paper", 30)])
def test_adding_answer(variant: str, seq_len: int) -> None:
    task = build("adding", {"seq_len": seq_len, "variant": variant})
    x, y = draw(task, 512, 0)
    values, markers = x[..., 0], x[..., 1]  # [B, T] each
    assert values.min() >= 0 and values.max() < 1
    assert set(markers.unique().tolist()) == {0.0, 1.0} and torch.equal(markers.sum(dim=1), torch.full((512,), 2.0))
    first, second = markers.nonzero()[:, 1].reshape(512, 2).T  # [B] each, in order
    if variant == "le2015":
        assert first.max() < seq_len // 2 <= second.min()
        expected = (values * markers).sum(dim=1)
    else:
        assert first.max() < seq_len // 10 <= second.min() and second.max() < seq_len // 2
        expected = (values * markers).sum(dim=1) / 2
    torch.testing.assert_close(y.squeeze(1), expected)


@pytest.mark.parametrize(("variant", "variance"), [("le2015", 2 / 12), ("paper", 1 / 24)])
def test_adding_baseline(variant: str, variance: float) -> None:
    task = build("adding", {"seq_len": 20, "variant": variant})
    assert task.baseline == pytest.approx(variance)
    _, y = draw(task, 200_000, 0)
    mean = 1.0 if variant == "le2015" else 0.5
    assert task.loss(torch.full_like(y, mean), y).item() == pytest.approx(task.baseline, rel=0.02)


@pytest.mark.parametrize("bits", [1, 3])
@pytest.mark.parametrize("seq_len", [10, 57])
def test_temporal_order_answer(bits: int, seq_len: int) -> None:
    task = build("temporal_order", {"seq_len": seq_len, "bits": bits})
    n = 2 if bits == 1 else 3
    assert (task.input_size, task.output_size) == (8, 2**n)
    x, y = draw(task, 512, 0)
    tokens = tokens_of(x)  # [B, T]
    assert (tokens[:, 0] == 6).all() and (tokens[:, -1] == 7).all() and (tokens[:, 1:-1] != 6).all()
    relevant = (tokens == 4) | (tokens == 5)  # X or Y
    assert (relevant.sum(dim=1) == n).all()
    positions = relevant.nonzero()[:, 1].reshape(512, n)  # [B, n], in order
    windows = [(1, 2), (5, 6)] if bits == 1 else [(1, 2), (3, 4), (6, 7)]
    for i, (lo, hi) in enumerate(windows):
        assert (positions[:, i] >= seq_len * lo // 10).all() and (positions[:, i] <= seq_len * hi // 10).all()
    order = tokens.gather(1, positions) - 4  # [B, n]: 0 = X, 1 = Y
    expected = sum(order[:, i] * 2 ** (n - 1 - i) for i in range(n))
    assert torch.equal(y, expected)
    assert set(y.tolist()) == set(range(2**n))


def test_temporal_order_baseline() -> None:
    task = build("temporal_order", {"seq_len": 20, "bits": 3})
    _, y = draw(task, 64, 0)
    assert task.baseline == pytest.approx(math.log(8))
    assert task.loss(torch.zeros(64, 8), y).item() == pytest.approx(task.baseline)


def test_registry() -> None:
    assert list(TASKS) == ["copying", "adding", "pixel_mnist", "permuted_mnist", "temporal_order"]
    assert all(issubclass(cls, Task) and cls.name == name for name, cls in TASKS.items())
    with pytest.raises(ValueError, match="unknown task 'x'; choose from copying, adding"):
        make_task("x", seq_len=10, device="cpu", seed=0)
    with pytest.raises(ValueError, match="task 'adding'.*colour"):
        make_task("adding", seq_len=10, device="cpu", seed=0, colour="red")


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("copying", {"seq_len": -3}, "task.seq_len must be an integer >= 1, got -3"),
        ("copying", {"seq_len": 5, "val_size": 0}, "task.val_size"),
        ("copying", {"seq_len": 5, "seed": -1}, "task.seed"),
        ("copying", {"seq_len": 5, "device": "nonsense"}, "task.device"),
        ("adding", {"seq_len": 1}, "task.seq_len"),
        ("adding", {"seq_len": 9, "variant": "paper"}, "task.seq_len"),
        ("adding", {"seq_len": 20, "variant": "sum"}, "task.variant"),
        ("temporal_order", {"seq_len": 9}, "task.seq_len"),
        ("temporal_order", {"seq_len": 20, "bits": 2}, "task.bits"),
        ("pixel_mnist", {"seq_len": 100}, "task.seq_len must be 784"),
        ("permuted_mnist", {"seq_len": 784, "permutation_seed": -1}, "task.permutation_seed"),
    ],
)
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_task(name, **{"device": "cpu", "seed": 0, **options})


# MNIST


def write_idx(path, array: torch.Tensor, magic: int) -> str:
    """Write ``array`` (uint8) as a gzipped IDX file; its md5."""
    header = struct.pack(f">I{array.dim()}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.numpy().tobytes()))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_offline_subset_split(mnist_dir) -> None:
    data = load_mnist(mnist_dir)
    assert data.note == SUBSET_NOTE
    assert data.train_images.shape == (8000, 28, 28) and data.val_images.shape == (2000, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.long
    all_labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").long()
    assert torch.equal(torch.bincount(data.train_labels) + torch.bincount(data.val_labels), torch.bincount(all_labels))
    assert torch.equal(load_mnist(mnist_dir).val_images, data.val_images)


def test_pixel_mnist(mnist_dir) -> None:
    task = PixelMNIST(seq_len=784, device="cpu", seed=0, val_size=0, data_dir=str(mnist_dir))
    assert task.note == SUBSET_NOTE and task.n_train == 8000
    x, y = task.validation_set()
    assert x.shape == (2000, 784, 1) and x.dtype == torch.float32 and y.shape == (2000,)
    assert y.min() == 0 and y.max() == 9
    pixels = (x * STD + MEAN) * 255  # back to the raw 0..255 values
    torch.testing.assert_close(pixels, pixels.round(), atol=1e-3, rtol=0)
    assert pixels.min().round() == 0 and pixels.max().round() == 255
    assert task.baseline == pytest.approx(math.log(10), abs=0.01)
    first, again = draw(task, 32, 0), draw(task, 32, 0)
    assert first[0].shape == (32, 784, 1) and first[1].dtype == torch.long and torch.equal(first[0], again[0])
    capped = PixelMNIST(seq_len=784, device="cpu", seed=0, val_size=500, data_dir=str(mnist_dir)).validation_set()
    assert torch.equal(capped[0], x[:500]) and torch.equal(capped[1], y[:500])


def test_permuted_mnist(mnist_dir) -> None:
    pixel = PixelMNIST(seq_len=784, device="cpu", seed=0, data_dir=str(mnist_dir))
    permuted = make_task("permuted_mnist", seq_len=784, device="cpu", seed=0, data_dir=str(mnist_dir))
    assert torch.equal(permuted.permutation.sort().values, torch.arange(784))
    x, y = pixel.validation_set()
    x_permuted, y_permuted = permuted.validation_set()
    assert torch.equal(x_permuted, x[:, permuted.permutation]) and torch.equal(y_permuted, y)
    assert torch.equal(draw(permuted, 8, 5)[0], draw(pixel, 8, 5)[0][:, permuted.permutation])
    other = PermutedMNIST(seq_len=784, device="cpu", seed=0, data_dir=str(mnist_dir), permutation_seed=1)
    assert not torch.equal(other.permutation, permuted.permutation)


def test_full_split_and_magic_number(mnist_dir, tmp_path, monkeypatch) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, tmp_path)
    images = torch.randint(256, (50, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = (torch.arange(50) % 10).to(torch.uint8)
    md5 = {
        "train-images-idx3-ubyte.gz": write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 2051),
        "train-labels-idx1-ubyte.gz": write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 2049),
    }
    monkeypatch.setattr(mnist_module, "MD5", {**mnist_module.MD5, **md5})
    data = load_mnist(tmp_path)
    assert data.note == "" and torch.equal(data.train_images, images) and data.val_images.shape == (10000, 28, 28)
    md5["train-labels-idx1-ubyte.gz"] = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 2051)
    monkeypatch.setattr(mnist_module, "MD5", {**mnist_module.MD5, **md5})
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz has IDX magic number 2051, expected 2049"):
        load_mnist(tmp_path)


def test_corrupt_file_is_named(mnist_dir, tmp_path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, tmp_path)
    corrupt = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(corrupt.read_bytes())
    raw[1000] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is corrupt"):
        PixelMNIST(seq_len=784, device="cpu", seed=0, data_dir=str(tmp_path))


def test_missing_file_is_named(mnist_dir, tmp_path, monkeypatch) -> None:
    shutil.copy(mnist_dir / "t10k-images-idx3-ubyte.gz", tmp_path)
    monkeypatch.setenv("SEQTP_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz is missing"):
        make_task("pixel_mnist", seq_len=784, device="cpu", seed=0)
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").touch()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz is missing"):
        load_mnist()


def test_offline_fallback(mnist_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SEQTP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # not found from the working directory: found from the repository root
    with pytest.warns(UserWarning, match="offline copy"):
        assert load_mnist().note == SUBSET_NOTE
    monkeypatch.setattr(mnist_module, "OFFLINE_COPY", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="set task.data_dir"):
        load_mnist()


def test_hub_images_are_converted(monkeypatch) -> None:
    image_module = pytest.importorskip("PIL.Image")
    images = torch.randint(256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = {"image": [image_module.frombytes("L", (28, 28), bytes(img.flatten().tolist())) for img in images],
             "label": [3, 1, 4, 1, 5, 9]}  # fmt: skip
    fake = types.SimpleNamespace(load_dataset=lambda name: {"train": split, "test": split})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(mnist_module, "_hub_reachable", lambda: True)
    monkeypatch.delenv("SEQTP_DATA_DIR", raising=False)
    data = load_mnist()
    assert torch.equal(data.train_images, images) and torch.equal(data.val_labels, torch.tensor([3, 1, 4, 1, 5, 9]))
    assert data.note == ""


def test_missing_folder_names_its_origin(tmp_path, monkeypatch) -> None:
    """A missing folder from ``task.data_dir`` says to set that key; one from ``$SEQTP_DATA_DIR`` names the variable."""
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("SEQTP_DATA_DIR", str(nowhere))
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist \(set \$SEQTP_DATA_DIR\)$"):
        load_mnist()
    with pytest.raises(FileNotFoundError, match=r"elsewhere does not exist \(set task.data_dir\)$"):
        load_mnist(tmp_path / "elsewhere")  # data_dir wins over the variable


# chance accuracy


@pytest.mark.parametrize(("name", "options"), SYNTHETIC, ids=IDS)
def test_chance_accuracy_is_the_best_constant_guess(name: str, options: dict) -> None:
    """Against the accuracy ``metrics`` gives every constant prediction on a large sample (None for regression)."""
    task = build(name, options)
    if task.kind == "regression":
        assert task.chance_accuracy is None
        return
    _, y = draw(task, 20_000, 0)
    shape = (*y.shape, task.output_size)  # [B, C] or [B, T, C]
    accuracies = [task.metrics(F.one_hot(torch.full(y.shape, c), task.output_size).float().expand(shape), y)
                  ["accuracy"] for c in range(task.output_size)]
    assert task.chance_accuracy == pytest.approx(max(accuracies), rel=0.05)
    assert 0 < task.chance_accuracy < 1


def test_mnist_chance_accuracy(mnist_dir) -> None:
    task = PixelMNIST(seq_len=784, device="cpu", seed=0, data_dir=str(mnist_dir))
    labels = task._train_labels
    assert task.chance_accuracy == pytest.approx(torch.bincount(labels).max().item() / len(labels))
    assert task.chance_accuracy == pytest.approx(0.1, abs=0.02)


# the package seqtp.tasks


TASKS_FOLDER = Path(__file__).resolve().parents[1] / "tasks"


@pytest.mark.parametrize("path", sorted(TASKS_FOLDER.glob("*.py")), ids=lambda p: p.name)
def test_tasks_import_nothing_of_the_library(path: Path) -> None:
    """The task modules import torch, the standard library and each other (relatively), not the rest of seqtp."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("seqtp", "tasks") for a in node.names), ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1), ast.unparse(node)
            if node.level == 0:
                top = node.module.split(".")[0]
                assert top not in ("tasks", "seqtp") or node.module.startswith("seqtp.tasks"), ast.unparse(node)


def test_installed_as_seqtp_tasks(tmp_path: Path) -> None:
    """Outside the checkout, the installed seqtp holds the tasks as ``seqtp.tasks`` and installs no top-level
    ``tasks``."""
    code = ("import importlib.util, seqtp.tasks, seqtp.tasks.mnist; "
            "print(importlib.util.find_spec('tasks')); print(sorted(seqtp.tasks.TASKS))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["None", str(sorted(TASKS))]


def test_source_checkout_without_install(tmp_path: Path) -> None:
    """``PYTHONPATH=<repo>`` with no installed seqtp (the editable finder removed): ``seqtp.tasks`` is still the
    folder ``tasks/``, and the training loop imports."""
    repo = TASKS_FOLDER.parent
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); "
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
            "import seqtp.train, seqtp.tasks.mnist as m; "
            "print(m.__file__); print(seqtp.train.TASKS is seqtp.tasks.TASKS)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(TASKS_FOLDER / "mnist.py"), "True"]
