"""``dpfast epsilon`` and ``dpfast calibrate``: what a run spends, and the noise for a target.

    dpfast epsilon --noise-multiplier 1.5 --sample-rate 0.04 --steps 2250 --delta 1e-5
    dpfast calibrate --target-epsilon 1 --delta 1e-5 --sample-rate 0.0683 --epochs 300 [--json]

``add_commands(subparsers)`` registers both on the ``dpfast`` command's subparsers (each sets
``func``, which returns the exit code); ``main()`` runs them standalone
(``python -m dpfast.accounting.cli``). Invalid input exits with code 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from dpfast.accounting import ADJACENCY, epsilon_report
from dpfast.accounting.calibrate import calibrate

_ACCOUNTANT_HELP = "prv: tight numerical accountant (default); rdp: Renyi-DP, a looser upper bound"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delta", type=float, required=True,
                        help="target delta, in (0, 1); typically below 1 / dataset size")
    parser.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                        help="Poisson sampling rate: expected batch size / dataset size, in (0, 1]")
    parser.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help=_ACCOUNTANT_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_commands(subparsers) -> None:
    """Register ``epsilon`` and ``calibrate`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "epsilon", help="epsilon spent by DP-SGD steps (Poisson-subsampled Gaussian)",
        description="Upper bound on epsilon after --steps steps of DP-SGD at --noise-multiplier and --sample-rate, "
                    f"under {ADJACENCY} adjacency.",
    )
    p.add_argument("--noise-multiplier", type=_positive_float, required=True, metavar="SIGMA",
                   help="noise standard deviation / clipping norm")
    p.add_argument("--steps", type=_positive_int, required=True, help="number of DP-SGD steps")
    _add_common(p)
    p.set_defaults(func=run_epsilon)

    p = subparsers.add_parser(
        "calibrate", help="smallest noise multiplier for a target epsilon",
        description="Smallest noise multiplier whose upper bound on epsilon is at most --target-epsilon, "
                    f"under {ADJACENCY} adjacency.",
    )
    p.add_argument("--target-epsilon", type=_positive_float, required=True, metavar="EPS")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=_positive_int, help="number of DP-SGD steps")
    length.add_argument("--epochs", type=_positive_float, help="epochs; steps = ceil(epochs / sample rate)")
    _add_common(p)
    p.set_defaults(func=run_calibrate)


def _fail(command: str, message: str) -> int:
    print(f"dpfast {command}: error: {message}", file=sys.stderr)
    return 2


def run_epsilon(args: argparse.Namespace) -> int:
    try:
        report = epsilon_report([(args.noise_multiplier, args.sample_rate, args.steps)], args.delta, args.accountant)
    except ValueError as exc:
        return _fail("epsilon", str(exc))
    if args.json:
        print(json.dumps({"command": "epsilon", "noise_multiplier": args.noise_multiplier,
                          "sample_rate": args.sample_rate, "requested_accountant": args.accountant,
                          **report.to_dict()}))
        return 0
    print(f"epsilon    = {report.epsilon:.6g}  (upper bound; lower {report.epsilon_lower:.6g}, "
          f"estimate {report.epsilon_estimate:.6g})")
    print(f"delta      = {report.delta:g}")
    print(f"adjacency  = {report.adjacency} (Poisson sampling at rate {args.sample_rate:g})")
    print(f"accountant = {report.accountant}" + (f"  ({report.note})" if report.note else ""))
    print(f"mechanism  = noise multiplier {args.noise_multiplier:g}, {args.steps} steps")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    try:
        result = calibrate(args.target_epsilon, args.delta, args.sample_rate, steps=args.steps, epochs=args.epochs,
                           accountant=args.accountant)
    except ValueError as exc:
        return _fail("calibrate", str(exc))
    report = result.report
    if args.json:
        print(json.dumps({"command": "calibrate", "sample_rate": args.sample_rate, "epochs": args.epochs,
                          "requested_accountant": args.accountant, **result.to_dict()}))
        return 0
    print(f"noise_multiplier = {result.noise_multiplier:.6g}")
    print(f"epsilon          = {report.epsilon:.6g}  (upper bound, target {args.target_epsilon:g}; "
          f"lower {report.epsilon_lower:.6g})")
    print(f"delta            = {report.delta:g}")
    print(f"adjacency        = {report.adjacency} (Poisson sampling at rate {args.sample_rate:g})")
    print(f"accountant       = {report.accountant}" + (f"  ({report.note})" if report.note else ""))
    print(f"steps            = {result.steps}" + (f" ({args.epochs:g} epochs)" if args.epochs is not None else "")
          + f"; found in {result.seconds:.1f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dpfast", description="Privacy accounting for DP-SGD.")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
