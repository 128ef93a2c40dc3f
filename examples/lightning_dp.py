"""A Lightning module trained with DP-SGD by dpfast, with Lightning's automatic optimisation (the
default: `training_step` returns the loss, Lightning calls backward and `optimizer.step(closure)`).

What dpfast needs from a Lightning script:
- `make_private` in `setup` (the module's layers, its optimizer and its loader; Lightning calls it
  before `configure_optimizers` and `train_dataloader`, which return what make_private returned), and
  Lightning kept from replacing the loader's sampler (`use_distributed_sampler=False`): its Poisson
  batches are dpfast's.
- one `optimizer.step()` per batch the loader yields (no `accumulate_grad_batches`), and no
  `max_physical_batch_size`: Lightning counts every `optimizer.step()` call as a step (its
  `global_step`, `max_steps`, schedulers), while with physical chunks only the last chunk of a logical
  batch is a DP-SGD step (`engine.steps` counts those).
- fp32 or bf16 (`precision="bf16-mixed"`), never fp16 (its GradScaler is refused).

    python examples/lightning_dp.py --max-steps 30
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpfast import PrivacyEngine


def digits():
    """scikit-learn's bundled digits (8x8), a stand-in for the private images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0 * 2 - 1, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, torch.tensor(d.target, dtype=torch.long))


def build(args):
    import lightning as L

    class DPClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                                     nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
            self.engine = PrivacyEngine(accountant="prv", seed=args.noise_seed)
            self.loader = None

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("epsilon", self.engine.get_epsilon(args.delta) if self.engine.steps else 0.0, prog_bar=True)
            return loss

        def setup(self, stage):  # before configure_optimizers and train_dataloader: make the module private
            if self.loader is None:
                optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr)
                self.net, self.dp_optimizer, self.loader = self.engine.make_private(
                    module=self.net, optimizer=optimizer, noise_multiplier=args.sigma, max_grad_norm=1.0,
                    data_loader=DataLoader(digits(), batch_size=args.batch_size))

        def configure_optimizers(self):
            return self.dp_optimizer

        def train_dataloader(self):
            return self.loader

    return DPClassifier()


def main(argv=None) -> dict:
    import lightning as L

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", type=int, default=100, help="logical steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--noise-seed", type=int, default=None, help="pin only to test; a known seed voids the privacy")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = build(args)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(model)
    eps = model.engine.get_epsilon(args.delta)
    print(f"{model.engine.steps} DP-SGD steps, epsilon {eps:.3f} at delta {args.delta:g}")
    return {"steps": model.engine.steps, "epsilon": eps, "global_step": trainer.global_step}


if __name__ == "__main__":
    main()
