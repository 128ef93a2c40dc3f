"""Privacy accounting of DP-SGD: the Poisson-subsampled Gaussian mechanism composed over training phases.

A phase is ``(noise_multiplier, sample_rate, steps)``; a training run is a history of phases that may
differ (a warm-up, stage-wise training, a change of batch size). Adjacency is add/remove-one: datasets
that differ by one record being present or absent, with each record drawn into a batch independently
with probability ``sample_rate`` (Poisson sampling).

- :class:`PRVAccountant` (``prv.py``): tight numerical composition (Gopi, Lee, Wutschitz 2021) built on
  the ``prv-accountant`` package, with a lower bound, an estimate and an upper bound. The default.
- :class:`RDPAccountant` (``rdp.py``): Renyi-DP, an upper bound ~5-10% looser; the cross-check, and
  the fallback where PRV fails numerically.
- :func:`calibrate_noise_multiplier` (``calibrate.py``): the smallest noise multiplier whose upper
  epsilon is at most a target.
- ``cli.py``: ``dpfast epsilon`` and ``dpfast calibrate``.

How the engine uses an accountant: ``step()`` every iteration (O(1): it appends to the history),
``get_epsilon()`` / ``report()`` once per epoch or at checkpoints (not per step: a PRV query is an FFT
over up to millions of points, 0.1-5 s; it caches its discretisation and reuses it while the history
grows, and caches the answer while the history is unchanged), ``state_dict()`` in every checkpoint so
a resumed run never forgets spent privacy.

The base class, the report and the argument checks live here; ``prv.py``, ``rdp.py`` and
``calibrate.py`` import them, and are imported at the bottom of this file. Nothing heavy (scipy,
prv_accountant) is imported until an epsilon is computed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, ClassVar, Iterable

ADJACENCY = "add/remove-one"
STATE_VERSION = 1

Phase = tuple[float, float, int]


def _real(x: Any) -> float | None:
    """float(x) for a real number (python, numpy or 0-d tensor); None for anything else (bool, str, ...)."""
    if isinstance(x, (bool, str, bytes)) or isinstance(x, numbers.Complex) and not isinstance(x, numbers.Real):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def check_noise_multiplier(noise_multiplier: Any) -> float:
    sigma = _real(noise_multiplier)
    if sigma is None or not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier!r}")
    return sigma


def check_sample_rate(sample_rate: Any) -> float:
    q = _real(sample_rate)
    if q is None or not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1] (batch size / dataset size), got {sample_rate!r}")
    return q


def check_steps(steps: Any) -> int:
    try:
        n = None if isinstance(steps, bool) else operator.index(steps)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return n


def check_positive(name: str, value: Any) -> float:
    x = _real(value)
    if x is None or not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return x


def check_delta(delta: Any) -> float:
    d = _real(delta)
    if d is None or not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def check_phase(phase: Any) -> Phase:
    if not isinstance(phase, (tuple, list)) or len(phase) != 3:
        raise ValueError(f"a phase is (noise_multiplier, sample_rate, steps), got {phase!r}")
    return check_noise_multiplier(phase[0]), check_sample_rate(phase[1]), check_steps(phase[2])


@dataclasses.dataclass(frozen=True)
class EpsilonReport:
    """What was spent: epsilon bounds at ``delta`` for the history, and how they were obtained."""

    epsilon: float  # upper bound: the number to publish
    epsilon_lower: float
    epsilon_estimate: float
    delta: float
    accountant: str  # the accountant that produced the numbers ("prv" or "rdp")
    history: tuple[Phase, ...]
    steps: int
    adjacency: str = ADJACENCY
    note: str = ""  # e.g. why PRV fell back to RDP

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["history"] = [list(p) for p in self.history]
        return d

    def __str__(self) -> str:
        phases = ", ".join(f"(sigma={s:g}, q={q:g}, steps={n})" for s, q, n in self.history) or "none"
        text = (
            f"({self.epsilon:.4g}, {self.delta:.3g})-DP under {self.adjacency} adjacency with Poisson sampling, "
            f"{self.accountant} accountant (epsilon in [{self.epsilon_lower:.4g}, {self.epsilon:.4g}], "
            f"estimate {self.epsilon_estimate:.4g}); {self.steps} steps: {phases}"
        )
        return text + (f"; {self.note}" if self.note else "")


class Accountant:
    """History of phases and the epsilon it spends. Subclasses implement ``_compute``.

    ``step()`` is O(1) and is called every training iteration; ``get_epsilon()`` is meant for once per
    epoch (the PRV accountant caches its discretisation; see ``prv.py``).
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._history: list[Phase] = []
        self._steps = 0
        # set by an engine whose releases are no longer covered (a release without noise, a refused batch):
        # get_epsilon and get_privacy_spent then report infinity; loading a state never clears it
        self.lost: str | None = None
        self._results: dict[tuple[tuple[Phase, ...], float], EpsilonReport] = {}

    @staticmethod
    def create(kind: str = "prv", **kwargs: Any) -> "Accountant":
        """``Accountant.create("prv")`` or ``("rdp")``; keyword arguments go to the constructor."""
        from dpfast.accounting.prv import PRVAccountant
        from dpfast.accounting.rdp import RDPAccountant

        kinds = {"prv": PRVAccountant, "rdp": RDPAccountant}
        if kind == "gdp":
            raise ValueError("accountant='gdp' (Opacus' Gaussian-DP accountant) relies on a central-limit "
                             "approximation that can under-state epsilon, so dpfast does not offer it; use 'prv' "
                             "(tight, the default) or 'rdp' (an upper bound)")
        if kind not in kinds:
            raise ValueError(f"unknown accountant {kind!r}; choose one of {sorted(kinds)}")
        return kinds[kind](**kwargs)

    @staticmethod
    def from_state_dict(state: dict) -> "Accountant":
        """Rebuild an accountant of the kind recorded in ``state``."""
        if not isinstance(state, dict) or state.get("kind") not in ("prv", "rdp"):
            raise ValueError("not an accountant state_dict: expected a dict with kind 'prv' or 'rdp'")
        acc = Accountant.create(state["kind"])
        acc.load_state_dict(state)
        return acc

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` iterations at (noise_multiplier, sample_rate); merges with an equal last phase."""
        sigma, q, n = check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate), check_steps(steps)
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + n)
        else:
            self._history.append((sigma, q, n))
        self._steps += n

    def release(self, noise_multiplier: float) -> None:
        """Record one Gaussian mechanism on the whole data set (a one-shot release: DP-MEPF's noisy
        embeddings) whose noise standard deviation is noise_multiplier x its L2 sensitivity. It is the
        phase (noise_multiplier, sample_rate=1, steps=1), composed with every other phase."""
        self.step(noise_multiplier, 1.0, 1)

    @property
    def history(self) -> list[Phase]:
        return list(self._history)

    @classmethod
    def mechanism(cls) -> str:
        """The accountant's kind ("prv" or "rdp"), as Opacus' ``accountant.mechanism()`` names it."""
        return cls.name

    def __len__(self) -> int:
        """The number of phases in the history (Opacus: ``len(accountant)``)."""
        return len(self._history)

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float | None]:
        """Opacus' ``(epsilon, best_alpha)``: the upper bound on epsilon at ``delta``, and the RDP order
        that gives it (None for the PRV accountant, which has no order). ``alphas`` is honoured by the
        RDP accountant only."""
        if alphas is not None:
            raise ValueError(f"alphas= is for the RDP accountant; this one is {self.name!r}")
        return self.get_epsilon(delta), None

    def split_history(self, first_steps: int) -> tuple[list[Phase], list[Phase]]:
        """(the history's first ``first_steps`` releases, the rest): equal phases merge, so the split
        may fall inside one (an engine composed after another: the earlier engine's part and its own)."""
        before, after, left = [], [], int(first_steps)
        for sigma, q, n in self._history:
            take = min(n, left)
            if take:
                before.append((sigma, q, take))
            if n - take:
                after.append((sigma, q, n - take))
            left -= take
        return before, after

    @property
    def steps(self) -> int:
        return self._steps

    def get_epsilon(self, delta: float, eps_error: float | None = None) -> float:
        """Upper bound on epsilon at ``delta`` for the history so far (0.0 for an empty history; infinity
        once the engine lost its guarantee). ``eps_error`` (Opacus' PRV keyword) is accepted: dpfast's
        PRV accountant controls its own error and reports the upper bound."""
        if self.lost is not None:
            return math.inf
        return self.report(delta).epsilon

    def report(self, delta: float) -> EpsilonReport:
        delta = check_delta(delta)
        if self.lost is not None:  # every epsilon bound is infinite once the guarantee is lost
            return EpsilonReport(epsilon=math.inf, epsilon_lower=math.inf, epsilon_estimate=math.inf, delta=delta,
                                 accountant=self.name, history=tuple(self._history), steps=self._steps,
                                 note=f"guarantee lost: {self.lost}")
        history = tuple(self._history)
        key = (history, delta)
        if key not in self._results:
            if not history:
                lower = estimate = upper = 0.0
                used, note = self.name, ""
            else:
                lower, estimate, upper, used, note = self._compute(history, delta)
            # Numerical lower bounds can dip below zero; epsilon is never negative.
            lower, estimate, upper = (max(0.0, float(x)) for x in (lower, estimate, upper))
            report = EpsilonReport(
                epsilon=upper, epsilon_lower=min(lower, upper), epsilon_estimate=min(max(estimate, lower), upper),
                delta=delta, accountant=used, history=history, steps=self._steps, note=note,
            )
            if len(self._results) > 16:
                self._results.clear()
            self._results[key] = report
        return self._results[key]

    def _compute(self, phases: tuple[Phase, ...], delta: float) -> tuple[float, float, float, str, str]:
        """(lower, estimate, upper, accountant used, note) for a non-empty history."""
        raise NotImplementedError

    def _config(self) -> dict:
        return {}

    def _load_config(self, config: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Plain python types (JSON-serialisable): kind, version, history, and the accountant's config."""
        return {
            "kind": self.name,
            "version": STATE_VERSION,
            "adjacency": ADJACENCY,
            "history": [[s, q, n] for s, q, n in self._history],
            "config": self._config(),
            **({"lost": self.lost} if self.lost is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the history (and config) with ``state``; refuses a malformed or mismatching state."""
        if not isinstance(state, dict):
            raise ValueError(f"accountant state_dict must be a dict, got {type(state).__name__}")
        if state.get("kind") != self.name:
            raise ValueError(f"state_dict is for a {state.get('kind')!r} accountant, this is {self.name!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported accountant state_dict version {state.get('version')!r}")
        if state.get("adjacency", ADJACENCY) != ADJACENCY:
            raise ValueError(f"state_dict adjacency {state.get('adjacency')!r} is not {ADJACENCY!r}")
        unknown = set(state) - {"kind", "version", "adjacency", "history", "config", "lost"}
        if unknown:
            raise ValueError(f"unexpected keys in accountant state_dict: {sorted(unknown)}")
        raw = state.get("history")
        if not isinstance(raw, (list, tuple)):
            raise ValueError("state_dict 'history' must be a list of [noise_multiplier, sample_rate, steps]")
        history = [check_phase(p) for p in raw]
        config = state.get("config", {})
        if not isinstance(config, dict):
            raise ValueError("state_dict 'config' must be a dict")
        lost = state.get("lost")
        if lost is not None and not isinstance(lost, str):
            raise ValueError("state_dict 'lost' must be a string (why the guarantee was lost)")
        self._load_config(config)
        self._history = history
        self._steps = sum(n for _, _, n in history)
        self._results.clear()
        if lost is not None:
            self.lost = lost  # a lost guarantee is never restored by loading


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Upper bound on epsilon after ``steps`` steps at (noise_multiplier, sample_rate)."""
    return epsilon_report(((noise_multiplier, sample_rate, steps),), delta, accountant).epsilon


def epsilon_report(phases: Iterable[Phase], delta: float, accountant: str = "prv") -> EpsilonReport:
    """Report for a composition of phases, from a fresh accountant."""
    acc = Accountant.create(accountant)
    for phase in phases:
        acc.step(*check_phase(phase))
    return acc.report(delta)


from dpfast.accounting.rdp import RDPAccountant  # noqa: E402  (subclasses need the base above)
from dpfast.accounting.prv import PRVAccountant  # noqa: E402
from dpfast.accounting.calibrate import Calibration, calibrate_noise_multiplier  # noqa: E402

__all__ = [
    "ADJACENCY",
    "Calibration",
    "Accountant",
    "EpsilonReport",
    "PRVAccountant",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "epsilon_report",
]
