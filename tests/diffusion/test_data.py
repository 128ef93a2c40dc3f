"""IDX files, image folders, and the error for a missing data set."""
import gzip

import numpy as np
import pytest
import torch

from dpfast.diffusion.data import DatasetNotFoundError, load_dataset, read_idx, write_idx


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5),
    np.array([3, 1, 4, 1, 5], dtype=np.uint8),
    np.arange(6, dtype=np.int32).reshape(3, 2) - 3,
    np.linspace(0, 1, 7).astype(np.float32),
])
def test_idx_round_trip(tmp_path, name, array):
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_mnist_one(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), np.uint8))
    raw = gzip.open(tmp_path / "x.gz").read()
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (2).to_bytes(4, "big")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def write_mnist_dir(path, n=20, size=8, classes=4, seed=0, test=True):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for prefix, m in (("train", n), ("t10k", n // 2)) if test else (("train", n),):
        write_idx(path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (m, size, size), dtype=np.uint8))
        write_idx(path / f"{prefix}-labels-idx1-ubyte", (np.arange(m) % classes).astype(np.uint8))
    return path


def test_load_mnist_format_dir(tmp_path):
    d = write_mnist_dir(tmp_path / "d")
    train, test = load_dataset(d, "train"), load_dataset(d, "test")
    assert len(train) == 20 and len(test) == 10
    assert train.image_shape == (1, 8, 8) and train.num_classes == 4
    x, y = train[3]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and y.item() == 3
    raw = read_idx(d / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(x[0], torch.from_numpy(raw[3]).float() / 127.5 - 1)
    assert len(train.subset(5)) == 5


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    import dpfast.diffusion.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(None)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_dataset(tmp_path / "empty")
    d = write_mnist_dir(tmp_path / "trainonly", test=False)
    with pytest.raises(DatasetNotFoundError, match="t10k"):
        load_dataset(d, "test")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert len(ds) == 6 and ds.image_shape == (3, 6, 6) and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(flat / "a.png")
    ds = load_dataset(flat)  # RGB unless the caller asks for grey: never the images' own mode
    assert ds.image_shape == (3, 6, 6) and ds.num_classes == 0
    ds = load_dataset(flat, channels=1)
    assert ds.image_shape == (1, 6, 6) and ds.num_classes == 0


def test_fashion_mnist_if_installed():
    try:
        ds = load_dataset(None, "test")
    except DatasetNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    assert len(ds) == 10000 and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
