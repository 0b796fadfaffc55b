"""The `vit` suite's tasks: the eight image tasks of the `vision` suite, then six more from the same
packaged sources and the elpv solar cells, in a fixed order whose prefixes are the 8- and 14-task
settings.

The extra tasks are standard continual-learning constructions, named as such (rotated, permuted,
colour-inverted copies of a source), plus one task from a fifth source:
- `elpv_defect`: electroluminescence images of solar cells (PyPI `elpv-dataset`, CC BY-NC-SA
  4.0), defective (expert defect probability >= 0.5) or not, seeded 80/20 split; the 300 x 300
  images are reduced to 28 x 28 (area averaging) like the others.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from foldin.errors import FoldinError
from foldin.evaluation.vision.tasks import (
    DIGITS,
    FASHION_LABELS,
    Source,
    Split,
    _animal,
    _digits,
    _fashion,
    _mnist5k,
    _permuted,
    _rotated,
    _split,
    vision_sources,
)

ANIMALS = [f"animal {i}" for i in range(10)]
SIDE = 28


def _inverted(data: tuple[Split, Split]) -> tuple[Split, Split]:
    return tuple((255 - x, y) for x, y in data)  # type: ignore[return-value]


def _elpv(seed: int) -> tuple[Split, Split]:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FoldinError(
            "the elpv solar-cell images are not installed: pip install elpv-dataset==1.0.0.post1 --no-deps."
        )
    from PIL import Image

    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows = [line.split() for line in (folder / "labels.csv").read_text().splitlines() if line.strip()]
    images = []
    for path, _, _ in rows:
        with Image.open(folder / path) as image:
            images.append(np.asarray(image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)))
    labels = torch.tensor([int(float(p) >= 0.5) for _, p, _ in rows])
    return _split(torch.from_numpy(np.stack(images)), labels, seed)


def vit_sources(seed: int) -> dict[str, Source]:
    """name -> (source description, label names, loader returning (train, test)), in the suite's order."""
    extra: dict[str, Source] = {
        "rotated_fashion_mnist": (
            "rotated Fashion-MNIST: turned 90 degrees (continual-learning variant)",
            FASHION_LABELS,
            lambda: _rotated(_fashion()),
        ),
        "permuted_animal_mnist": (
            "permuted Animal-MNIST: one fixed pixel permutation (continual-learning variant)",
            ANIMALS,
            lambda: _permuted(_animal(seed), seed + 3),
        ),
        "elpv_defect": (
            "elpv solar cells: defective or not (elpv-dataset, CC BY-NC-SA 4.0)",
            ["intact", "defective"],
            lambda: _elpv(seed),
        ),
        "inverted_mnist": (
            "inverted MNIST: MNIST-5k with colours inverted (continual-learning variant)",
            DIGITS,
            lambda: _inverted(_mnist5k(seed)),
        ),
        "permuted_digits": (
            "permuted digits: scikit-learn's digits with one fixed pixel permutation (continual-learning variant)",
            DIGITS,
            lambda: _permuted(_digits(seed), seed + 4),
        ),
        "inverted_fashion_mnist": (
            "inverted Fashion-MNIST: colours inverted (continual-learning variant)",
            FASHION_LABELS,
            lambda: _inverted(_fashion()),
        ),
    }
    return {**vision_sources(seed), **extra}
