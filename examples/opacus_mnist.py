"""An Opacus training script with only the import changed (`from opacus import PrivacyEngine` ->
`from dpfast import PrivacyEngine`, `opacus.utils.batch_memory_manager` -> `dpfast.utils...`).

The structure is Opacus' examples/mnist.py: a small CNN, SGD, make_private with Opacus' keywords,
BatchMemoryManager for the physical batch, the accountant's epsilon after each epoch. The data is
scikit-learn's bundled digits (8x8; it exists on a fresh machine) standing in for MNIST.

    python examples/opacus_mnist.py --epochs 2
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine                                     # was: from opacus import PrivacyEngine
from dpfast.utils.batch_memory_manager import BatchMemoryManager     # was: from opacus.utils.batch_memory_manager


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # 8 -> 4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # 4 -> 2
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0 * 2 - 1, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[:300], perm[300:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def train(model, optimizer, loader, epoch, privacy_engine, delta, max_physical_batch_size):
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical_batch_size,
                            optimizer=optimizer) as memory_safe_loader:
        for images, target in memory_safe_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    epsilon = privacy_engine.accountant.get_epsilon(delta=delta)
    print(f"Train Epoch: {epoch} \t Loss: {np.mean(losses):.6f} (epsilon = {epsilon:.2f}, delta = {delta})")
    return epsilon


def test(model, loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, target in loader:
            correct += (model(images).argmax(1) == target).sum().item()
    acc = correct / len(loader.dataset)
    print(f"Test set: accuracy {acc:.3f}")
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-physical-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--max-per-sample-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    train_set, test_set = digits()
    train_loader = DataLoader(train_set, batch_size=args.batch_size)
    test_loader = DataLoader(test_set, batch_size=256)
    model = SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0)
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm, poisson_sampling=True, clipping="flat",
        grad_sample_mode="hooks")
    for epoch in range(1, args.epochs + 1):
        epsilon = train(model, optimizer, train_loader, epoch, privacy_engine, args.delta, args.max_physical_batch_size)
    accuracy = test(model, test_loader)
    return {"epsilon": epsilon, "accuracy": accuracy}


if __name__ == "__main__":
    main()
