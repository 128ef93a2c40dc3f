"""dpfast benchmark harness: DP engines side by side on diffusion models.

    dpfast bench --models small,ddpm --batch-sizes 64,256 --dtype fp32,bf16
    python -m benchmarks --models tiny --batch-sizes 2,4 --steps 3      # same thing
    pytest benchmarks/ --benchmark-only                                  # kernel microbenchmarks

``harness`` measures, ``engines`` adapts each library, ``models`` builds the models and the
workload, ``report`` writes CSV / markdown / PNG, ``cli`` is the command line.
"""
