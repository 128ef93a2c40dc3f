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

``run`` is the engine's run id, 64 random bits from the OS drawn when the run starts
(:func:`new_run_id`), kept in its checkpoints (the engine's state_dict ``run_id``) and in its
optimizer's state stamp, so that entries of another run are recognised. It is never computed from the
seed: the seed has 64 bits, and any public function of it (this file used to write the first 64 bits
of SHA-256 of the seed) gives the seed away to 2^64 hashes, and with it every Philox noise draw of the
run, which can then be subtracted from the released model. Ledgers written before carry that hash
(:func:`legacy_run_id`); a checkpoint without ``run_id`` is one of those runs, and its ledger entries
are still matched to it. The file is created readable by its owner only (0600), like the
checkpoints. Events that end the guarantee (a refused batch, a release without noise) are lines too,
``{"event": "guarantee_lost", "why": "...", "run": ...}``: a rollback past them cannot forget them.

The file names itself: before its first entry (and again whenever it is written as another file), a
line ``{"event": "ledger_file", "ino": ...}`` records its inode. A copy of a run directory carries
the original's checkpoint and ledger; continued beside the original, both would release the same
noise keys and Poisson batches, and where the two releases differ (other data, nondeterministic GPU
kernels) their difference cancels the noise. A copy is a new file (a new inode; a move within a file
system keeps it), so a ledger whose last ``ledger_file`` line names another inode was copied or
restored: the engine refuses to resume next to it unless told the original will never continue
(``PrivacyEngine(adopt_copied_ledger=True)``, ``dpfast train --adopt-copied-run``). The inode says
nothing about the data. Nor is it a proof: a restore onto the old inode or a volume snapshot passes.
The guard against repeated noise is the engine's: every resume draws a fresh key
(``PrivacyEngine._resume_key``), unless ``deterministic_resume`` keeps the checkpoint's, and then
this check is the only one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path

_RUN_ID = re.compile(r"[0-9a-f]{16}")


def new_run_id() -> str:
    """A fresh public name for a run: 64 random bits from the OS (16 hex digits).

    Privacy: it is independent of the noise seed (``secrets`` draws it from the OS, not from the seed or
    from any generator keyed by it), so publishing it (in the ledger, in an optimizer's state) says
    nothing about the seed; resuming compares the id a checkpoint stores, never one recomputed from the
    seed."""
    return secrets.token_hex(8)


def legacy_run_id(seed: int) -> str:
    """The run id that ledgers and checkpoints written before :func:`new_run_id` existed carry: the
    first 16 hex digits of SHA-256 of the seed. Brute-forcing its 2^64 seeds recovers the seed, so it is
    only ever computed to recognise the records of those old runs, never written for a new one."""
    return hashlib.sha256(b"dpfast-ledger:" + int(seed).to_bytes(8, "little")).hexdigest()[:16]


def run_id(seed: int) -> str:
    """Deprecated: :func:`legacy_run_id`. A run's id is :func:`new_run_id`, stored with the run
    (:func:`run_id_of`), not a function of its seed."""
    return legacy_run_id(seed)


def check_run_id(value) -> str:
    """``value`` if it is a run id (16 lowercase hex digits); a one-line ValueError otherwise."""
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise ValueError(f"a run id is 16 lowercase hex digits, got {value!r}")
    return value


def run_id_of(state: dict) -> str:
    """The run id of an engine ``state_dict()``: its ``run_id``, or for a checkpoint written before run ids
    were drawn at random (no ``run_id``), the seed's :func:`legacy_run_id`, which is what that run wrote
    to its ledger and optimizer stamps."""
    if state.get("run_id") is not None:
        return check_run_id(state["run_id"])
    return legacy_run_id(state["seed"])


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


FILE_EVENT = "ledger_file"


class Ledger:
    """Appends releases to ``path``, durably (flush + fsync per entry)."""

    def __init__(self, path):
        self.path = Path(path)
        self._named_ino = None  # the inode this object last found named in the file

    def entries(self) -> list[dict]:
        return read(self.path)

    def records(self) -> list[dict]:
        """Releases and events of runs: every entry but the file's own ``ledger_file`` lines."""
        return [e for e in self.entries() if e.get("event") != FILE_EVENT]

    def copied_from(self) -> int | None:
        """The inode the file last named as its own, if that is not its inode now (it was copied or
        restored from a backup); None for a file that names itself, or names nothing (older ledgers)."""
        if not self.path.exists():
            return None
        named = [e for e in self.entries() if e.get("event") == FILE_EVENT]
        if not named or not isinstance(named[-1].get("ino"), int):
            return None
        ino = named[-1]["ino"]
        return None if ino == os.stat(self.path).st_ino else ino

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
        # owner-only (0600), like the checkpoints: created so, and a file created before with wider
        # permissions is narrowed before the entry is written
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "a") as f:
            prefix = "\n" if torn else ""
            ino = os.fstat(f.fileno()).st_ino
            if ino != self._named_ino:  # once per object and file: is this file named in itself?
                named = [e for e in self.entries() if e.get("event") == FILE_EVENT]
                if not named or named[-1].get("ino") != ino:
                    prefix += json.dumps({"event": FILE_EVENT, "ino": ino, "time": time.time()}) + "\n"
                self._named_ino = ino
            f.write(prefix + json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
