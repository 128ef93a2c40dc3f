"""The ``dpfast`` command: ``epsilon``, ``calibrate``, ``train``, ``sample``, ``evaluate``, ``bench``."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it provides): each registers its subcommands with add_commands(subparsers)
_COMMAND_MODULES = [
    ("dpfast.accounting.cli", "epsilon, calibrate"),
    ("dpfast.diffusion.cli", "train, sample, evaluate"),
    ("dpfast._bench:cli", "bench"),
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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"dpfast: {args._unavailable}", file=sys.stderr)
        return 2
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    ret = func(args)
    return int(ret or 0)


if __name__ == "__main__":
    sys.exit(main())
