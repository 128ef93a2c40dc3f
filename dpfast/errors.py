"""Errors dpfast raises. Each says what went wrong and what to do about it."""


class DPError(RuntimeError):
    """Base class of dpfast's errors."""


class UnsupportedModuleError(DPError, TypeError):
    """A trainable module has no per-sample gradient rule (or is used in a way the rule cannot handle)."""


class NonFiniteGradientError(DPError, FloatingPointError):
    """A sample's gradient norm is NaN or infinite; the step was refused and nothing was applied."""


class PrivacyLeakError(DPError):
    """A trainable parameter received a gradient that did not go through per-sample clipping."""


class BatchLayoutError(DPError, ValueError):
    """The rows of the batch do not match the samples (multiplicity, batch size or layout)."""


class RankStateMismatchError(DPError):
    """Ranks of a distributed run hold different seeds, noise keys or sampler steps (a checkpoint loaded
    on some ranks only); nothing was released, and the mismatch does not depend on the data."""
