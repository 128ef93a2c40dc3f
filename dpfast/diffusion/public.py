"""Public data: images that exist on a fresh machine, behind the private data's `ImageDataset`.

Recipes that learn something without privacy (a feature network, a pre-trained model) take it from
here, never from the private set. Sources:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 labelled 8x8 grey images, 10
  classes, shipped inside the scikit-learn wheel), rescaled to the requested size;
- ``photos``: 2,000 crops (random position and scale, fixed seed) of the ~20 natural photographs
  that scikit-image ships inside its wheel (``skimage/data/*.png|jpg``), unlabelled;
- ``faces``: scikit-image's ``lfw_subset`` (200 small grey faces, 100 of them faces and 100 not),
  with their mirror images, unlabelled;
- ``dead-leaves``, ``fractal``, ``strokes``: programmatically generated images
  (`dpfast.diffusion.synthetic`: dead leaves, 1/f^beta textures, Bezier strokes), 2,000 of them or
  ``NAME:N``, unlabelled: they depend on nothing but a seed;
- several of them joined by ``+`` (``digits+photos+faces+dead-leaves``): one data set, labelled where
  its parts are (unlabelled images carry the label -1, which a conditional model reads as its null
  label);
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
from .presets import ConfigError
from .synthetic import DEFAULT_COUNT, GENERATORS, dead_leaves, describe_generated, generate, parse_generated  # noqa: F401

SOURCES = {"digits": "scikit-learn's bundled handwritten digits (1,797 labelled 8x8 images, 10 classes)",
           "photos": "2,000 crops of scikit-image's bundled photographs (skimage.data)",
           "faces": "scikit-image's lfw_subset faces (200 + mirrored, 25x25)",
           **{name: f"generated {text} (seed 0; NAME:N for N images, default {DEFAULT_COUNT:,})"
              for name, (_, text) in GENERATORS.items()}}
# `dpfast sample` writes this entry into its .npz files: samples of a model are never public data (a
# model trained on the private set would pass its privacy cost on uncounted)
SAMPLES_MARK = "dpfast_samples"
UNLABELLED = -1   # the label of an image without one (a conditional model uses its null label)
# the photographs of skimage/data that load without a download (the wheel ships them)
_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse",
           "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text", "retina",
           "microaneurysms", "colorwheel")


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


def _skimage():
    try:
        import skimage.data
    except ImportError as e:  # a dependency of dpfast; only a broken install gets here
        raise ImportError("the 'photos' and 'faces' public data need scikit-image (pip install scikit-image)") from e
    return skimage.data


def _grey(a: np.ndarray) -> np.ndarray:
    """An skimage image (H, W), (H, W, 3|4), uint8 or float in [0, 1] -> uint8 (H, W)."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114])
    if a.dtype != np.uint8:
        a = a * (255.0 if a.max() <= 1.0 else 1.0)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _photos(image_shape, n: int = 2000, seed: int = 0) -> ImageDataset:
    """n square crops of the bundled photographs: a photograph, a side between 1/8 and 1/2 of its
    shorter edge (log-uniform), a position, all from `seed`; each crop rescaled to image_shape."""
    data = _skimage()
    photos = [torch.from_numpy(_grey(getattr(data, name)())) for name in _PHOTOS]
    rng = np.random.default_rng(seed)
    c, h, w = image_shape
    out = torch.empty((n, 1, h, w), dtype=torch.uint8)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        short = min(img.shape)
        side = int(round(short * np.exp(rng.uniform(np.log(1 / 8), np.log(1 / 2)))))
        top, left = rng.integers(img.shape[0] - side + 1), rng.integers(img.shape[1] - side + 1)
        out[i] = _resize(img[None, None, top:top + side, left:left + side], (1, h, w))[0]
    return ImageDataset(out, np.full(n, UNLABELLED), 0, name="skimage photographs (crops)")


def _faces() -> ImageDataset:
    faces = torch.from_numpy(_grey(_skimage().lfw_subset()))[:, None]
    faces = torch.cat([faces, faces.flip(-1)])
    return ImageDataset(faces, np.full(len(faces), UNLABELLED), 0, name="skimage lfw_subset")


def _join(parts: list[ImageDataset]) -> ImageDataset:
    if len(parts) == 1:
        return parts[0]
    return ImageDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                        max(p.num_classes for p in parts), name=" + ".join(p.name for p in parts))


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_overlap(path: str | os.PathLike, private_dir: str | os.PathLike | None) -> None:
    """Refuses a public path that is, contains or lies inside the private data's directory, also
    through symbolic links anywhere below it (a folder of links to the private files). Copies and
    hard links cannot be told from other files by their paths: public data is the user's to vouch for."""
    path = Path(path)
    private = Path(private_dir if private_dir is not None else FASHION_MNIST_DIR)
    if not private.exists():
        return

    def refuse(where: Path):
        raise ConfigError(f"public data {path} overlaps the private data directory {private}"
                          f"{'' if where == path else f' (through {where})'}: public data must never be a "
                          "split of the private data set")
    seen = set()

    def visit(p: Path, shown: Path):
        target = p.resolve()
        if _inside(target, private) or _inside(private, target):
            refuse(shown)
        if target in seen or not target.is_dir():
            return
        seen.add(target)
        for root, dirs, files in os.walk(target):   # links below it: checked, then followed
            for name in dirs + files:
                entry = Path(root) / name
                if entry.is_symlink():
                    visit(entry, entry)
    visit(path, path)


def check_disjoint(paths, private_dir: str | os.PathLike | None) -> None:
    """Every recorded public path against this run's private data (run at every start, so a resumed
    run whose --data-dir changed, or a cached model trained on public data, is checked again)."""
    for p in paths:
        check_overlap(p, private_dir)


def check_public_path(path: str | os.PathLike, private_dir: str | os.PathLike | None) -> None:
    """Refuses public data that is, contains, or lies inside the private data's directory, and files of
    dpfast runs (a run directory, samples of a model): those depend on private data."""
    path = Path(path)
    check_overlap(path, private_dir)
    def run_dir(folder: Path) -> bool:  # files only dpfast runs write
        return (folder / "privacy_report.json").exists() or (folder / "privacy_ledger.jsonl").exists()
    for folder in [path.resolve(), *path.resolve().parents]:
        if run_dir(folder):
            raise ConfigError(f"public data {path} is inside {folder}, the output of a dpfast run: what a "
                             "run writes depends on its private data, and is not public data")
    if path.is_dir():
        inner = next((p.parent for p in path.rglob("*") if p.name in ("privacy_report.json", "privacy_ledger.jsonl")),
                     None)
        if inner is not None:
            raise ConfigError(f"public data {path} contains {inner}, the output of a dpfast run: what a run "
                             "writes depends on its private data, and is not public data")
    if path.suffix == ".npz":
        with np.load(path) as f:
            if SAMPLES_MARK in f:
                raise ConfigError(f"public data {path} holds samples of a dpfast model (`dpfast sample`): a model "
                                 "trained on private data is not public data, and its epsilon would be dropped")


def load_public(source: str, image_shape, private_dir: str | os.PathLike | None = None) -> ImageDataset:
    """The public data set `source` (a name in SOURCES, a path, or several joined by '+') at
    image_shape (C, H, W)."""
    if "+" in source and not Path(source).exists():
        return _join([load_public(s, image_shape, private_dir) for s in source.split("+") if s])
    if parse_generated(source) is not None:
        images = generate(source, image_shape)
        data = ImageDataset(images, np.full(len(images), UNLABELLED), 0, name=describe_generated(source))
    elif source in SOURCES:
        make = {"digits": lambda: _digits(), "photos": lambda: _photos(image_shape),
                "faces": lambda: _faces()}
        data = make[source]()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"public data {source!r}: not one of {', '.join(SOURCES)} and no such path")
        check_public_path(path, private_dir)
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


def source_paths(source: str) -> list[str]:
    """The resolved file-system paths among the parts of `source` (recorded in model.pt, checked again
    by --init-from against the fine-tuning run's private data)."""
    parts = source.split("+") if "+" in source and not Path(source).exists() else [source]
    return [str(Path(p).resolve()) for p in parts if p and not is_named(p)]


def check_source_names(source: str) -> None:
    """Raises ValueError for a malformed generated source (NAME:N with a bad N) among the parts of
    `source`; paths are checked when they are loaded."""
    parts = source.split("+") if "+" in source and not Path(source).exists() else [source]
    for part in parts:
        parse_generated(part)


def is_named(source: str) -> bool:
    """A source dpfast makes itself (no file-system path): a SOURCES name, or NAME:N of a generator."""
    return source in SOURCES or parse_generated(source) is not None


def describe(source: str) -> str:
    if "+" in source and not Path(source).exists():
        return " + ".join(describe(s) for s in source.split("+") if s)
    if parse_generated(source) is not None:
        return describe_generated(source)
    return SOURCES.get(source, f"images from {source}")
