"""``python -m benchmarks [options]``: the same command as ``dpfast bench``."""
from .cli import main

raise SystemExit(main())
