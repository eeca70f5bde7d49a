"""Where a dpclip step spends its time, per phase, next to non-private accumulation.

Run: ``make bench-profile`` or
``python benchmarks/phase_profile.py --model transformer --micro-batch 32 [--clipping auto] [--device cuda]``.

Phases are the labelled ranges dpclip emits (``torch.autograd.profiler.record_function``,
free when no profiler runs): forward (model and loss, labelled here), backward (the one
backward pass to the layer outputs), norms (per-sample norms), clipped_sum (book-keeping
Σ c_i g_i), noise (one Gaussian draw per parameter and step), optimizer_step (the user's
optimizer); "other" is the rest of the step (data loading, accumulation, hooks). Times
are per logical batch, averaged over the timed steps; the profiler adds overhead, so
compare phases with each other, and use ``make bench-compare`` for end-to-end ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

import dpclip
from dpclip.workloads import load_workload

PHASES = ("forward", "dpclip.backward", "dpclip.norms", "dpclip.clipped_sum", "dpclip.noise",
          "dpclip.optimizer_step")
NONPRIVATE_PHASES = ("forward", "backward", "optimizer_step")


def _to(batch, device):
    return [t.to(device) for t in batch]


def _dpclip_steps(workload, args, device):
    torch.manual_seed(0)
    model = workload.model_fn().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(workload.dataset, batch_size=args.micro_batch)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=workload.criterion, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0,
        accumulation_steps=args.logical_batch // args.micro_batch, clipping=args.clipping,
        noise_generator=torch.Generator(device=device).manual_seed(1),
        sample_generator=torch.Generator().manual_seed(2),
    )

    def run(steps: int):
        target = engine.steps + steps
        while engine.steps < target:
            for x, y in loader:
                if len(y) == 0:
                    optimizer.add_empty_micro_batch()
                else:
                    x, y = _to((x, y), device)
                    with record_function("forward"):
                        loss = criterion(model(x), y)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if engine.steps == target:
                    return

    return run


def _nonprivate_steps(workload, args, device):
    torch.manual_seed(0)
    model = workload.model_fn().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(workload.dataset, batch_size=args.micro_batch, shuffle=True,
                        generator=torch.Generator().manual_seed(2))
    criterion: nn.Module = workload.criterion
    k = args.logical_batch // args.micro_batch

    def passes():
        while True:
            yield from loader

    it = passes()

    def run(steps: int):
        for _ in range(steps):
            for _ in range(k):
                x, y = _to(next(it), device)
                with record_function("forward"):
                    loss = criterion(model(x), y) / k
                with record_function("backward"):
                    loss.backward()
            with record_function("optimizer_step"):
                optimizer.step()
            optimizer.zero_grad()

    return run


def _profile(run, steps: int, phases, device) -> tuple[dict[str, float], float]:
    run(1)  # warm-up on the same objects: dpclip's first micro-batch is also audited once
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run(steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = (time.perf_counter() - started) * 1e3 / steps
    found = {e.key: e for e in prof.key_averages()}
    ms = {}
    for phase in phases:
        event = found.get(phase)
        # on CUDA a range's CPU time is its launch time; its kernels are the device time
        us = 0.0 if event is None else (
            event.device_time_total if device.type == "cuda" else event.cpu_time_total
        )
        ms[phase] = us / 1e3 / steps
    return ms, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer", help="mlp | cnn | transformer | module:function")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--logical-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clipping", default="auto", choices=dpclip.STRATEGIES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workload = load_workload(args.model)

    dp_ms, dp_total = _profile(_dpclip_steps(workload, args, device), args.steps, PHASES, device)
    np_ms, np_total = _profile(_nonprivate_steps(workload, args, device), args.steps, NONPRIVATE_PHASES, device)
    print(f"{args.model}, micro-batch {args.micro_batch}, logical batch {args.logical_batch}, "
          f"clipping={args.clipping}, {device}, {args.threads} threads; ms per logical step "
          f"(under the profiler)")
    print(f"{'phase':<16}{'nonprivate':>12}{'dpclip':>12}{'dpclip %':>10}")
    rows = [("forward", "forward", "forward"), ("backward", "backward", "dpclip.backward"),
            ("norms", None, "dpclip.norms"), ("clipped_sum", None, "dpclip.clipped_sum"),
            ("noise", None, "dpclip.noise"), ("optimizer_step", "optimizer_step", "dpclip.optimizer_step")]
    for label, np_key, dp_key in rows:
        n = np_ms[np_key] if np_key else 0.0
        print(f"{label:<16}{n:>12.1f}{dp_ms[dp_key]:>12.1f}{100 * dp_ms[dp_key] / dp_total:>9.0f}%")
    dp_other = dp_total - sum(dp_ms.values())
    np_other = np_total - sum(np_ms.values())
    print(f"{'other':<16}{np_other:>12.1f}{dp_other:>12.1f}{100 * dp_other / dp_total:>9.0f}%")
    print(f"{'total':<16}{np_total:>12.1f}{dp_total:>12.1f}   ({dp_total / np_total:.2f}× nonprivate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
