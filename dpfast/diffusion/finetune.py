"""Fine-tuning parts: which parameters train (a *trainable selection*), LoRA adapters, and loading
a pre-trained checkpoint (`--init-from`).

Selections (TrainConfig.trainable):
- ``all``: every parameter of the model (LoRA adapters excluded: they exist only to be the selection);
- ``attention``: the attention blocks (GroupNorm, qkv and output projections) and the class
  embedding, DP-LDM's choice (it fine-tunes the attention and conditioning modules);
- ``lora:R`` / ``lora:R+conv``: LoRA adapters of rank R on the attention projections (and, with
  ``+conv``, on every 3x3 / 1x1 convolution of the residual blocks); only the adapters train;
- ``re:REGEX``: the parameters whose name matches REGEX (``re.search``).

Frozen parameters (requires_grad False) cost the engine nothing: it computes per-sample norms and
clipped sums for trainable parameters only, and the privacy argument is plain DP-SGD over the
trainable vector (the frozen ones are public constants: pre-trained on public data, or initial values).

A LoRA adapter is its own module (`LoRAConv2d`: the frozen base convolution plus a down and an up
convolution, the up one zero-initialised so that the adapted model starts equal to the base model).
The engine sees two ordinary Conv2d layers, so their per-sample norms are exact like any other.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .presets import ConfigError

# architecture fields a pre-trained checkpoint must share with the run that fine-tunes it
ARCH_FIELDS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "embedding_type", "class_conditional",
               "sigma_data")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "pretrained"


class LoRAConv2d(nn.Module):
    """base(x) + (alpha / rank) * up(down(x)), base frozen; down has base's kernel, stride and padding."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None):
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                   base.dilation, bias=False)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.lora_down.to(base.weight.device, base.weight.dtype)
        self.lora_up.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_up(self.lora_down(x))


def parse_trainable(spec: str) -> tuple[str, int | None, bool]:
    """'all' | 'attention' | 'lora:R[+conv]' | 're:REGEX' -> (kind, rank, convs); ConfigError otherwise."""
    if spec in ("all", "attention"):
        return spec, None, False
    if spec.startswith("lora:"):
        body = spec[5:]
        convs = body.endswith("+conv")
        body = body[:-5] if convs else body
        if not body.isdigit() or int(body) < 1:
            raise ConfigError(f"--trainable {spec!r}: write lora:R or lora:R+conv with a rank R >= 1")
        return "lora", int(body), convs
    if spec.startswith("re:"):
        try:
            re.compile(spec[3:])
        except re.error as e:
            raise ConfigError(f"--trainable {spec!r}: not a regular expression ({e})") from None
        return "regex", None, False
    raise ConfigError(f"--trainable must be all, attention, lora:R, lora:R+conv or re:REGEX; got {spec!r}")


def add_lora(model: nn.Module, rank: int, convs: bool = False) -> int:
    """Wraps the attention projections (`qkv`, `proj_out` of every AttnBlock) and, with convs, the
    convolutions of every ResnetBlock in LoRAConv2d; returns how many layers got an adapter."""
    from .unet import AttnBlock, ResnetBlock

    targets = []
    for name, module in model.named_modules():
        if isinstance(module, AttnBlock):
            targets += [(module, "qkv"), (module, "proj_out")]
        elif convs and isinstance(module, ResnetBlock):
            targets += [(module, n) for n in ("Conv_0", "Conv_1", "Conv_2") if getattr(module, n) is not None]
    if not targets:
        raise ConfigError("lora: the model has no attention blocks to adapt; use lora:R+conv to adapt its "
                          "convolutions")
    for module, attr in targets:
        setattr(module, attr, LoRAConv2d(getattr(module, attr), rank))
    return len(targets)


def _is_adapter(name: str) -> bool:
    return ".lora_down." in name or ".lora_up." in name or name.startswith(("lora_down.", "lora_up."))


def select_trainable(model: nn.Module, spec: str, apply: bool = True) -> list[str]:
    """Sets requires_grad per `spec` (see the module docstring; apply=False only looks); returns the
    trainable names."""
    from .unet import AttnBlock

    kind, _, _ = parse_trainable(spec)
    if kind == "attention":
        prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AttnBlock))
        prefixes += tuple(f"{n}." for n, m in model.named_modules() if n.endswith("label_embed"))
    chosen = []
    for name, p in model.named_parameters():
        if kind == "all":
            keep = not _is_adapter(name)
        elif kind == "lora":
            keep = _is_adapter(name)
        elif kind == "attention":
            keep = name.startswith(prefixes) and not _is_adapter(name)
        else:
            keep = re.search(spec[3:], name) is not None
        if apply:
            p.requires_grad_(keep)
        if keep:
            chosen.append(name)
    if not chosen:
        raise ConfigError(f"--trainable {spec!r} selects no parameter of this model"
                          + (" (it has no attention blocks or class embedding)" if kind == "attention" else ""))
    return chosen


def base_key(name: str) -> str:
    """A parameter or buffer name of an adapted model -> its name in the model without adapters."""
    return name.replace(".base.", ".")


def resolve_init_from(path: str) -> Path:
    """`builtin:NAME` (a checkpoint shipped in dpfast/pretrained/), a run directory, or a file."""
    if path.startswith("builtin:"):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", path[8:]) or ".." in path:
            raise ConfigError(f"--init-from {path}: a built-in name is letters, digits, '_', '-' and '.'")
        file = BUILTIN_DIR / f"{path[8:]}.pt"
        if not file.exists():
            names = sorted(p.stem for p in BUILTIN_DIR.glob("*.pt"))
            raise ConfigError(f"--init-from {path}: no such built-in checkpoint; built in: {', '.join(names) or 'none'}")
        return file
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise ConfigError(f"--init-from {path}: no model there (give a `dpfast pretrain` run directory, its "
                          "model.pt, or builtin:NAME)")
    return p


def load_pretrained(path: str | os.PathLike) -> dict:
    """The pre-trained checkpoint's state: {"config", "image_shape", "num_classes", "ema", "public_data", ...}."""
    file = resolve_init_from(str(path))
    try:  # tensors, numbers, strings and containers only: a crafted file cannot run code here
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same answer
        raise ConfigError(f"--init-from {path}: {file} is not a dpfast model.pt ({type(e).__name__})") from None
    if "ema" not in state or "config" not in state:
        raise ConfigError(f"--init-from {path}: {file} is not a model.pt of dpfast pretrain / train")
    if state.get("kind", "diffusion") != "diffusion":
        raise ConfigError(f"--init-from {path}: {file} holds a {state['kind']}, not a diffusion model")
    return state


def check_compatible(state: dict, cfg, image_shape, num_classes: int, source: str) -> None:
    """A pre-trained model fine-tunes only into the same architecture: one-line ConfigError otherwise."""
    saved = state["config"]
    diffs = [f"{k} {saved.get(k)!r} (checkpoint) vs {getattr(cfg, k)!r}" for k in ARCH_FIELDS
             if (list(saved.get(k)) if isinstance(saved.get(k), (list, tuple)) else saved.get(k))
             != (list(getattr(cfg, k)) if isinstance(getattr(cfg, k), tuple) else getattr(cfg, k))]
    if tuple(state["image_shape"]) != tuple(image_shape):
        diffs.append(f"image shape {tuple(state['image_shape'])} (checkpoint) vs {tuple(image_shape)}")
    if state.get("num_classes", 0) != num_classes:
        diffs.append(f"classes {state.get('num_classes', 0)} (checkpoint) vs {num_classes}")
    if diffs:
        raise ConfigError(f"--init-from {source}: the checkpoint's architecture differs from this run's ("
                          + "; ".join(diffs) + ")")


def load_base_weights(model: nn.Module, weights: dict, source: str) -> None:
    """Copies a model-without-adapters state dict into `model` (adapters keep their initial values)."""
    own = {k: v for k, v in model.state_dict().items() if not _is_adapter(k)}
    wanted = {base_key(k): k for k in own}
    missing = sorted(set(wanted) - set(weights))
    unexpected = sorted(set(weights) - set(wanted))
    shapes = [k for k in set(wanted) & set(weights) if own[wanted[k]].shape != weights[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"--init-from {source}: parameters do not match (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, other shapes {sorted(shapes)[:3]})")
    with torch.no_grad():
        for k, name in wanted.items():
            own[name].copy_(weights[k])
