"""One process against two (torch.distributed, gloo on CPU): time per logical step.

Run: ``make bench-ddp`` (about 2 minutes on 2 cores). Each configuration runs in fresh
processes, one thread each, on the built-in transformer (micro-batch B, k = 4): the same
per-process work, so with W processes the logical batch is W times larger (L = W·k·B).
Reported per logical step: wall time, examples per second, and the share of the time in
dpclip's one all-reduce of the clipped sums (timed around ``dist.all_reduce``). Writes
the "Measured" section of docs/distributed.md; ``--device cuda`` uses nccl on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import dpclip
from benchmarks.hf_bench import write_section
from dpclip.workloads import transformer

B, K, WARMUP, STEPS = 16, 4, 2, 6


def worker(rank: int, world: int, port: str, out: str, device: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    work = transformer(4096, seed=0)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(work.model_fn().to(dev), device_ids=[rank] if device == "cuda" else None)
    engine = dpclip.PrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private(
        module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.01), criterion=work.criterion,
        data_loader=DataLoader(work.dataset, batch_size=B), noise_multiplier=1.0, max_grad_norm=1.0,
        accumulation_steps=K, sample_generator=torch.Generator().manual_seed(1),
    )
    spent = [0.0]
    original = dist.all_reduce

    def timed_all_reduce(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if device == "cuda":
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - start

    dist.all_reduce = timed_all_reduce
    step_start, times, comm = None, [], []
    for i, (x, y) in enumerate(loader):
        if i % K == 0:
            if device == "cuda":
                torch.cuda.synchronize()
            step_start, spent[0] = time.perf_counter(), 0.0
        if len(y):
            criterion(model(x.to(dev)), y.to(dev)).backward()
        else:
            optimizer.add_empty_micro_batch()
        if (i + 1) % K == 0:
            optimizer.step()
            optimizer.zero_grad()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - step_start)
            comm.append(spent[0])
            if len(times) == WARMUP + STEPS:
                break
    dist.all_reduce = original
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times[WARMUP:], "comm": comm[WARMUP:],
                                         "logical_batch": engine.plan.logical_batch_size}))
    dist.destroy_process_group()


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(world: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out, port = str(Path(folder) / "result.json"), _port()
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.ddp_bench", "--worker", str(r), str(world),
                                   port, out, device]) for r in range(world)]
        codes = [p.wait(timeout=600) for p in procs]
        if any(codes):
            raise RuntimeError(f"{world} processes: exit codes {codes}")
        return json.loads(Path(out).read_text())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/distributed.md")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    worlds = (1, 2) if args.device == "cpu" else (1, max(1, torch.cuda.device_count()))
    rows = []
    base = None
    for world in worlds:
        r = run(world, args.device)
        step = sorted(r["times"])[len(r["times"]) // 2]
        comm = sum(r["comm"]) / sum(r["times"])
        rate = r["logical_batch"] / step
        base = base or rate
        share = f"{100 * comm:.1f} %" if world > 1 else "— (none: one process)"
        rows.append(f"| {world} | {r['logical_batch']:g} | {1000 * step:.1f} | {rate:.0f} | {rate / base:.2f} | {share} |")
        print(rows[-1], flush=True)
    body = (
        f"### Measured ({args.device}, built-in transformer, B = {B} per process, k = {K}, one thread per "
        f"process, median of {STEPS} logical steps)\n\n"
        f"torch {torch.__version__}, dpclip {dpclip.__version__}, {os.cpu_count()} CPUs\n\n"
        "| processes | logical batch L | ms per logical step | examples / s | speed-up | time in the all-reduce |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
    )
    write_section(Path(args.out), f"ddp-bench-{args.device}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
