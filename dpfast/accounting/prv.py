"""PRV accounting (Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy").

Built from pieces of ``prv-accountant`` 0.2.0 (its ``Domain`` and its epsilon search with error terms,
``DiscretePrivacyRandomVariable.compute_epsilon``) rather than its ``PRVAccountant``, whose traps are:

- **"Discrete mean differs from continuous mean significantly"** at large epsilon (small sigma, large
  q). The paper's error bound couples each PRV with its discretisation so that both have the same
  mean and differ by less than the mesh; the package shifts the grid by (continuous - discrete mean)
  and refuses a shift >= mesh/2. Its continuous mean comes from ``quad`` over breakpoints fixed near
  0, which misses a PRV whose mass lies far from 0, so it refuses good discretisations (issue #36;
  the fix, PR #38, was merged but never released). We compute the same truncated mean (integration
  by parts, ``t_max - int G``) with breakpoints at the distribution's own quantiles, require quad's
  error estimate to be below mesh/100, and apply the *same* mesh/2 check: the coupling, and so the
  bound, is the paper's. If a check still fails, or the package's epsilon search refuses, we fall
  back to RDP with a warning.
- **eps_max** is never used (it lets the package assume epsilon < eps_max and under-report): the
  domain half-width comes from the paper's Remark 5.6, RDP tail bounds at delta_error / 4 for the
  composition and delta_error / (8 T) per step, as the package computes it when eps_max is None.
- **eps_error scales with epsilon** (``eps_error_rel``, 0.5%; not below 1e-4) and ``delta_error =
  delta / 1000``. epsilon is not known in advance, so a coarse pass (5% of the RDP epsilon) sizes it.
- **Cost.** The mesh is ``eps_error / sqrt(T / 2 * log(12 / delta_error))`` (Theorem 5.5): 100k steps
  at a small epsilon is millions of long-double points. We evaluate the PRV's cdf only on its
  support, pick an FFT-friendly grid size (a prime-sized long-double FFT is ~10x slower), and
  compose all phases with one inverse FFT. The discretisation is cached while the history grows
  (capacity doubles when exceeded), so a per-epoch query costs one FFT power, not a rebuild.
- **Lower bounds** can come out slightly negative: the base class clamps them to 0.

The PRV is the package's Poisson-subsampled Gaussian: the privacy loss of ``(1 - q) N(0, s^2) +
q N(1, s^2)`` against ``N(0, s^2)``, i.e. the record removed, as in the PRV paper and Opacus. We
evaluate its cdf ourselves, equal to the package's to 1 ulp, plus the survival function for the
right tail (the package's ``1 - cdf`` is only accurate to 1e-16 absolutely, where delta sums it).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from typing import Mapping

import numpy as np

# prv_accountant and scipy load on first use: `import dpfast` stays free of them (tests/test_lean_import.py);
# prv_accountant alone pulls in scipy.signal, ~2 s.

from dpfast.accounting import Accountant, Phase
from dpfast.accounting.rdp import rdp_epsilon

Mechanism = tuple[float, float]  # (noise_multiplier, sample_rate)

DEFAULT_EPS_ERROR_REL = 0.005
DEFAULT_MAX_DOMAIN_POINTS = 1 << 23  # ~8M long doubles: ~130 MB per array, ~1 GB peak
_COARSE_EPS_ERROR_REL = 0.05
_MIN_EPS_ERROR = 1e-4  # below epsilon 0.02, 0.5% is finer than anyone reads, and costs millions of points
_MAX_HALF_WIDTH = 5000.0  # exp(t) overflows long double past t ~ 11356; epsilon this large is no privacy
_CDF_CHUNK = 1 << 20
_SUPPORT_STRIDE = 256


class PRVNumericalError(ArithmeticError):
    """The PRV computation cannot certify its bound here (callers fall back to RDP)."""


# ---------------------------------------------------------------------------------------------
# One mechanism: truncated, discretised PRV with the corrected mean


def _loss_to_z(t, q):
    """z = log((e^t - (1 - q)) / q): the privacy loss t as the Gaussian's log-likelihood ratio z."""
    if q == 1.0:
        return t
    log_q = math.log(q)
    if t < 30.0:
        s = math.expm1(t) + q
        return math.log(s) - log_q if s > 0.0 else -math.inf
    return t + math.log1p(-(1.0 - q) * math.exp(-t)) - log_q


def _cdf_scalar(t: float, sigma: float, q: float) -> float:
    """P(Y <= t) for the Poisson-subsampled Gaussian PRV, in float64 (for the mean integral).

    Y = log((1 - q) + q exp((2X - 1) / (2 sigma^2))), X ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2):
    Y <= t iff X <= sigma^2 z + 1/2. The package's ``cdf`` is the same function (checked in tests).
    """
    from scipy.special import ndtr

    if q < 1.0 and t <= math.log1p(-q):
        return 0.0
    z = _loss_to_z(t, q)
    if z == -math.inf:
        return 0.0
    x = sigma * sigma * z + 0.5
    return (1.0 - q) * float(ndtr(x / sigma)) + q * float(ndtr((x - 1.0) / sigma))


def _cdf_sf(t: np.ndarray, sigma: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(Y <= t), P(Y > t)) on a long-double grid t: (n,) each.

    The package evaluates only the cdf, so its right tail is 1 - cdf, accurate to ~1e-16 *absolutely*;
    the survival function from erfc keeps the tail accurate *relatively*, which is what delta(epsilon)
    sums. The erfc itself is float64, as in the package.
    """
    from scipy.special import erfc

    ld = np.longdouble
    cdf = np.zeros(t.shape, dtype=ld)
    sf = np.ones(t.shape, dtype=ld)
    if q == 1.0:
        inside = np.ones(t.shape, dtype=bool)
        z = t
    else:
        inside = t > ld(math.log1p(-q))
        ti = t[inside]
        with np.errstate(over="ignore", divide="ignore"):
            small = ti < 30
            # e^t - (1 - q) without cancellation near t = 0, and without overflow for large t; at the
            # support's edge rounding can make it <= 0, i.e. z = -inf (cdf 0), never NaN.
            near = np.maximum(np.expm1(np.minimum(ti, 30)) + ld(q), 0)
            far = ti + np.log1p(-ld(1 - q) * np.exp(-np.maximum(ti, 30)))
            z = np.where(small, np.log(near), far) - np.log(ld(q))
    root2_sigma = ld(math.sqrt(2.0)) * ld(sigma)
    x = ld(sigma) ** 2 * z + ld(0.5)  # threshold on the Gaussian draw
    a0 = (x / root2_sigma).astype(np.float64)  # component N(0, sigma^2)
    a1 = ((x - 1) / root2_sigma).astype(np.float64)  # component N(1, sigma^2)
    cdf[inside] = ld(1 - q) / 2 * erfc(-a0) + ld(q) / 2 * erfc(-a1)
    sf[inside] = ld(1 - q) / 2 * erfc(a0) + ld(q) / 2 * erfc(a1)
    return cdf, sf


def _truncated_mean(
    sigma: float, q: float, t_min: float, t_max: float, breakpoints: np.ndarray
) -> tuple[float, float]:
    """(mean, error bound) of the PRV truncated to [t_min, t_max]: t_max - int G, G its (truncated) cdf.

    ``breakpoints`` sit at the distribution's quantiles, so quad cannot miss the mass wherever it lies
    (the package's fixed breakpoints near 0 do, at large epsilon).
    """
    from scipy import integrate

    c0, c1 = _cdf_scalar(t_min, sigma, q), _cdf_scalar(t_max, sigma, q)
    points = np.concatenate([breakpoints, np.linspace(t_min, t_max, 65), [0.0]])
    if q < 1.0 and t_min < math.log1p(-q) < t_max:
        points = np.append(points, math.log1p(-q))  # the PRV's support starts here
    points = np.unique(np.clip(points, t_min, t_max))
    total, error = 0.0, 0.0
    for a, b in zip(points[:-1], points[1:]):
        value, err = integrate.quad(_cdf_scalar, a, b, args=(sigma, q), epsabs=1e-13, epsrel=1e-13,
                                    limit=200)
        total += value
        error += err
    mass = c1 - c0
    return t_max - (total - c0 * (t_max - t_min)) / mass, error / mass


def _domain(half_width: float, mesh: float) -> "Domain":
    """Grid of mesh ``mesh`` covering [-half_width, half_width], with an FFT-friendly even size.

    Zero sits at index size/2 - 1, the layout ``Domain.create_aligned`` gives and the composition's
    index arithmetic (``Discretisation.compose``) assumes.
    """
    from prv_accountant.domain import Domain
    from scipy.fft import next_fast_len

    half = next_fast_len(int(math.ceil(half_width / mesh)) + 1, real=True)
    return Domain(-(half - 1) * mesh, half * mesh, 2 * half)


def _discretise(sigma: float, q: float, domain: Domain) -> tuple[np.ndarray, float]:
    """Cell-centred pmf of the PRV truncated to the domain, and the grid shift that preserves its mean.

    As the package's ``CellCentred`` discretiser: pmf (size,) long double, mass of [t - dt/2, t + dt/2]
    at each node t (half cells at the ends), normalised; shift = continuous mean - discrete mean, which
    must be below dt/2 for the paper's coupling.
    """
    size, dt = len(domain), domain.dt()
    t_min, t_max = domain.t_min(), domain.t_max()
    edges = np.linspace(t_min - dt / 2, t_max + dt / 2, size + 1, dtype=np.longdouble)
    np.clip(edges, t_min, t_max, out=edges)
    # A step's loss often occupies a sliver of a domain sized for the whole composition. Left of the
    # support (where float64 erfc underflows) the cdf is exactly 0, right of it the sf is exactly 0;
    # both are monotone, so a coarse pass finds the support and only it is evaluated.
    coarse = np.arange(0, size + 1, _SUPPORT_STRIDE)
    coarse_cdf, coarse_sf = _cdf_sf(edges[coarse], sigma, q)
    leading = int(np.searchsorted(coarse_cdf, 0.0, side="right"))  # coarse points with cdf == 0
    trailing = int(np.searchsorted(coarse_sf[::-1], 0.0, side="right"))  # ... with sf == 0
    first = coarse[leading - 1] if leading else 0
    last = coarse[len(coarse) - trailing] + 1 if trailing else size + 1
    cdf = np.empty(size + 1, dtype=np.longdouble)
    sf = np.empty(size + 1, dtype=np.longdouble)
    cdf[:first], sf[:first] = 0, 1
    cdf[last:], sf[last:] = 1, 0
    for start in range(first, last, _CDF_CHUNK):
        stop = min(start + _CDF_CHUNK, last)
        cdf[start:stop], sf[start:stop] = _cdf_sf(edges[start:stop], sigma, q)
    # Cells left of the median from the cdf, right of it from the survival function.
    split = int(np.searchsorted(cdf, 0.5))
    pmf = np.empty(size, dtype=np.longdouble)
    pmf[:split] = np.diff(cdf[:split + 1])
    pmf[split:] = -np.diff(sf[split:])
    mass = pmf.sum()
    if not (np.isfinite(mass) and mass > 0.5):
        raise PRVNumericalError(f"truncated PRV has mass {float(mass)} on the domain")
    pmf /= mass

    levels = 10.0 ** -np.arange(15.0, 0.0, -1.0)
    lower = np.searchsorted(cdf - cdf[0], levels * float(mass))
    upper = size - np.searchsorted((sf - sf[-1])[::-1], levels * float(mass))
    quantiles = np.searchsorted(cdf, np.linspace(0.05, 0.95, 19))
    idx = np.clip(np.concatenate([lower, upper, quantiles]), 0, size)
    breakpoints = edges[idx].astype(np.float64)
    mean_continuous, mean_error = _truncated_mean(sigma, q, float(t_min), float(t_max), breakpoints)
    if not mean_error < dt / 100:
        raise PRVNumericalError(f"PRV mean integral error {mean_error:.2e} exceeds mesh/100 = {dt / 100:.2e}")
    shift = mean_continuous - float(np.dot(domain.ts(), pmf))
    if not abs(shift) < dt / 2:
        raise PRVNumericalError(f"discrete and continuous means differ by {shift:.3g} >= mesh/2 = {dt / 2:.3g}")
    return pmf, shift


def _power(spectrum: np.ndarray, n: int) -> np.ndarray:
    """spectrum ** n by repeated squaring (twice as fast as numpy's complex long-double power)."""
    result, base = None, spectrum
    while n:
        if n & 1:
            result = base.copy() if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return result


# ---------------------------------------------------------------------------------------------
# A discretisation of several mechanisms on one domain, composable for any counts up to capacity


def domain_half_width(capacity: Mapping[Mechanism, int], eps_error: float, delta_error: float) -> float:
    """Remark 5.6 of the PRV paper: RDP tail bounds for the composition and for each single step."""
    total = sum(capacity.values())
    phases = [(s, q, n) for (s, q), n in capacity.items()]
    half_width, _ = rdp_epsilon(phases, delta_error / 4)
    for sigma, q in capacity:
        eps_one, _ = rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total))
        half_width = max(half_width, eps_one)
    return max(half_width, eps_error) + 3.0


def mesh_size(total_steps: int, eps_error: float, delta_error: float) -> float:
    """Theorem 5.5 of the PRV paper: the mesh for which the error in epsilon is at most eps_error."""
    return eps_error / math.sqrt(total_steps / 2 * math.log(12 / delta_error))


@dataclasses.dataclass
class Discretisation:
    """Discretised PRVs of mechanisms on a shared domain, valid for counts up to ``capacity``."""

    capacity: dict[Mechanism, int]
    eps_error: float
    delta_error: float
    domain: Domain
    spectra: dict[Mechanism, np.ndarray]  # rfft of each pmf: (size // 2 + 1,) complex long double
    shifts: dict[Mechanism, float]

    @classmethod
    def build(
        cls, capacity: Mapping[Mechanism, int], eps_error: float, delta_error: float,
        max_points: int = DEFAULT_MAX_DOMAIN_POINTS,
    ) -> "Discretisation":
        capacity = dict(capacity)
        half_width = domain_half_width(capacity, eps_error, delta_error)
        mesh = mesh_size(sum(capacity.values()), eps_error, delta_error)
        if 2 * half_width / mesh > max_points:
            loosened = eps_error * (2 * half_width / mesh) / max_points
            warnings.warn(
                f"PRV accountant: eps_error {eps_error:.3g} needs {2 * half_width / mesh:.3g} grid points, more "
                f"than max_domain_points={max_points}; using eps_error {loosened:.3g} (the bound stays valid, "
                f"but is looser)", RuntimeWarning, stacklevel=3,
            )
            eps_error = loosened
            half_width = domain_half_width(capacity, eps_error, delta_error)
            mesh = mesh_size(sum(capacity.values()), eps_error, delta_error)
        if half_width > _MAX_HALF_WIDTH:
            raise PRVNumericalError(f"domain half-width {half_width:.3g} (epsilon in the thousands) is out of range")
        from scipy.fft import rfft

        domain = _domain(half_width, mesh)
        spectra, shifts = {}, {}
        for sigma, q in capacity:
            pmf, shifts[sigma, q] = _discretise(sigma, q, domain)
            spectra[sigma, q] = rfft(pmf)
        return cls(capacity, eps_error, delta_error, domain, spectra, shifts)

    def covers(self, counts: Mapping[Mechanism, int], delta_error: float) -> bool:
        return delta_error == self.delta_error and all(self.capacity.get(m, 0) >= n for m, n in counts.items())

    def compose(self, counts: Mapping[Mechanism, int]) -> "DiscretePrivacyRandomVariable":
        """PRV of the composition: one inverse FFT of the product of the mechanisms' spectra.

        The product is a circular convolution; the domain is wide enough (Remark 5.6) that the composed
        mass wraps around only within the delta_error budget, as in the package's Fourier composer.
        A sum of n variables with grid indices i_k has index sum(i_k) - (n - 1) * z, z the zero index.
        """
        from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
        from scipy.fft import irfft

        size = len(self.domain)
        spectrum = np.ones(size // 2 + 1, dtype=self.spectra[next(iter(self.spectra))].dtype)
        total, shift = 0, 0.0
        for mechanism, n in counts.items():
            spectrum *= _power(self.spectra[mechanism], n)
            total += n
            shift += n * self.shifts[mechanism]
        pmf = irfft(spectrum, n=size)
        zero = size // 2 - 1
        pmf = np.roll(pmf, (-(total - 1) * zero) % size)
        return DiscretePrivacyRandomVariable(pmf, self.domain.shift_right(shift))

    def epsilon(self, counts: Mapping[Mechanism, int], delta: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon at delta for the composition with these counts."""
        if not self.covers(counts, self.delta_error):
            raise ValueError("counts exceed the discretisation's capacity")
        try:
            # Under/overflow in far tails is expected; a result that depends on it is non-finite, refused below.
            with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
                composed = self.compose(counts)
                lower, estimate, upper = composed.compute_epsilon(delta, self.delta_error, self.eps_error)
        except (ValueError, RuntimeError) as exc:  # "Floating point errors will dominate", "Cannot compute epsilon"
            raise PRVNumericalError(str(exc)) from exc
        if not all(math.isfinite(x) for x in (lower, estimate, upper)):
            raise PRVNumericalError(f"non-finite epsilon bounds {(lower, estimate, upper)}")
        return lower, estimate, upper


def mechanism_counts(phases) -> dict[Mechanism, int]:
    """Steps per distinct (noise_multiplier, sample_rate): composition does not depend on order."""
    counts: Counter = Counter()
    for sigma, q, n in phases:
        counts[float(sigma), float(q)] += int(n)
    return dict(counts)


def prv_epsilon(
    phases, delta: float, eps_error: float, max_points: int = DEFAULT_MAX_DOMAIN_POINTS
) -> tuple[float, float, float, float]:
    """(lower, estimate, upper, eps_error used) for a composition, from a one-off discretisation."""
    counts = mechanism_counts(phases)
    disc = Discretisation.build(counts, eps_error, delta / 1000, max_points)
    return (*disc.epsilon(counts, delta), disc.eps_error)


# ---------------------------------------------------------------------------------------------


class PRVAccountant(Accountant):
    """Tight accountant (PRV) over a history of phases, falling back to RDP where PRV fails numerically.

    Args:
        eps_error_rel: error allowed in epsilon, relative to epsilon (0.005: the upper bound is about
            0.5% above the lower one).
        max_domain_points: cap on the grid; past it eps_error is loosened (with a warning).

    Per-epoch use: the first ``get_epsilon(delta)`` discretises for the current history; later calls
    compose on the same discretisation (one FFT power) until the history outgrows its capacity, when
    it is rebuilt with twice the steps of the running phase. Memory is ~50 bytes per grid point per
    distinct (noise_multiplier, sample_rate).
    """

    name = "prv"

    def __init__(
        self, eps_error_rel: float = DEFAULT_EPS_ERROR_REL, max_domain_points: int = DEFAULT_MAX_DOMAIN_POINTS
    ) -> None:
        super().__init__()
        self._set_config(eps_error_rel, max_domain_points)
        self._discretisations: dict[float, Discretisation] = {}

    def _set_config(self, eps_error_rel: float, max_domain_points: int) -> None:
        if not 0 < eps_error_rel < 1:
            raise ValueError(f"eps_error_rel must be in (0, 1), got {eps_error_rel!r}")
        if not (isinstance(max_domain_points, int) and max_domain_points >= 1 << 12):
            raise ValueError(f"max_domain_points must be an integer >= 4096, got {max_domain_points!r}")
        self.eps_error_rel = float(eps_error_rel)
        self.max_domain_points = max_domain_points

    def _compute(self, phases: tuple[Phase, ...], delta: float) -> tuple[float, float, float, str, str]:
        counts = mechanism_counts(phases)
        try:
            disc = self._discretisation(counts, phases[-1][:2], delta)
            lower, estimate, upper = disc.epsilon(counts, delta)
        except PRVNumericalError as exc:
            warnings.warn(f"PRV accountant failed numerically ({exc}); falling back to RDP", RuntimeWarning,
                          stacklevel=3)
            eps, _ = rdp_epsilon(phases, delta)
            return 0.0, eps, eps, "rdp", f"RDP fallback: PRV failed numerically ({exc})"
        note = f"eps_error {disc.eps_error:.3g}, delta_error {disc.delta_error:.3g}"
        return lower, estimate, upper, self.name, note

    def _discretisation(self, counts: dict[Mechanism, int], running: Mechanism, delta: float) -> Discretisation:
        delta_error = delta / 1000
        disc = self._discretisations.get(delta)
        if disc is not None and disc.covers(counts, delta_error):
            return disc
        # A first query is sized exactly; once the history has outgrown a discretisation, the running
        # phase gets room to double so that per-epoch queries rebuild O(log steps) times.
        capacity = dict(counts)
        if disc is not None:
            capacity[running] = 2 * counts[running]
        eps_error = max(self.eps_error_rel * self._epsilon_guess(counts, delta), _MIN_EPS_ERROR)
        disc = Discretisation.build(capacity, eps_error, delta_error, self.max_domain_points)
        if len(self._discretisations) >= 2:
            self._discretisations.clear()
        self._discretisations[delta] = disc
        return disc

    def _epsilon_guess(self, counts: dict[Mechanism, int], delta: float) -> float:
        """A lower estimate of epsilon, to size eps_error: a coarse PRV pass (error 5% of RDP epsilon)."""
        eps_rdp, _ = rdp_epsilon([(s, q, n) for (s, q), n in counts.items()], delta)
        if eps_rdp <= 0:
            return 0.0
        coarse_error = max(_COARSE_EPS_ERROR_REL * eps_rdp, _MIN_EPS_ERROR)
        coarse = Discretisation.build(counts, coarse_error, delta / 1000, self.max_domain_points)
        lower, estimate, _ = coarse.epsilon(counts, delta)
        return max(lower, 0.5 * estimate, 0.0)

    def _config(self) -> dict:
        return {"eps_error_rel": self.eps_error_rel, "max_domain_points": self.max_domain_points}

    def _load_config(self, config: dict) -> None:
        unknown = set(config) - {"eps_error_rel", "max_domain_points"}
        if unknown:
            raise ValueError(f"unexpected keys in PRV accountant config: {sorted(unknown)}")
        self._set_config(config.get("eps_error_rel", self.eps_error_rel),
                         config.get("max_domain_points", self.max_domain_points))
        self._discretisations.clear()
