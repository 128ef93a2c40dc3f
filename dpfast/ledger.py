"""The privacy ledger: an append-only record of every release, written before the release happens.

A checkpoint holds the accountant as it was when the checkpoint was taken. Rolling a run back to it
(a new engine loading an earlier state: the documented resume path) would forget every step released
after it, and re-run those steps with the same noise keys and the same Poisson batches. On a GPU the
two releases of one key then differ by a noise-free amount (nondeterministic kernels). The ledger
closes both holes: each line is one release, flushed and fsynced before the noisy gradient reaches a
parameter, so a crash can only over-count. On loading a checkpoint, the engine charges every ledger
entry after it and moves its noise keys and sampler past the ledger's last entry (fresh noise and
fresh batches, charged again).

One line of JSON per release::

    {"key": 7, "sampler_step": 7, "sigma": 1.1, "q": 0.01, "run": "3f0c...", "time": 1764672000.0}

``run`` is a hash of the engine's seed (the seed itself stays secret), so entries of another run are
recognised. Events that end the guarantee (a refused batch, a release without noise) are lines too,
``{"event": "guarantee_lost", "why": "...", "run": ...}``: a rollback past them cannot forget them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


def run_id(seed: int) -> str:
    """A public name for a run keyed on ``seed`` (the first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(b"dpfast-ledger:" + int(seed).to_bytes(8, "little")).hexdigest()[:16]


def releases(path) -> list[dict]:
    """The release entries of the ledger at ``path`` (events left out), in the order written."""
    return [e for e in read(path) if "key" in e]


def read(path) -> list[dict]:
    """Entries (releases and events) of the ledger at ``path`` (empty if it does not exist).

    A line that does not parse is a write torn by a crash: it was written before the release it
    announced, and that release never happened, so it is skipped. :meth:`Ledger.append` ends a torn
    line before appending, so a torn write never swallows the next entry."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Ledger:
    """Appends releases to ``path``, durably (flush + fsync per entry)."""

    def __init__(self, path):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        return read(self.path)

    def append(self, *, key: int, sampler_step: int | None, sigma: float, q: float | None, run: str) -> None:
        self._write({"key": int(key), "sampler_step": sampler_step, "sigma": float(sigma),
                     "q": None if q is None else float(q), "run": run, "time": time.time()})

    def append_event(self, event: str, *, why: str, run: str) -> None:
        self._write({"event": event, "why": why, "run": run, "time": time.time()})

    def _write(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
