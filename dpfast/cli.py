"""The ``dpfast`` command: ``epsilon``, ``calibrate``, ``train``, ``pretrain``, ``sample``, ``syngen-threshold``,
``evaluate``, ``bench``, ``audit``, ``check-kernels``."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it provides): each registers its subcommands with add_commands(subparsers)
_COMMAND_MODULES = [
    ("dpfast.accounting.cli", "epsilon, calibrate"),
    ("dpfast.diffusion.cli", "train, pretrain, sample, syngen-threshold, evaluate"),
    ("dpfast._bench:cli", "bench"),
    ("dpfast.audit", "audit"),
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dpfast", description="Fast, exact DP-SGD for diffusion models.")
    parser.add_argument("--version", action="version", version=f"dpfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name, provides in _COMMAND_MODULES:
        try:
            if mod_name == "dpfast._bench:cli":
                from ._bench import load_benchmarks

                mod = importlib.import_module(load_benchmarks().__name__ + ".cli")
            else:
                mod = importlib.import_module(mod_name)
        except ImportError as e:
            p = sub.add_parser(provides.split(",")[0], help=f"(unavailable: {e})")
            p.set_defaults(_unavailable=f"{provides} unavailable: {e}")
            continue
        mod.add_commands(sub)
    # listed for --help; main() hands its arguments to the tool's own parser
    sub.add_parser("check-kernels",
                   help="compile the Triton norm kernels for a GPU architecture (no GPU needed)")
    return parser


def _check_kernels(argv) -> int:
    """`python -m dpfast.kernels.compile_check`, with its own options (`dpfast check-kernels -h`).
    Imported only when run: Triton is heavy and optional."""
    from ._kernels import load_kernels

    kernels = load_kernels()
    if kernels is None or not kernels.HAS_TRITON:
        print("dpfast check-kernels: needs Triton (`pip install triton`)", file=sys.stderr)
        return 2
    mod = importlib.import_module(kernels.__name__ + ".compile_check")
    return mod.main(argv, prog="dpfast check-kernels")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check-kernels"]:
        return _check_kernels(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"dpfast: {args._unavailable}", file=sys.stderr)
        return 2
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        ret = func(args)
    except BrokenPipeError:  # `dpfast ... | head -1`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(ret or 0)


if __name__ == "__main__":
    sys.exit(main())
