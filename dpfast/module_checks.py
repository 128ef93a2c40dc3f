"""Structural checks run by make_private on every module before any privacy is spent.

A rule computes per-sample gradients of one layer type's *standard* maths. Each check below refuses a
module whose real computation (or state) differs from what its rule assumes, with the reason and the
fix, instead of clipping the wrong gradient:

* sequence-first transformer layers: their inner Linear/LayerNorm see (L, N, E), positions in dim 0;
* reparametrised weights (weight_norm, spectral_norm, torch.nn.utils.parametrize): the rule would
  target the temporary ``module.weight`` and the real parameters would get noise only;
* subclasses that override a method the layer's forward calls (a weight-standardised conv overriding
  ``_conv_forward``): the rule would compute a plain layer;
* layers that keep data-dependent running statistics (InstanceNorm with track_running_stats): the
  buffers would be released as they are, unclipped and unnoised.
"""
from __future__ import annotations

import inspect

from torch import nn
from torch.nn.utils import parametrize

from .errors import UnsupportedModuleError

# what nn.Module.__call__ and every supported layer's forward reach on the module itself; a subclass (or
# a mixin, or the instance) that redefines one of these computes something its rule does not
_CALL_PATH = ("forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__", "__getattribute__")
_FORWARD_REACHES = {nn.Conv1d: ("_conv_forward",), nn.Conv2d: ("_conv_forward",), nn.Conv3d: ("_conv_forward",),
                    nn.ConvTranspose1d: ("_output_padding",), nn.ConvTranspose2d: ("_output_padding",),
                    nn.MultiheadAttention: ("merge_masks",)}
_SEQUENCE_FIRST = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_RUNNING_STATS = (nn.modules.instancenorm._InstanceNorm,)


def refuse_unsupported(module: nn.Module, label: str, rule) -> None:
    """Raise UnsupportedModuleError if ``module`` (matched to ``rule``, or None) cannot be made private."""
    if isinstance(module, _SEQUENCE_FIRST) and not module.self_attn.batch_first and _trainable(module):
        raise UnsupportedModuleError(
            f"module {label!r} ({type(module).__name__}) is sequence-first (batch_first=False): its Linear and "
            "LayerNorm layers see (L, N, E) inputs, so dpfast would clip per position instead of per sample. "
            "Construct it with batch_first=True and feed (N, L, E)")
    if isinstance(module, _RUNNING_STATS) and module.track_running_stats:
        raise UnsupportedModuleError(
            f"module {label!r} ({type(module).__name__}) keeps running statistics of the private data "
            "(track_running_stats=True), which would be released without clipping or noise; construct it "
            "with track_running_stats=False, or call dpfast.fix_module(model)")
    if rule is None:
        return
    scope = list(module.modules()) if rule.composite else [module]
    for m in scope:
        _refuse_reparametrised(m, label)
    _refuse_overrides(module, label, rule)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _refuse_reparametrised(module: nn.Module, label: str) -> None:
    hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()
             if type(h).__name__ in ("WeightNorm", "SpectralNorm")]
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    unknown = [n for n in own if n.endswith(("_g", "_v", "_orig"))]
    if parametrize.is_parametrized(module) or hooks or unknown:
        how = ", ".join(hooks) or ("torch.nn.utils.parametrize" if parametrize.is_parametrized(module)
                                   else f"parameters {unknown}")
        raise UnsupportedModuleError(
            f"module {label!r} ({type(module).__name__}) has a reparametrised weight ({how}): "
            "its rule would clip the gradient of the computed weight, and the real parameters "
            "(weight_g/weight_v, weight_orig, parametrizations.*.original) would get noise only. Remove the "
            "reparametrisation (torch.nn.utils.remove_weight_norm / parametrize.remove_parametrizations) "
            "or freeze the layer")


def _refuse_overrides(module: nn.Module, label: str, rule) -> None:
    """A subclass of the rule's layer type may add a constructor or other methods, never replace one
    that the forward reaches (in the class, a mixin before it in the MRO, or on the instance)."""
    base = next(t for t in rule.types if isinstance(module, t) and type(module).forward is t.forward)
    names = set(_CALL_PATH) | set(_FORWARD_REACHES.get(base, ()))
    overridden = sorted(n for n in names if n in vars(module))  # set on the instance (hooks, patches)
    for cls in type(module).__mro__:
        if cls is base:
            break
        overridden += [n for n in names & set(vars(cls))
                       if vars(cls)[n] is not inspect.getattr_static(base, n, None)]
    if overridden:
        raise UnsupportedModuleError(
            f"module {label!r} ({type(module).__name__}) is an nn.{base.__name__} whose {sorted(set(overridden))} "
            f"is redefined (on its instance, class or a mixin), and nn.{base.__name__}.forward relies on it: the nn.{base.__name__} rule "
            "would compute a plain layer, not this one. Write the layer's maths from supported layers, remove the "
            "patch or hook that replaces it, or freeze the layer")
