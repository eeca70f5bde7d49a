"""Benchmarks (run from the repository root: ``python -m benchmarks.hf_bench``).

A regular package, not a namespace one: Opacus installs a top-level package named
``benchmarks`` too, which a namespace package would lose to."""
