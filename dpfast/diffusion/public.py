"""Public data: images that exist on a fresh machine, behind the private data's `ImageDataset`.

Recipes that learn something without privacy (a feature network, a pre-trained model) take it from
here, never from the private set. Sources:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 labelled 8x8 grey images, 10
  classes, shipped inside the scikit-learn wheel), rescaled to the requested size;
- a path: an image folder, a directory of MNIST-format IDX files, or an ``.npz`` with ``images``
  (uint8 N x C x H x W or N x H x W) and optionally ``labels`` (ImageNet-32, EMNIST, Places, ...).

`load_public(source, image_shape, private_dir=...)` refuses a path that is, or is inside, the
private data's directory: public data must never be a split of the private data set. That check
looks at paths only. It never compares the public images with the private ones, because a refusal
that depended on the private images would itself be a release that nothing accounts for.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data import FASHION_MNIST_DIR, ImageDataset, load_dataset

SOURCES = {"digits": "scikit-learn's bundled handwritten digits (1,797 labelled 8x8 images, 10 classes)"}


def _resize(images: torch.Tensor, image_shape) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, c, h, w): bilinear rescale (antialiased when shrinking) and
    channel conversion (grey -> repeated, colour -> luminance)."""
    c, h, w = image_shape
    x = images.float()
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1 and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel public images to {c} channels")
    if x.shape[-2:] != (h, w):
        shrink = x.shape[-2] > h or x.shape[-1] > w
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                                            antialias=shrink)
    return x.round().clamp(0, 255).to(torch.uint8)


def _digits() -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of dpfast; only a broken install gets here
        raise ImportError("the 'digits' public data set needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    return ImageDataset(images, d.target, 10, name="sklearn digits")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def load_public(source: str, image_shape, private_dir: str | os.PathLike | None = None) -> ImageDataset:
    """The public data set `source` (a name in SOURCES, or a path) at image_shape (C, H, W)."""
    if source in SOURCES:
        data = _digits()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"public data {source!r}: not one of {', '.join(SOURCES)} and no such path")
        private = Path(private_dir if private_dir is not None else FASHION_MNIST_DIR)
        if private.exists() and (_inside(path, private) or _inside(private, path)):
            raise ValueError(f"public data {source} overlaps the private data directory {private}: public "
                             "data must never be a split of the private data set")
        if path.suffix == ".npz":
            with np.load(path) as f:
                images = f["images"].astype(np.uint8)
                labelled = "labels" in f
                labels = f["labels"].astype(np.int64) if labelled else np.zeros(len(images), np.int64)
            num_classes = int(labels.max()) + 1 if labelled and len(labels) else 0
            data = ImageDataset(images, labels, num_classes, name=str(path))
        else:
            data = load_dataset(path, "train")
    return ImageDataset(_resize(data.images, image_shape), data.labels, data.num_classes, name=data.name)


def describe(source: str) -> str:
    return SOURCES.get(source, f"images from {source}")
