"""Utility of synthetic data: downstream classifier accuracy, and FID, precision and recall in the
feature space of a classifier trained on real data.

Downstream accuracy (DPDM's protocol, and DPImageBench's fix of its common mistake): train DPDM's small
CNN on n labelled synthetic images, n in (2k, 10k, 50k) where the samples allow. Model selection
(the epoch kept) uses a validation split carved from the *synthetic* data; the real test set is
touched exactly once, by the selected model. The classifier trains for 20 epochs, capped at
`CLASSIFIER_MAX_STEPS` optimiser steps so that 50k samples stay a few minutes on a CPU; the cap and
the epochs it allowed are in the report.

FID is the Frechet distance between Gaussian fits of the 128-d penultimate features of a CNN trained
on the real training set (selection on a held-out tenth of it), between the synthetic samples and
the real test set. Precision and recall are Kynkaenniemi et al.'s (2019) k-NN manifold estimates
(k=3) in the same feature space: precision is the share of synthetic samples inside the union of the
real samples' k-NN balls, recall the share of real samples inside the synthetic samples' balls. The
feature network is NOT Inception (nothing is downloaded), so the FID is not comparable with
published values (DPDM's 17.1 at eps=10 is Inception FID); compare runs with each other.

The feature network is trained once per data set and code version, at first use (with a progress
bar), and cached under ~/.cache/dpfast keyed by a hash of the training images, labels, the code that
builds and trains it, and its settings. It is trained without DP on the private training set, so
FID, precision and recall are private statistics, not covered by any epsilon: the report marks
them (``features.private``, ``features.privacy_note``) and so does the printed line.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, load_dataset

SIZES = (2000, 10000, 50000)       # downstream training-set sizes, as in DPImageBench and DPDM
CLASSIFIER_EPOCHS = 20
CLASSIFIER_MAX_STEPS = 3000        # ~2 min on one CPU thread at 14x14, ~6 min at 28x28
FEATURE_STEPS = 2000               # the feature network: Adam steps of batch 128 on the real data
METRIC_SAMPLES = 10000             # FID / precision / recall use at most this many images per side
PR_K = 3                           # Kynkaenniemi et al.'s k
# the feature metrics' privacy status: feature_network is trained without DP on the private training set
PRIVACY_NOTE = ("computed with a non-DP network trained on the private training set: a private statistic, not "
                "covered by epsilon; do not publish it next to epsilon as if it were")


class CNN(nn.Module):
    """DPDM's downstream CNN (train_downstream_classifiers.py), sized for any square input. Images
    under 22 pixels get padded convolutions, or the feature map would vanish."""

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
    """fn over batches of uint8 images x, on the model's device; the result on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([fn(to_float(x[i:i + batch].to(device))).cpu() for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred = _batched(model, images, lambda b: model(b).argmax(1))
    return float((pred == labels).float().mean())


def train_classifier(images: torch.Tensor, labels: torch.Tensor, val_images: torch.Tensor,
                     val_labels: torch.Tensor, num_classes: int, epochs: int = CLASSIFIER_EPOCHS,
                     max_steps: int | None = CLASSIFIER_MAX_STEPS, batch_size: int = 128,
                     lr: float = 3e-4, seed: int = 0, log=None, progress: bool = False,
                     desc: str = "classifier", device="cpu") -> tuple[CNN, float, int]:
    """Adam on cross-entropy for `epochs` epochs or `max_steps` steps, whichever ends first; keeps the
    epoch with the best accuracy on (val_images, val_labels) (a cut last epoch is validated too).
    images: uint8 (N, C, H, W). Returns (model, best validation accuracy, its epoch)."""
    from tqdm import tqdm

    if len(images) == 0 or len(val_images) == 0:
        raise ValueError("the classifier needs at least one training and one validation image")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CNN(images.shape[1], images.shape[2], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = -(-len(images) // batch_size)
    total = per_epoch * epochs if max_steps is None else min(per_epoch * epochs, max_steps)
    best = (-1.0, 0, None)
    step = 0
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(len(images), generator=gen)
            for i in range(0, len(images), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(model(to_float(images[idx].to(device))), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                if step >= total:
                    break
            acc = accuracy(model, val_images, val_labels)
            bar.set_postfix(val_acc=f"{acc:.3f}")
            if log:
                log(f"  epoch {epoch}: validation accuracy {acc:.4f}")
            if acc > best[0]:
                best = (acc, epoch, copy.deepcopy(model.state_dict()))
            if step >= total:
                break
    model.load_state_dict(best[2])
    return model.eval(), best[0], best[1]


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def downstream_accuracy(synth_images: torch.Tensor, synth_labels: torch.Tensor, test: ImageDataset,
                        num_classes: int, epochs: int = CLASSIFIER_EPOCHS,
                        max_steps: int | None = CLASSIFIER_MAX_STEPS, val_fraction: float = 0.1,
                        seed: int = 0, log=None, progress: bool = False, device="cpu") -> dict:
    """Train on labelled images (selecting on a validation split of *them*), test once on the real
    test set."""
    started = time.perf_counter()
    train_idx, val_idx = _split(len(synth_images), val_fraction, seed)
    model, val_acc, epoch = train_classifier(
        synth_images[train_idx], synth_labels[train_idx], synth_images[val_idx], synth_labels[val_idx],
        num_classes, epochs=epochs, max_steps=max_steps, seed=seed, log=log, progress=progress,
        desc=f"downstream CNN on {len(synth_images)}", device=device)
    return {"test_accuracy": accuracy(model, test.images, test.labels),
            "synthetic_validation_accuracy": val_acc, "selected_epoch": epoch, "epochs": epochs,
            "max_steps": max_steps, "train_samples": len(train_idx), "validation_samples": len(val_idx),
            "seconds": round(time.perf_counter() - started, 2),
            "classifier": "DPDM's CNN (3 conv + 2 linear), Adam 3e-4, batch 128"}


# ----------------------------------------------------------------------------- feature network
def _dataset_key(ds: ImageDataset) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(ds.images.shape)).encode())
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def _code_key(steps: int, seed: int) -> str:
    """The feature network changes when the code that builds or trains it does: its source is part
    of the cache key (with torch's major.minor version, whose kernels it was trained with)."""
    h = hashlib.sha1()
    for obj in (CNN, train_classifier, _split, to_float, feature_network):
        h.update(inspect.getsource(obj).encode())
    h.update(f"{steps}:{seed}:{'.'.join(torch.__version__.split('.')[:2])}".encode())
    return h.hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpfast"


def feature_network(real_train: ImageDataset, steps: int = FEATURE_STEPS,
                    cache: str | os.PathLike | None = None, seed: int = 0, log=None,
                    progress: bool = True, device="cpu") -> CNN:
    """The feature extractor for FID, precision and recall: DPDM's CNN trained on the real training
    set (selection on a 10% held-out part of it) for `steps` Adam steps. Built at first use and
    cached, keyed by the data and the code (`cache` is a file path, or None for ~/.cache/dpfast).

    It is trained WITHOUT privacy on the private training set: an evaluation instrument, as FID's
    reference statistics are, never released by dpfast. The cache file is owner-readable only;
    treat it (and the feature metrics, which it computes) as private data."""
    from .trainer import atomic_torch_save

    key = f"{_dataset_key(real_train)}_{_code_key(steps, seed)}"
    path = Path(cache) if cache is not None else default_cache_dir() / f"feature_cnn_{key}.pt"
    c, h, _ = real_train.image_shape
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("key") == key:
            model = CNN(c, h, real_train.num_classes)
            model.load_state_dict(state["model"])
            return model.to(device).eval()
    if log:
        log(f"building the feature network once for this data set ({steps} steps on "
            f"{len(real_train)} real training images; cached at {path})")
    train_idx, val_idx = _split(len(real_train), 0.1, seed)
    epochs = -(-steps * 128 // max(1, len(train_idx)))
    model, val_acc, _ = train_classifier(real_train.images[train_idx], real_train.labels[train_idx],
                                         real_train.images[val_idx], real_train.labels[val_idx],
                                         real_train.num_classes, epochs=max(1, epochs), max_steps=steps,
                                         seed=seed, progress=progress, desc="feature network (once)",
                                         device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"key": key, "model": {k: v.cpu() for k, v in model.state_dict().items()}, "validation_accuracy": val_acc}
    atomic_torch_save(state, path, secret=True)  # a non-private model of the private training set
    return model


def features(model: CNN, images: torch.Tensor) -> np.ndarray:
    return _batched(model, images, model.features).double().numpy()


def feature_stats(model: CNN, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features(model, images)
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


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query: is it inside at least one ball (centre, radius)?"""
    out = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], centres)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Kynkaenniemi et al. (2019): precision = share of fake points inside the union of the real
    points' k-NN balls; recall = share of real points inside the union of the fake points' balls."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points on each side")
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = _covered(f, r, _kth_nn_radius(r, k)).double().mean()
    recall = _covered(r, f, _kth_nn_radius(f, k)).double().mean()
    return float(precision), float(recall)


def feature_metrics(net: CNN, images: torch.Tensor, reference: torch.Tensor,
                    max_samples: int = METRIC_SAMPLES, seed: int = 0) -> dict:
    """FID, precision and recall of `images` against `reference`, each side subsampled to at most
    `max_samples` images (FID is biased by the sample count: compare values at the same count).
    `net` is `feature_network`'s, a non-DP model of the private training set: the result is marked
    private (PRIVACY_NOTE)."""
    started = time.perf_counter()

    def pick(x, stream):  # one generator per side: the reference subset never depends on the samples
        return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 2 + stream))[:max_samples]]
    a, b = features(net, pick(images, 0)), features(net, pick(reference, 1))
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    precision, recall = precision_recall(b, a)
    return {"fid": fid, "precision": precision, "recall": recall, "samples": len(a),
            "reference_samples": len(b), "k": PR_K, "seconds": round(time.perf_counter() - started, 2),
            "features": "128-d penultimate layer of DPDM's CNN trained on the real training set",
            "note": "NOT Inception FID: not comparable with published FID values",
            "private": True, "privacy_note": PRIVACY_NOTE}


# ----------------------------------------------------------------------------- the whole evaluation
def evaluate_images(images: torch.Tensor, labels: torch.Tensor | None, test: ImageDataset,
                    feature_net: CNN | None = None, sizes=SIZES, epochs: int = CLASSIFIER_EPOCHS,
                    max_steps: int | None = CLASSIFIER_MAX_STEPS, seed: int = 0, log=print,
                    progress: bool = True, device="cpu", metric_samples: int = METRIC_SAMPLES) -> dict:
    """Downstream accuracy at each size in `sizes` that the images allow (nested random subsets;
    all the images when there are fewer than the smallest size), and, with a feature network, FID,
    precision and recall against the real test set. images: uint8 (N, C, H, W)."""
    if images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"images are {tuple(images.shape[1:])} but the test images are "
                         f"{tuple(test.images.shape[1:])}")
    report: dict = {"num_samples": len(images), "test_set": test.name, "num_test": len(test),
                    "resolution": images.shape[-1]}
    if labels is not None:
        num_classes = max(test.num_classes, int(labels.max()) + 1)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        todo = sorted({min(int(n), len(images)) for n in sizes})
        report["downstream"] = {}
        for n in todo:
            idx = order[:n]
            res = downstream_accuracy(images[idx], labels[idx], test, num_classes, epochs=epochs,
                                      max_steps=max_steps, seed=seed, progress=progress, device=device)
            report["downstream"][str(n)] = res
            log(f"downstream accuracy, {n} training images: {res['test_accuracy']:.4f} "
                f"(epoch {res['selected_epoch']} selected on their validation split; {res['seconds']:.0f} s)")
    if feature_net is not None:
        report["features"] = m = feature_metrics(feature_net, images, test.images, max_samples=metric_samples,
                                                 seed=seed)
        log(f"feature-space FID {m['fid']:.3f} (not Inception FID), precision {m['precision']:.3f}, "
            f"recall {m['recall']:.3f} vs the real test set ({m['seconds']:.0f} s); PRIVATE: from a non-DP "
            "network of the private training set, not covered by epsilon")
    return report


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reads a `dpfast sample` file: images uint8 (N, C, H, W), labels (N,) or None."""
    with np.load(path) as f:
        images = torch.from_numpy(f["images"].astype(np.uint8))
        labels = torch.from_numpy(f["labels"].astype(np.int64)) if "labels" in f else None
    return images, labels


def real_splits(data_dir, resolution: int | None, log=None, channels: int | None = None
                ) -> tuple[ImageDataset, ImageDataset]:
    """The real training and test sets, average-pooled to `resolution` when it is given; image
    folders converted to `channels` (see load_dataset)."""
    train, test = load_dataset(data_dir, "train", channels), load_dataset(data_dir, "test", channels)
    if resolution is not None and resolution < test.images.shape[-1]:
        if log:
            log(f"{resolution}x{resolution} images: the real images are average-pooled to that size")
        train, test = train.downsample(resolution), test.downsample(resolution)
    return train, test


def evaluate(samples: str | os.PathLike, data_dir=None, sizes=SIZES, epochs: int = CLASSIFIER_EPOCHS,
             max_steps: int | None = CLASSIFIER_MAX_STEPS, feature_steps: int = FEATURE_STEPS,
             feature_cache=None, accuracy_metric: bool = True, fid: bool = True, seed: int = 0,
             log=print, progress: bool = True) -> dict:
    """`dpfast evaluate`: the report of `evaluate_images` for a `dpfast sample` file."""
    images, labels = load_samples(samples)
    if accuracy_metric and labels is None:
        raise ValueError(f"{samples} has no labels: downstream accuracy needs labelled samples "
                         "(or pass --no-accuracy)")
    train, test = real_splits(data_dir, images.shape[-1], log, channels=images.shape[1])
    if images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"samples are {tuple(images.shape[1:])} but the test images are "
                         f"{tuple(test.images.shape[1:])}")
    net = (feature_network(train, steps=feature_steps, cache=feature_cache, seed=seed, log=log,
                           progress=progress) if fid else None)
    report = evaluate_images(images, labels if accuracy_metric else None, test, net, sizes=sizes,
                             epochs=epochs, max_steps=max_steps, seed=seed, log=log, progress=progress)
    report["samples"] = str(samples)
    return report
