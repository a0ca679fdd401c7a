"""Pixel-by-pixel MNIST and permuted MNIST (Le, Jaitly & Hinton 2015, "A Simple Way to Initialize Recurrent Networks
of Rectified Linear Units", sec. 4.2), and the MNIST loader behind them.

Data sources, in order:

1. ``data_dir`` (or the environment variable ``SEQTP_DATA_DIR`` when ``data_dir`` is empty): a folder with the
   canonical IDX gz files. With all four, the 60k training split trains and the 10k test split validates; with only the
   two ``t10k`` files, the 10k test split is cut into a fixed 8k/2k train/validation split (``SUBSET_NOTE``).
2. The Hugging Face hub's ``ylecun/mnist`` through ``datasets``, when the hub is reachable and not disabled by
   ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``: 60k train, 10k test as validation.
3. The offline copy ``../shared/data/mnist``, relative to the working directory, then to the repository root (the
   folder that holds the folder ``tasks/``, in a checkout), with a ``UserWarning`` (the command line prints it as
   one line; every output of the run carries the subset's ``note`` too).

Every file is checked against its canonical md5 and its IDX magic number.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import socket
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ._common import check_device, check_int
from .base import Task

MEAN, STD = 0.1307, 0.3081  # of the MNIST training pixels scaled to [0, 1]
N_PIXELS = 28 * 28
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim
SUBSET_NOTE = "MNIST: offline 10k test-split subset (8k train / 2k validation), not the full 70k"
SUBSET_TRAIN = 8000  # the first 8000 of a fixed permutation of the 10k test split train, the rest validate
SUBSET_SPLIT_SEED = 0
OFFLINE_COPY = Path("..") / "shared" / "data" / "mnist"
HF_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
DATA_DIR_VARIABLE = "SEQTP_DATA_DIR"


@dataclass(frozen=True)
class MnistData:
    """MNIST as tensors on the CPU: images uint8 ``[N, 28, 28]``, labels int64 ``[N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    note: str = ""


def read_idx(path: Path) -> torch.Tensor:
    """A gzipped IDX file, checked against its canonical md5, as a uint8 tensor (``[N, 28, 28]`` or ``[N]``)."""
    raw = path.read_bytes()
    digest = hashlib.md5(raw).hexdigest()
    if digest != MD5[path.name]:
        raise ValueError(f"MNIST file {path} is corrupt: md5 {digest}, expected {MD5[path.name]}")
    data = gzip.decompress(raw)
    expected = IDX_MAGIC["images" if "images" in path.name else "labels"]
    (magic,) = struct.unpack_from(">I", data)
    if magic != expected:
        raise ValueError(f"MNIST file {path} has IDX magic number {magic}, expected {expected}")
    ndim = magic & 0xFF
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)  # [N, 28, 28] or [N]


def read_idx_folder(folder: Path, *, origin: str = "task.data_dir") -> MnistData:
    """MNIST from a folder of IDX gz files: the full splits if all four are there, else the 10k test-split subset.

    ``origin`` names where the folder came from (``task.data_dir`` or ``$SEQTP_DATA_DIR``) in the error for a
    missing folder.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {folder} does not exist (set {origin})")
    names = list(MD5)
    if not any((folder / name).exists() for name in names if name.startswith("train")):
        names = [name for name in names if name.startswith("t10k")]
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"MNIST file {folder / name} is missing")
    arrays = {name.split("-idx")[0]: read_idx(folder / name) for name in names}  # e.g. "t10k-images" -> [N, 28, 28]
    if "train-images" in arrays:
        return MnistData(
            arrays["train-images"], arrays["train-labels"].long(), arrays["t10k-images"], arrays["t10k-labels"].long()
        )
    return _subset_split(arrays["t10k-images"], arrays["t10k-labels"].long())


def _subset_split(images: torch.Tensor, labels: torch.Tensor) -> MnistData:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SUBSET_SPLIT_SEED))  # [10000]
    train, val = order[:SUBSET_TRAIN], order[SUBSET_TRAIN:]
    return MnistData(images[train], labels[train], images[val], labels[val], note=SUBSET_NOTE)


def _hub_reachable() -> bool:
    if any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in HF_OFFLINE_VARIABLES):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def _load_hub() -> MnistData:
    import datasets

    dataset = datasets.load_dataset("ylecun/mnist")

    def convert(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = b"".join(image.convert("L").tobytes() for image in dataset[split]["image"])
        images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).reshape(-1, 28, 28)  # [N, 28, 28]
        return images, torch.tensor(list(dataset[split]["label"]), dtype=torch.long)  # [N]

    return MnistData(*convert("train"), *convert("test"))


def load_mnist(data_dir: str | os.PathLike[str] = "") -> MnistData:
    """MNIST from the first available source (see the module docstring)."""
    if str(data_dir):
        return read_idx_folder(Path(data_dir))
    if os.environ.get(DATA_DIR_VARIABLE, ""):
        return read_idx_folder(Path(os.environ[DATA_DIR_VARIABLE]), origin=f"${DATA_DIR_VARIABLE}")
    if _hub_reachable():
        return _load_hub()
    for folder in (Path.cwd() / OFFLINE_COPY, Path(__file__).resolve().parents[1] / OFFLINE_COPY):
        if folder.is_dir():
            folder = folder.resolve()
            warnings.warn(f"Hugging Face hub unreachable; reading MNIST from the offline copy {folder}", stacklevel=2)
            return read_idx_folder(folder)
    raise FileNotFoundError("MNIST not found: Hugging Face hub unreachable and no offline copy; set task.data_dir")


class PixelMNIST(Task):
    """Classify an MNIST digit read one pixel per step, in raster order (784 steps).

    Pixels are scaled to ``[0, 1]`` then normalized by mean 0.1307 and std 0.3081. Training examples are drawn
    uniformly **with replacement** from the training split (``torch.randint`` on the generator's device); the
    validation set is the first ``val_size`` examples of the validation split (all of it when ``val_size <= 0``).
    The split is fixed: ``seed`` does not change it. ``note`` is set when the 10k test-split subset is used.

    Shapes: ``x`` float ``[B, 784, 1]``; ``y`` long ``[B]``; outputs ``[B, 10]``. The loss is the cross-entropy; the
    baseline is the entropy of the training label frequencies (the best memoryless predictor predicts them); the
    chance accuracy is the frequency of the most frequent training label (the best constant guess, about 1/10).
    """

    name = "pixel_mnist"
    kind = "classification"
    readout = "last"
    seq_len = N_PIXELS
    input_size = 1
    output_size = 10
    permutation: torch.Tensor | None = None  # [784] pixel order, set by PermutedMNIST

    def __init__(
        self, *, seq_len: int, device: torch.device | str, seed: int, val_size: int = 1000, data_dir: str = ""
    ) -> None:
        if seq_len != N_PIXELS:
            raise ValueError(f"task.seq_len must be {N_PIXELS} for {self.name}, got {seq_len!r}")
        check_int("seed", seed, 0)
        check_int("val_size", val_size)
        self.device = check_device(device)
        data = load_mnist(data_dir)
        self.note = data.note
        self._train_images = self._flat(data.train_images).to(self.device)  # [N, 784] uint8
        self._train_labels = data.train_labels.to(self.device)  # [N]
        self.n_train = len(self._train_labels)
        n_val = len(data.val_labels) if val_size <= 0 else min(val_size, len(data.val_labels))
        val_images = self._flat(data.val_images[:n_val]).to(self.device)  # [V, 784] uint8
        self._val = (self._normalize(val_images), data.val_labels[:n_val].to(self.device))
        frequencies = torch.bincount(data.train_labels, minlength=self.output_size).double() / self.n_train  # [10]
        self.baseline = -sum(p * math.log(p) for p in frequencies.tolist() if p > 0)
        self.chance_accuracy = frequencies.max().item()  # always the most frequent training label (about 1/10)

    def _flat(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.reshape(len(images), N_PIXELS)  # [N, 28, 28] -> [N, 784]
        return pixels if self.permutation is None else pixels[:, self.permutation]  # [N, 784]

    @staticmethod
    def _normalize(pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels.float() / 255 - MEAN) / STD).unsqueeze(-1)  # [N, 784] uint8 -> [N, 784, 1] float

    def sample(self, batch_size: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(self.n_train, (batch_size,), generator=generator, device=generator.device)  # [B]
        index = index.to(self.device)
        x = self._normalize(self._train_images[index]).to(generator.device)  # [B, 784, 1]
        return x, self._train_labels[index].to(generator.device)  # [B]

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._val

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, y)  # [B, 10] against [B]


class PermutedMNIST(PixelMNIST):
    """Pixel MNIST with the pixels read in a fixed random order (Le et al. 2015, sec. 4.2).

    The order ``permutation`` (``[784]``, on the CPU) is ``torch.randperm`` from a CPU generator seeded with the option
    ``permutation_seed`` (default 0), the same for training and validation. Shapes as ``PixelMNIST``.
    """

    name = "permuted_mnist"

    def __init__(
        self,
        *,
        seq_len: int,
        device: torch.device | str,
        seed: int,
        val_size: int = 1000,
        data_dir: str = "",
        permutation_seed: int = 0,
    ) -> None:
        check_int("permutation_seed", permutation_seed, 0)
        self.permutation_seed = permutation_seed
        self.permutation = torch.randperm(N_PIXELS, generator=torch.Generator().manual_seed(permutation_seed))
        super().__init__(seq_len=seq_len, device=device, seed=seed, val_size=val_size, data_dir=data_dir)
