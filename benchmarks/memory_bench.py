"""Memory and time of dpclip (``memory="auto"`` and ``"low"``) against non-private training
and Opacus ghost clipping + BatchMemoryManager, over the sizes of the memory issue (issue
15); writes the "Memory" section of docs/comparison.md.

Run: ``make bench-memory`` (about 17 minutes on 2 cores). Each configuration is a
workload of this module (``memory_bench:roberta_b16_t64_h64`` …: the Hugging Face
model of ``benchmarks/hf_workloads.py`` at that sequence length and width, FFN 4×width),
and each (configuration, method) runs in its own process (``dpclip.compare``). On CPU:
process CPU time of a logical step (1 torch thread) and the peak resident set size above
the level after set-up; with ``--device cuda``, wall time and the CUDA allocator's peak.
Time ratios are ``dpclip.compare``'s paired ones.

On an accelerator (``python -m benchmarks.memory_bench --device cuda``, a few minutes on
an H200) the configurations are ``CUDA_CONFIGS``: RoBERTa-base and GPT-2 small from
their default configs (12 layers, width 768), and the built-in transformer; each
private method's first update is also checked against a one-example-at-a-time
reference on the device (σ = 0).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import dpclip
from benchmarks import hf_workloads
from benchmarks.hf_bench import _one_line, _version, write_section
from dpclip import compare
from dpclip.workloads import Workload, transformer

#: (workload, micro-batch B, sequence length T, width H) of the issue's table; k = 4.
CONFIGS = (
    ("roberta", 8, 32, 64), ("roberta", 16, 64, 64), ("roberta", 64, 64, 64), ("roberta", 16, 256, 64), ("roberta", 16, 64, 256),
    ("llama", 8, 256, 64), ("llama_lora", 8, 64, 64), ("t5", 16, 64, 64),
    ("transformer", 32, 64, 128), ("transformer", 64, 64, 128),
)
#: on an accelerator: Hugging Face base sizes (12 layers, width 768, FFN 3072, their vocabularies)
CUDA_CONFIGS = (
    ("roberta_base", 32, 128, 768), ("roberta_base", 8, 512, 768), ("gpt2_small", 8, 512, 768),
    ("transformer", 64, 64, 128),
)
K = 4
WARMUP, STEPS, REPEATS = 2, 3, 3
OPACUS = "opacus-ghost-bmm"
METHODS = ("nonprivate", "dpclip", "dpclip-low", OPACUS)


_TINY = {name: getattr(hf_workloads, name) for name in ("VOCAB", "LAYERS", "HEADS")}
_BASE = {"VOCAB": 50265, "LAYERS": 12, "HEADS": 12}  # RoBERTa-base's


def sized(name: str, seq: int, hidden: int, n: int = 512, seed: int = 0) -> Workload:
    if name == "transformer":  # the built-in one is 64 tokens, width 128
        return transformer(n, seed)
    for key, value in (_BASE if name == "roberta_base" else _TINY).items():
        setattr(hf_workloads, key, value)
    hf_workloads.SEQ, hf_workloads.HIDDEN, hf_workloads.FFN = seq, hidden, 4 * hidden
    if name == "gpt2_small":  # its own config; the data's length is SEQ
        return hf_workloads.gpt2_small(n, seed)
    return hf_workloads.MODELS[name.removesuffix("_base")](n, seed)


def config_name(name: str, b: int, t: int, h: int) -> str:
    return f"{name}_b{b}_t{t}_h{h}"


for _name, _b, _t, _h in CONFIGS + CUDA_CONFIGS:  # the workload factories ``dpclip.compare`` loads by name
    globals()[config_name(_name, _b, _t, _h)] = partial(sized, _name, _t, _h)


def measure(config: tuple[str, int, int, int], device: str, repeats: int) -> tuple[compare.ComparisonResult, str | None]:
    spec = f"benchmarks.memory_bench:{config_name(*config)}"
    b = config[1]
    refused = compare.refusal(spec, OPACUS, logical_batch=K * b, micro_batch=b, device=device)
    methods = tuple(m for m in METHODS if not (refused and m == OPACUS))
    cpu = device == "cpu"
    result = compare.run(
        spec, logical_batch=K * b, micro_batch=b, steps=STEPS, warmup=WARMUP, repeats=repeats,
        noise_multiplier=1.0, max_grad_norm=1.0, methods=methods, threads=1,
        clock="cpu" if cpu else "wall", reference=None if cpu else "per-example", device=device,
    )
    return result, refused


def allocation_peaks(config: tuple[str, int, int, int], methods: tuple[str, ...], device: str) -> dict[str, float]:
    """{method: peak torch allocation of one logical step (MiB)} after two warm-up
    steps (parameter gradients, optimizer state and the first micro-batch's checks exist
    by then), each method on a fresh model in this process: the memory torch code holds,
    which the resident set size shows only through the allocator (on CPU
    ``compare.allocated_bytes``; on CUDA the allocator's peak above the level before the step)."""
    work = globals()[config_name(*config)]()
    b = config[1]
    cfg = {"device": device, "logical_batch": K * b, "micro_batch": b, "max_grad_norm": 1.0, "seed": 0,
           "delta": 1e-5}
    batches = compare._draw_batches(len(work.dataset), K * b, 3, 0)
    peaks = {}
    for method in methods:
        torch.manual_seed(0)
        model = work.model_fn().to(device).train()
        train = compare._setup(method, model, work.criterion, work.dataset, cfg, 1.0, 0.01)[0]
        steps = train(batches)
        next(steps), next(steps)
        peaks[method] = (compare.allocated_bytes if device == "cpu" else _cuda_peak)(lambda: next(steps))[0] / 2**20
        del model, train, steps
    return peaks


def _cuda_peak(step: Callable[[], object]) -> tuple[int, int]:
    """(peak, net) bytes of the CUDA allocator during ``step()`` above the level at its start."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base


def auto_choice(config: tuple[str, int, int, int], device: str) -> str:
    """The mode ``memory="auto"`` runs on the configuration ("fast" or "low"), from the
    clipping plan after one micro-batch."""
    work = globals()[config_name(*config)]()
    b = config[1]
    torch.manual_seed(0)
    model = work.model_fn().to(device).train()
    engine = dpclip.PrivacyEngine()
    model, _, criterion, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=work.criterion,
        data_loader=DataLoader(work.dataset, batch_size=b), noise_multiplier=1.0, max_grad_norm=1.0,
        accumulation_steps=K,
    )
    *inputs, labels = (t.to(device) for t in work.dataset[:b])
    criterion(model(*inputs), labels).backward()
    return engine.clipping_plan().memory.removeprefix("auto: ")


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def table(results: dict[tuple, tuple[compare.ComparisonResult, str | None, dict[str, float], str]], device: str) -> str:
    cpu = device == "cpu"
    whole = "RSS peak" if cpu else "allocator peak of the run"
    lines = [
        f"| model | B / T / H | non-private torch peak (MiB) | torch peak × non-private: dpclip / dpclip low "
        f"/ Opacus | non-private {whole} (MiB) | {whole} × non-private: dpclip / dpclip low / Opacus "
        "| time × non-private: dpclip / dpclip low / Opacus | auto ran |"
        + ("" if cpu else " non-private step (ms) | max abs update diff: dpclip / dpclip low / Opacus |"),
        "|" + "---|" * (8 if cpu else 10),
    ]
    for (name, b, t, h), (result, refused, peaks, chose) in results.items():
        base = result.row("nonprivate")
        rows = {r.method: r for r in result.rows}
        private = ("dpclip", "dpclip-low", OPACUS)

        def three(value: Callable[[str], str]) -> str:
            return " / ".join(value(m) if m in rows else "refused" for m in private)

        def diff(m: str) -> str:
            d = rows[m].max_abs_update_diff
            return "—" if d is None else f"{d:.1e}"

        lines.append(
            f"| {name} | {b} / {t} / {h} | {peaks['nonprivate']:.1f} "
            f"| {three(lambda m: _ratio(peaks[m], peaks['nonprivate']))} | {base.peak_memory_mb:.1f} "
            f"| {three(lambda m: _ratio(rows[m].peak_memory_mb, base.peak_memory_mb))} "
            f"| {three(lambda m: f'{rows[m].time_ratio:.2f}')} | {chose} |"
            + ("" if cpu else f" {1e3 * base.step_time_s:.1f} | {three(diff)} |")
        )
    refusals = {name: r for (name, *_), (_, r, *_) in results.items() if r}
    notes = "".join(f"\nOpacus refuses {name}: {_one_line(r)}\n" for name, r in refusals.items())
    return "\n".join(lines) + "\n" + notes


def section(results: dict, device: str, minutes: float, repeats: int) -> str:
    env = next(iter(results.values()))[0].environment
    cpu = device == "cpu"
    measure_text = (
        "the peak resident set size above the level after set-up (the kernel's high-water mark "
        "and 1 ms sampling); time: process CPU time of a logical step (1 torch thread)" if cpu else
        f"the CUDA allocator's peak above the level after set-up on {env.get('cuda')}, over the "
        "whole run; time: wall time of a logical step (synchronized)"
    )
    models = (
        """Hugging Face
models of `benchmarks/hf_workloads.py` at sequence length T and width H (FFN 4·H, 2 layers);
"transformer" is the built-in one (`dpclip.workloads`, T 64, H 128).""" if cpu else
        """RoBERTa-base
(12 layers, 12 heads, FFN 3072, vocabulary 50265) classifying padded sequences of T tokens and
GPT-2 small (its default config: 124M parameters, vocabulary 50257) as a causal LM on T tokens,
both built from configs (random weights), float32 (no TF32); "transformer" is the built-in one
(`dpclip.workloads`, T 64, H 128)."""
    )
    peak_text = (
        """The torch peak
is the peak of torch's live CPU allocations during one logical step after two warm-up steps
(the profiler's allocation records, `dpclip.compare.allocated_bytes`): what the code holds,
steadier than the resident set size, which also shows how the process's allocator reuses
memory (it varied by up to ±30% between runs of the same configuration).""" if cpu else
        """The torch peak
is the CUDA allocator's peak during one logical step after two warm-up steps, above the level
before it. Max abs update diff: each private method's first update (σ = 0, lr 1) against a
one-example-at-a-time reference on the GPU (`dpclip.compare`, reference "per-example")."""
    )
    return f"""## Memory{'' if cpu else ' on ' + str(env.get('cuda'))}

Generated by `benchmarks/memory_bench.py` on {env.get('date')} ({minutes:.1f} minutes) — do not edit by hand.
Python {env.get('python')}, torch {env.get('torch')}, transformers {_version('transformers')},
opacus {env.get('opacus')}, dpclip {env.get('dpclip')}; {env.get('cpus')} CPUs. {models} Logical batch 4·B in
micro-batches of B (k = 4), σ = 1, C = 1; {WARMUP} warm-up + {STEPS} timed steps, {repeats}
repeat(s) per method (medians), each run in its own process, methods interleaved, all under the
malloc setting dpclip's make_private applies.
dpclip: `memory="auto"` (the default: "fast", one backward, or "low", two, as "auto ran"
says); dpclip low: `memory="low"`.
Measured: {measure_text}. Time ratios are paired (`dpclip.compare`): after its measured
run, each method and non-private training take the same steps in turn, and the ratio is
the median of the two's times in the same step (separate runs carry this machine's drift of
±20%). {peak_text}

{table(results, device)}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/comparison.md")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--only", help="comma-separated workload names (default: every configuration)")
    args = parser.parse_args()
    only = None if args.only is None else {m.strip() for m in args.only.split(",")}
    started = time.perf_counter()
    results = {}
    name = "memory" if args.device == "cpu" else f"memory-{args.device}"
    failed = []
    for config in CONFIGS if args.device == "cpu" else CUDA_CONFIGS:
        if only is None or config[0] in only:
            try:
                result, refused = measure(config, args.device, args.repeats)
            except Exception:  # noqa: BLE001 - the next configurations still run; exit 1 at the end
                traceback.print_exc()
                failed.append(config_name(*config))
                continue
            peaks = allocation_peaks(config, tuple(r.method for r in result.rows), args.device)
            results[config] = (result, refused, peaks, auto_choice(config, args.device))
            print(config_name(*config), {r.method: (round(peaks[r.method], 1), round(r.peak_memory_mb, 1),
                                                    round(r.step_time_s, 4), round(r.time_ratio, 2),
                                                    r.max_abs_update_diff)
                                         for r in result.rows}, flush=True)
            # after each configuration: a run cut short keeps what it measured
            body = section(results, args.device, (time.perf_counter() - started) / 60, args.repeats)
            write_section(Path(args.out), name, body)
    if results:
        print(body)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
