"""Image data sets for diffusion training: MNIST-format IDX files (plain or .gz) and image folders.

Fashion-MNIST is read from Debian's `dataset-fashion-mnist` package by default
(/usr/share/datasets/fashion-mnist); `--data-dir` points at any directory of MNIST-format IDX files
(`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...` for the test split) or at
an image folder (one sub-folder per class, or a flat folder for unlabelled data). An image folder
loads as RGB, or as grey when the caller asks for 1 channel: its channel count is never read off the
images (it is part of the released model's shape).

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


# The channel count of an image folder when the caller names none: RGB, torchvision's ImageFolder
# convention. A constant, never read off the images (see load_image_folder).
IMAGE_FOLDER_CHANNELS = 3
# PIL modes whose values do not fit 8 bits (16/32-bit integers, floats): PIL's conversion to "L" or
# "RGB" clips them (a 16-bit 1000 becomes 255), so such a folder is refused rather than silently ruined
_WIDE_MODES = ("I", "F")


def _target_mode(channels) -> str:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"an image folder loads as 1 (grey) or 3 (RGB) channels, not {channels!r}")
    return "L" if channels == 1 else "RGB"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _read_image(path: Path, mode: str) -> np.ndarray:
    """One image file as uint8 (C, H, W) in ``mode``; a one-line ValueError naming the file otherwise."""
    from PIL import Image

    try:
        img = Image.open(path)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({_first_line(e)})") from None
    with img:
        if img.mode.split(";")[0] in _WIDE_MODES:
            raise ValueError(f"{path}: {img.mode} images (more than 8 bits per channel) cannot be converted to "
                             f"8-bit {mode} without clipping; convert the folder to 8-bit images first")
        try:
            a = np.asarray(img.convert(mode), dtype=np.uint8)
        except (OSError, ValueError) as e:  # a truncated file, a mode PIL cannot convert
            raise ValueError(f"{path}: cannot read its {img.mode} image as {mode} ({_first_line(e)})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_image_folder(folder: Path, channels: int | None = None) -> ImageDataset:
    """Sub-folders are classes (sorted names -> 0..C-1); a flat folder is unlabelled data.

    ``channels`` (1: grey, 3: RGB) is the caller's, public choice; None means
    :data:`IMAGE_FOLDER_CHANNELS` (3, RGB). Every image is converted to it by PIL's fixed rule (grey ->
    repeated, colour -> ITU-R 601 luma, alpha and palettes dropped); a file that cannot be read or
    converted without clipping (16-bit, 32-bit, float) is refused with a one-line ValueError."""
    folder = Path(folder)
    # Privacy: the channel count is part of the released model (model.pt's image_shape, the U-Net's
    # first and last convolutions), so it must not be a function of any record. It used to be read off
    # the first file's PIL mode, with every other image converted to it: under add/remove adjacency,
    # one grey record sorting first turned an RGB folder's model into a 1-channel one, a release of
    # that record without noise. Now it is the caller's argument or a constant; the conversion applied
    # to each image depends on that image alone, so the shape (C, H, W) is the same on every pair of
    # neighbouring folders that load (H, W: every image must share one size, refused otherwise, so two
    # neighbouring folders that both load agree on it). A refusal happens before anything is released
    # (curator-side input validation, like the label range check of the trainer).
    mode = _target_mode(IMAGE_FOLDER_CHANNELS if channels is None else channels)
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
    arrays = []
    for p in files:
        a = _read_image(p, mode)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"{p} is {a.shape[2]}x{a.shape[1]}, {files[0]} is {arrays[0].shape[2]}x"
                             f"{arrays[0].shape[1]}: images must share a size")
        arrays.append(a)
    return ImageDataset(np.stack(arrays), labels, len(subdirs), name=str(folder))


def load_dataset(data_dir: str | os.PathLike | None = None, split: str = "train",
                 channels: int | None = None) -> ImageDataset:
    """Loads a split ('train' or 'test'). data_dir None means Fashion-MNIST from Debian's package.

    ``channels``: an image folder's channel count (1 or 3), a public choice of the caller; None is
    :data:`IMAGE_FOLDER_CHANNELS` (RGB), never the images' own modes (see :func:`load_image_folder`).
    IDX files carry theirs in the header (the same for every record): a ``channels`` that differs
    from it is refused."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if channels is not None:
        _target_mode(channels)
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
        held = images.shape[1] if images.ndim == 4 else 1
        if channels is not None and channels != held:
            raise ValueError(f"{pair[0]} holds {held}-channel images (its header), not {channels}: IDX files are "
                             "loaded as they are; leave the channel count out or convert the files")
        if data_dir is None or root.resolve() == Path(FASHION_MNIST_DIR).resolve():
            # Fashion-MNIST: 10 classes, whatever the labels say
            return ImageDataset(images, labels, 10, name=str(root))
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        return ImageDataset(images, labels, num_classes, name=str(root), classes_declared=False)
    if (root / split).is_dir():
        return load_image_folder(root / split, channels)
    has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*"))
    if split == "train" and has_images:
        return load_image_folder(root, channels)
    raise _missing(None if data_dir is None else root, split)
