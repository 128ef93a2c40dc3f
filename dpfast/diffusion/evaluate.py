"""Utility of synthetic data: downstream classifier accuracy and a classifier-feature FID.

Downstream accuracy (DPDM's protocol): train DPDM's small CNN on labelled synthetic images, test it on
the real test set. Model selection (the epoch kept) uses a validation split carved from the
*synthetic* data; the real test set is touched exactly once, by the selected model.

FID here is the Frechet distance between Gaussian fits of the 128-d penultimate features of a CNN
trained on the real training set (selection on a held-out part of the real training set), computed
between the synthetic samples and the real test set. It is NOT Inception FID (no Inception network
is used or downloaded), so its values are not comparable with published FIDs (DPDM's 17.1 at eps=10
is Inception FID); compare runs with each other.
"""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, load_dataset


class CNN(nn.Module):
    """DPDM's downstream CNN (train_downstream_classifiers.py), sized for any square input. Images
    under 22 pixels (only in tests) get padded convolutions, or the feature map would vanish."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        pad = 1 if image_size < 22 else 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=pad), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(32, 64, 3, padding=pad), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(64, 128, 3, padding=pad), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.body(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(128, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def _batched(model: nn.Module, x: torch.Tensor, fn, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([fn(to_float(x[i:i + batch])) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred = _batched(model, images, lambda b: model(b).argmax(1))
    return float((pred == labels).float().mean())


def train_classifier(images: torch.Tensor, labels: torch.Tensor, val_images: torch.Tensor,
                     val_labels: torch.Tensor, num_classes: int, epochs: int = 20, batch_size: int = 128,
                     lr: float = 3e-4, seed: int = 0, log=None) -> tuple[CNN, float, int]:
    """Adam on cross-entropy; keeps the epoch with the best accuracy on (val_images, val_labels).
    images: uint8 (N, C, H, W). Returns (model, best validation accuracy, its epoch)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CNN(images.shape[1], images.shape[2], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = (-1.0, 0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(to_float(images[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, val_images, val_labels)
        if log:
            log(f"  epoch {epoch}: validation accuracy {acc:.4f}")
        if acc > best[0]:
            best = (acc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model.eval(), best[0], best[1]


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def downstream_accuracy(synth_images: torch.Tensor, synth_labels: torch.Tensor, test: ImageDataset,
                        num_classes: int, epochs: int = 20, val_fraction: float = 0.1, seed: int = 0,
                        log=None) -> dict:
    """Train on synthetic (selecting on a synthetic validation split), test once on the real test set."""
    train_idx, val_idx = _split(len(synth_images), val_fraction, seed)
    model, val_acc, epoch = train_classifier(synth_images[train_idx], synth_labels[train_idx],
                                             synth_images[val_idx], synth_labels[val_idx], num_classes,
                                             epochs=epochs, seed=seed, log=log)
    return {"test_accuracy": accuracy(model, test.images, test.labels),
            "synthetic_validation_accuracy": val_acc, "selected_epoch": epoch, "epochs": epochs,
            "train_samples": len(train_idx), "validation_samples": len(val_idx),
            "classifier": "DPDM's CNN (3 conv + 2 linear), Adam 3e-4, batch 128"}


def _dataset_key(ds: ImageDataset) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(ds.images.shape)).encode())
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def feature_network(real_train: ImageDataset, epochs: int = 10, cache: str | os.PathLike | None = None,
                    seed: int = 0, log=None) -> CNN:
    """The feature extractor for FID: the CNN trained on the real training set (selection on a 10%
    held-out part of it). Cached, keyed by a hash of the training data."""
    key = _dataset_key(real_train)
    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpfast"
        cache = cache / f"feature_cnn_{key}_e{epochs}_s{seed}.pt"
    cache = Path(cache)
    c, h, _ = real_train.image_shape
    if cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=False)
        if state.get("key") == key:
            model = CNN(c, h, real_train.num_classes)
            model.load_state_dict(state["model"])
            return model.eval()
    if log:
        log(f"training the feature CNN on the real training set ({epochs} epochs; cached at {cache})")
    train_idx, val_idx = _split(len(real_train), 0.1, seed)
    model, val_acc, _ = train_classifier(real_train.images[train_idx], real_train.labels[train_idx],
                                         real_train.images[val_idx], real_train.labels[val_idx],
                                         real_train.num_classes, epochs=epochs, seed=seed, log=log)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "model": model.state_dict(), "validation_accuracy": val_acc}, cache)
    return model


def feature_stats(model: CNN, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = _batched(model, images, model.features).double().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), as in the FID of Heusel et al."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # a singular product is handled below, as pytorch-fid does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reads a `dpfast sample` file: images uint8 (N, C, H, W), labels (N,) or None."""
    with np.load(path) as f:
        images = torch.from_numpy(f["images"].astype(np.uint8))
        labels = torch.from_numpy(f["labels"].astype(np.int64)) if "labels" in f else None
    return images, labels


def evaluate(samples: str | os.PathLike, data_dir=None, epochs: int = 20, feature_epochs: int = 10,
             feature_cache=None, accuracy_metric: bool = True, fid: bool = True, seed: int = 0,
             log=print) -> dict:
    images, labels = load_samples(samples)
    test = load_dataset(data_dir, "test")
    resolution = images.shape[-1]
    if resolution < test.images.shape[-1]:  # a model trained with --resolution: compare at its size
        log(f"samples are {resolution}x{resolution}: the real images are average-pooled to that size")
        test = test.downsample(resolution)
    if images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"samples are {tuple(images.shape[1:])} but the test images are "
                         f"{tuple(test.images.shape[1:])}")
    report: dict = {"samples": str(samples), "num_samples": len(images), "test_set": test.name,
                    "num_test": len(test), "resolution": resolution}
    if accuracy_metric:
        if labels is None:
            raise ValueError(f"{samples} has no labels: downstream accuracy needs labelled samples "
                             "(or pass --no-accuracy)")
        num_classes = max(test.num_classes, int(labels.max()) + 1)
        log(f"downstream CNN: training on {len(images)} synthetic samples (10% kept for validation)")
        report["downstream"] = downstream_accuracy(images, labels, test, num_classes, epochs=epochs,
                                                   seed=seed, log=log)
        log(f"downstream accuracy on the real test set: {report['downstream']['test_accuracy']:.4f}")
    if fid:
        net = feature_network(load_dataset(data_dir, "train").downsample(resolution), epochs=feature_epochs,
                              cache=feature_cache, seed=seed, log=log)
        value = frechet_distance(*feature_stats(net, images), *feature_stats(net, test.images))
        report["fid"] = {"value": value, "reference": "real test set",
                         "features": "128-d penultimate layer of a CNN trained on the real training set",
                         "note": "NOT Inception FID: not comparable with published FID values"}
        log(f"classifier-feature FID (not Inception FID) vs the real test set: {value:.3f}")
    return report
