"""Audit benchmark: what the canary audit of the built-in MLP costs and finds.

For each setting, over 5 seeds: the claimed ε, the two lower bounds (median) and the
seconds of a correct run, and the lower bound of the same run with each example's
clipped gradient counted twice (the negative control of the tests: caught when it
exceeds the claimed ε), with how many of the 5 are caught. Canaries and steps trade
power against time.

Run: ``make bench-audit`` (about 10 minutes on 2 cores). Prints a Markdown table for
docs/audit.md; nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
from collections.abc import Iterator

import torch

import dpclip.clipping.clipper as clipper_module
from dpclip import audit
from dpclip.workloads import mlp

SEEDS = range(5)
N = 4096  # the built-in MLP workload's examples
# (canaries, σ, expected fraction q of the data + included canaries, steps)
SETTINGS = [
    (1_000, 3.0, 0.66, 2),
    (3_000, 3.0, 0.66, 2),
    (10_000, 3.0, 0.66, 2),
    (30_000, 3.0, 0.66, 2),
    (10_000, 2.0, 0.3, 20),
    (10_000, 1.0, 0.1, 100),
]


@contextlib.contextmanager
def counted_twice() -> Iterator[None]:
    real = clipper_module.clip_factors
    clipper_module.clip_factors = lambda norms, c: 2 * real(norms, c)
    try:
        yield
    finally:
        clipper_module.clip_factors = real


def main() -> None:
    torch.set_num_threads(2)
    print(f"Built-in MLP 784-512-256-10, {N} examples, δ = 1e-5, confidence 0.95, seeds 0–{len(SEEDS) - 1}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads. "
          "Medians over the seeds; the correct run's largest lower bound in brackets.\n")
    print("| canaries | σ | q | steps | claimed ε | lower bound | lower bound, any mechanism | seconds "
          "| counted twice: lower bound | caught |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, sigma, q, steps in SETTINGS:
        logical = round(q * (N + m / 2))
        kwargs = {"noise_multiplier": sigma, "logical_batch": logical, "steps": steps, "canaries": m}
        ok = [audit.run(mlp(), seed=seed, **kwargs) for seed in SEEDS]
        with counted_twice():
            bad = [audit.run(mlp(), seed=seed, **kwargs) for seed in SEEDS]

        def median(results: list[audit.AuditResult], key: str) -> float:
            return statistics.median(getattr(r, key) for r in results)

        caught = sum(r.epsilon_lower_bound > r.claimed_epsilon for r in bad)
        print(f"| {m:,} | {sigma:g} | {median(ok, 'sample_rate'):.3f} | {steps} | {median(ok, 'claimed_epsilon'):.2f} "
              f"| {median(ok, 'epsilon_lower_bound'):.2f} ({max(r.epsilon_lower_bound for r in ok):.2f}) "
              f"| {median(ok, 'epsilon_lower_bound_any_mechanism'):.2f} | {median(ok, 'seconds'):.1f} "
              f"| {median(bad, 'epsilon_lower_bound'):.2f} | {caught}/{len(bad)} |", flush=True)


if __name__ == "__main__":
    main()
