"""Image data sets for diffusion training: MNIST-format IDX files (plain or .gz) and image folders.

Fashion-MNIST is read from Debian's `dataset-fashion-mnist` package by default
(/usr/share/datasets/fashion-mnist); `--data-dir` points at any directory of MNIST-format IDX files
(`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...` for the test split) or at
an image folder (one sub-folder per class, or a flat folder for unlabelled data).

Images are kept as uint8 (N, C, H, W) and scaled to [-1, 1] per item, as DPDM does.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFoundError(FileNotFoundError):
    pass


def _open(path: str | os.PathLike):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into an array of its stored shape and dtype."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, file holds {body.size} values")
    return body.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes an array as an IDX file (gzipped when the name ends in .gz)."""
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}.get(array.dtype)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


class ImageDataset(Dataset):
    """(image, label) pairs: image float32 (C, H, W) in [-1, 1], label a long scalar (0 when
    the data has no labels; `num_classes` is then 0)."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels, num_classes: int, name: str = "",
                 classes_declared: bool = True):
        images = torch.as_tensor(np.asarray(images, dtype=np.uint8))
        if images.ndim == 3:                      # (N, H, W) grey-scale -> (N, 1, H, W)
            images = images[:, None]
        self.images = images.contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.num_classes = num_classes
        self.name = name
        # False when num_classes was read off the labels (labels.max() + 1): then it is a function of
        # the (private) labels, and a private class-conditional run needs a declared count instead
        self.classes_declared = classes_declared

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, self.labels[i]

    def subset(self, n: int) -> "ImageDataset":
        """The first n items (a fixed subset: DP then protects the members of this subset)."""
        return ImageDataset(self.images[:n], self.labels[:n], self.num_classes, self.name, self.classes_declared)

    def downsample(self, resolution: int) -> "ImageDataset":
        """Average-pools the images by an integer factor down to resolution x resolution (for quick
        CPU runs: 28 -> 14 makes every row ~4x cheaper)."""
        h = self.images.shape[-1]
        if resolution == h:
            return self
        if h % resolution:
            raise ValueError(f"can only downsample {h}x{h} images by an integer factor, not to {resolution}")
        pooled = torch.nn.functional.avg_pool2d(self.images.float(), h // resolution)
        return ImageDataset(pooled.round().to(torch.uint8), self.labels, self.num_classes, self.name,
                            self.classes_declared)


def _find(data_dir: Path, prefix: str, kind: str) -> Path | None:
    # matches train-images-idx3-ubyte, train-images.idx3-ubyte, ... with or without .gz
    hits = sorted(p for p in data_dir.glob(f"{prefix}-{kind}*") if p.is_file())
    return hits[0] if hits else None


def _idx_pair(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = _find(data_dir, prefix, "images"), _find(data_dir, prefix, "labels")
    return (images, labels) if images and labels else None


def _missing(data_dir: Path | None, split: str) -> DatasetNotFoundError:
    if data_dir is None or str(data_dir) == FASHION_MNIST_DIR:
        return DatasetNotFoundError(
            f"Fashion-MNIST ({split} split) was not found under {FASHION_MNIST_DIR}. Install it with\n"
            f"    sudo apt-get install dataset-fashion-mnist\n"
            f"(Debian/Ubuntu), or pass --data-dir DIR with MNIST-format IDX files "
            f"(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-... for the test "
            f"split) or an image folder.")
    return DatasetNotFoundError(
        f"No {split} data in {data_dir}: expected MNIST-format IDX files "
        f"({'t10k' if split == 'test' else 'train'}-images-idx3-ubyte[.gz] and "
        f"...-labels-idx1-ubyte[.gz]), a '{split}' image folder inside it, or (train split only) an "
        f"image folder with one sub-folder per class. For Fashion-MNIST: "
        f"sudo apt-get install dataset-fashion-mnist, then leave out --data-dir.")


def load_image_folder(folder: Path, channels: int | None = None) -> ImageDataset:
    """Sub-folders are classes (sorted names -> 0..C-1); a flat folder is unlabelled data."""
    from PIL import Image

    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs:
        classes = [(i, d) for i, d in enumerate(subdirs)]
    else:
        classes = [(0, folder)]
    files, labels = [], []
    for label, d in classes:
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
                labels.append(label)
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    first = Image.open(files[0])
    if channels is None:
        channels = 1 if first.mode in ("L", "1", "I;16", "I") else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for p in files:
        img = Image.open(p).convert(mode)
        if img.size != first.size:
            raise ValueError(f"{p} is {img.size}, {files[0]} is {first.size}: images must share a size")
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return ImageDataset(np.stack(arrays), labels, len(subdirs), name=str(folder))


def load_dataset(data_dir: str | os.PathLike | None = None, split: str = "train") -> ImageDataset:
    """Loads a split ('train' or 'test'). data_dir None means Fashion-MNIST from Debian's package."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(data_dir) if data_dir is not None else Path(FASHION_MNIST_DIR)
    if not root.is_dir():
        raise _missing(None if data_dir is None else root, split)
    pair = _idx_pair(root, split)
    if pair is not None:
        images, labels = read_idx(pair[0]), read_idx(pair[1])
        if images.ndim == 4:                       # (N, H, W, C) colour IDX -> (N, C, H, W)
            images = images.transpose(0, 3, 1, 2)
        if len(images) != len(labels):
            raise ValueError(f"{pair[0]} has {len(images)} images but {pair[1]} has {len(labels)} labels")
        if data_dir is None or root.resolve() == Path(FASHION_MNIST_DIR).resolve():
            # Fashion-MNIST: 10 classes, whatever the labels say
            return ImageDataset(images, labels, 10, name=str(root))
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        return ImageDataset(images, labels, num_classes, name=str(root), classes_declared=False)
    if (root / split).is_dir():
        return load_image_folder(root / split)
    has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*"))
    if split == "train" and has_images:
        return load_image_folder(root)
    raise _missing(None if data_dir is None else root, split)
