"""dpclip against Opacus BatchMemoryManager on the same model, data and logical batches.

Each method trains the same Poisson logical batches (drawn once, from ``seed``),
split into micro-batches of at most ``micro_batch`` examples:

- ``nonprivate``: plain accumulation of Σℓ/L, no clipping, no noise;
- ``opacus-hooks-bmm``: Opacus hooks mode + ``BatchMemoryManager``;
- ``opacus-ghost-bmm``: Opacus ghost clipping + ``BatchMemoryManager``;
- ``opacus-ghost-accumulate``: Opacus ghost made private on a micro-batch
  loader and accumulated naively (the broken case, shown for contrast);
- ``dpclip``: ghost clipping + accumulation, the model as built.

Opacus refuses ``nn.MultiheadAttention``: its rows run the model after
``ModuleValidator.fix`` (``DPMultiheadAttention`` with the same weights), and
the row's ``note`` says so.

Measurement, per method and repeat, in a fresh process (``isolate=True``):
1. correctness (after the timing): one logical step with σ = 0, SGD lr = 1 (training mode,
   which Opacus needs: a model with dropout makes the check inexact);
   ``max_abs_update_diff`` is the largest |Δθ − reference| where the
   reference is Σᵢ min(1, C/‖gᵢ‖) gᵢ / L with gᵢ from ``torch.func``
   (None for ``nonprivate``, which does not clip);
   with ``reference="per-example"`` the gᵢ come from one forward and backward per
   example on a copy of the model instead (for models that ``torch.func`` cannot
   vmap, e.g. Hugging Face attention), with ``None`` the check is skipped; it runs
   in the first repeat only (the same batches and seeds give the same update);
2. timing (first, in a process that has trained nothing yet): ``warmup`` +
   ``steps`` logical steps at the given σ; step time is the time of one
   logical step (every micro-batch's forward and backward, and the optimizer
   step), the median over the steps after warm-up: wall time, or with
   ``clock="cpu"`` the process's CPU time less the memory sampler's own;
3. memory, over those steps (warm-up included): on CPU, the peak resident set
   size (the kernel's high-water mark, reset after the set-up; sampled every
   millisecond by a thread where it cannot be reset), minus the resident size after
   the model, optimizer and data were set up; on CUDA,
   ``torch.cuda.max_memory_allocated`` minus the allocation before;
4. time ratio (with ``nonprivate`` among the methods; last): fresh copies of the method
   and of non-private training take the same logical steps in turn, one step of each
   right after the other (the order alternating), and ``time_ratio`` is the median,
   over the steps after warm-up of all repeats, of the method's time ÷ non-private's in
   the same step. Step times of separate processes carry the machine's drift (on a cloud
   machine the same step took 85 to 130 ms minutes apart, and ratios of such times moved
   by up to 0.3); a ratio of two moments this close does not.
Methods are interleaved (the order rotates each repeat) so machine noise hits
all alike; each row reports the median over repeats and min / max of the
per-repeat medians. ε is each library's own RDP accountant at ``delta``.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from accounting.events import validate_int
from dpclip.allocator import keep_freed_memory
from dpclip.report import json_safe, package_versions
from dpclip.sampling import split_evenly

__all__ = [
    "CLOCKS", "COMPARE_SCHEMA", "DEFAULT_METHODS", "METHODS", "REFERENCES", "ComparisonResult", "Row",
    "refusal", "run",
]

COMPARE_SCHEMA = "dpclip.compare/1"
#: What a comparison runs unless told otherwise.
DEFAULT_METHODS = ("nonprivate", "opacus-hooks-bmm", "opacus-ghost-bmm", "opacus-ghost-accumulate", "dpclip")
#: All methods: also "dpclip-low", dpclip with ``memory="low"``.
METHODS = (*DEFAULT_METHODS, "dpclip-low")
CLOCKS = ("wall", "cpu")
REFERENCES = ("torch.func", "per-example", None)


@dataclass(frozen=True)
class Row:
    """One method's measurements (times in seconds, memory in MiB)."""

    method: str
    max_abs_update_diff: float | None
    epsilon: float
    steps: int
    step_time_s: float
    step_time_min_s: float
    step_time_max_s: float
    peak_memory_mb: float
    time_ratio: float | None
    memory_ratio: float | None
    note: str = ""


@dataclass(frozen=True)
class ComparisonResult:
    """Rows in method order, the run's configuration and the machine it ran on."""

    rows: tuple[Row, ...]
    config: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": COMPARE_SCHEMA,
            "config": self.config,
            "environment": self.environment,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict`` as JSON; ε = ∞ (the nonprivate row) is the string "inf"."""
        return json.dumps(json_safe(self.to_dict()), indent=indent)

    def to_markdown(self) -> str:
        head = ("| method | max abs update diff | ε | steps | step time (s) min / median / max "
                "| peak memory (MiB) | time × nonprivate | memory × nonprivate | note |")
        lines = [head, "|" + "---|" * 9]
        for r in self.rows:
            diff = "—" if r.max_abs_update_diff is None else f"{r.max_abs_update_diff:.1e}"
            eps = "∞" if math.isinf(r.epsilon) else f"{r.epsilon:.3f}"
            ratio = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(
                f"| {r.method} | {diff} | {eps} | {r.steps} | {r.step_time_min_s:.4f} / "
                f"{r.step_time_s:.4f} / {r.step_time_max_s:.4f} | {r.peak_memory_mb:.1f} | "
                f"{ratio(r.time_ratio)} | {ratio(r.memory_ratio)} | {r.note} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> Any:
        """Bar charts of step time and peak memory per method (PNG); returns the Figure."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.5))
        for i, (attr, label) in enumerate((("step_time_s", "step time (s)"), ("peak_memory_mb", "peak memory (MiB)"))):
            ax = fig.add_subplot(1, 2, i + 1)
            ax.bar([r.method for r in self.rows], [getattr(r, attr) for r in self.rows])
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        return fig


# ---- the common work ------------------------------------------------------------------


class _FixedBatches(Sampler[list[int]]):
    """Yields the pre-drawn logical batches, the same for every method."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])


def _draw_batches(n: int, logical_batch: int, count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    q = logical_batch / n
    return [torch.nonzero(torch.rand(n, generator=gen) < q).flatten().tolist() for _ in range(count)]


def _split(batch: list[int], micro_batch: int) -> list[list[int]]:
    """ceil(len / B) near-equal chunks of at most ``micro_batch`` (as Opacus's BatchSplittingSampler)."""
    return split_evenly(batch, max(1, math.ceil(len(batch) / micro_batch)))


def _collate(dataset: Dataset, idx: list[int], device: torch.device) -> tuple[Any, Any]:
    x, y = default_collate([dataset[i] for i in idx])
    return x.to(device), y.to(device)


def _reference_update(model: nn.Module, criterion: nn.Module, x: Any, y: Any, c: float, logical: float) -> dict[str, torch.Tensor]:
    """Σᵢ min(1, C/‖gᵢ‖) gᵢ / L by name, gᵢ from torch.func (no dpclip or Opacus code)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
        return criterion(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    factors = torch.clamp(c / norms, max=1.0)
    return {k: torch.einsum("i,i...->...", factors.to(v.dtype), v) / logical for k, v in g.items()}


def _per_example_reference_update(model: nn.Module, criterion: nn.Module, x: Any, y: Any, c: float,
                                  logical: float) -> dict[str, torch.Tensor]:
    """As ``_reference_update`` with each gᵢ from a forward and backward of example i alone
    (a batch of one) on a copy of ``model``: plain autograd, for models ``vmap`` cannot run."""
    model = copy.deepcopy(model)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in named]
    for i in range(len(y)):
        loss = criterion(model(x[i : i + 1]), y[i : i + 1])
        g = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for (_, p), gi in zip(named, g)]
        factor = torch.clamp(c / torch.sqrt(sum(gi.pow(2).sum() for gi in g)), max=1.0)
        for t, gi in zip(total, g):
            t.add_(factor * gi)
    return {k: t / logical for (k, _), t in zip(named, total)}


# ---- the methods: each returns (trainer, epsilon(), module whose state_dict is compared, note)


def _opacus_model(model: nn.Module) -> tuple[nn.Module, str]:
    from opacus.validators import ModuleValidator

    if ModuleValidator.is_valid(model):
        return model, ""
    return ModuleValidator.fix(model), "Opacus ran it with DPMultiheadAttention (ModuleValidator.fix, same weights)"


def _setup(method: str, model: nn.Module, criterion: nn.Module, dataset: Dataset, cfg: dict[str, Any],
           sigma: float, lr: float) -> tuple[Callable[[list[list[int]]], Iterator[None]], Callable[[], float], nn.Module, str]:
    device = torch.device(cfg["device"])
    L, B, C = cfg["logical_batch"], cfg["micro_batch"], cfg["max_grad_norm"]
    noise = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)

    def micro(batch: list[int]) -> Iterator[tuple[Any, Any]]:
        for part in _split(batch, B):
            yield _collate(dataset, part, device)

    if method == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def train(batches: list[list[int]]) -> Iterator[None]:
            for batch in batches:
                for x, y in micro(batch):
                    (criterion(model(x), y) * len(y) / L).backward()
                opt.step()
                opt.zero_grad()
                yield

        return train, lambda: math.inf, model, ""

    if method in ("dpclip", "dpclip-low"):
        import dpclip
        from dpclip.sampling import GroupedBatchSampler, wrap_data_loader

        engine = dpclip.PrivacyEngine(accountant="rdp")
        model, opt, crit, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=criterion,
            data_loader=DataLoader(dataset, batch_size=L), noise_multiplier=sigma, max_grad_norm=C,
            max_physical_batch_size=B, noise_generator=noise,
            memory="low" if method == "dpclip-low" else "auto",
        )

        def train(batches: list[list[int]]) -> Iterator[None]:
            loader = wrap_data_loader(
                DataLoader(dataset, batch_size=L),
                GroupedBatchSampler(_FixedBatches(batches), opt.schedule, max_micro_batch_size=B),
            )
            for x, y in loader:
                taken = engine.steps
                crit(model(x.to(device)), y.to(device)).backward()
                opt.step()  # a skip until the logical batch is complete
                opt.zero_grad()
                if engine.steps > taken:
                    yield

        return train, lambda: engine.get_epsilon(cfg["delta"]), model, ""

    import warnings

    from opacus import PrivacyEngine as OpacusEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    model, note = _opacus_model(model)
    engine = OpacusEngine(accountant="rdp")
    ghost = method != "opacus-hooks-bmm"
    accumulate = method == "opacus-ghost-accumulate"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            data_loader=DataLoader(dataset, batch_size=B if accumulate else L),
            noise_multiplier=sigma, max_grad_norm=C, poisson_sampling=True, noise_generator=noise,
            **({"criterion": criterion, "grad_sample_mode": "ghost"} if ghost else {}),
        )
    # Opacus returns (module, optimizer, criterion, loader) in ghost mode, else (module, optimizer, loader).
    gsm, opt = made[0], made[1]
    crit, dp_loader = (made[2], made[3]) if ghost else (criterion, made[2])
    if accumulate:
        note = (note + "; " if note else "") + "made private on the micro-batch loader, accumulated naively"

        def train(batches: list[list[int]]) -> Iterator[None]:
            for batch in batches:
                for x, y in micro(batch):
                    crit(gsm(x), y).backward()
                opt.step()
                opt.zero_grad()
                yield
    else:
        def train(batches: list[list[int]]) -> Iterator[None]:
            loader = DataLoader(dataset, batch_sampler=_FixedBatches(batches), collate_fn=dp_loader.collate_fn)
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=B, optimizer=opt) as mem:
                counts = iter([max(1, math.ceil(len(b) / B)) for b in batches])
                left = next(counts)
                for x, y in mem:
                    crit(gsm(x.to(device)), y.to(device)).backward()
                    opt.step()
                    opt.zero_grad()
                    left -= 1
                    if left == 0:
                        yield
                        left = next(counts, 0)

    return train, lambda: engine.get_epsilon(cfg["delta"]), gsm._module, note


def _measure(job: dict[str, Any]) -> dict[str, Any]:
    """One method, one repeat: correctness pass, then the timed steps (run in a fresh process)."""
    import warnings

    with warnings.catch_warnings():
        # Opacus's RNG and hook warnings, repeated per run, say nothing about the comparison.
        warnings.simplefilter("ignore")
        return _measure_quietly(job)


def _measure_quietly(job: dict[str, Any]) -> dict[str, Any]:
    cfg = job["config"]
    torch.set_num_threads(cfg["threads"])
    # every method under the malloc setting dpclip's make_private applies: no method's
    # time includes page faults that another's setting avoids
    keep_freed_memory()
    model_fn, dataset, criterion = _resolve(job["workload"])
    method, batches = job["method"], job["batches"]
    device = torch.device(cfg["device"])

    # Timed run first, so that its memory is measured from a process that has trained nothing.
    train, epsilon, _, note = _fresh_setup(method, model_fn, criterion, dataset, cfg)
    times: list[float] = []
    with _PeakMemory(device) as memory:
        clock = time.perf_counter if cfg["clock"] == "wall" else memory.cpu_time
        start = clock()
        for _ in train(batches):
            now = clock()
            times.append(now - start)
            start = now
    eps = float(epsilon())

    diff = None
    if method != "nonprivate" and job["check"] and cfg["reference"] is not None:
        torch.manual_seed(cfg["seed"])
        reference_model = model_fn().to(device).train()
        model = copy.deepcopy(reference_model)
        train, _, module, _ = _setup(method, model, criterion, dataset, cfg, sigma=0.0, lr=1.0)
        before = _reference_names(module)
        next(train(batches[:1]))
        after = _reference_names(module)
        x, y = _collate(dataset, batches[0], device)
        reference = _reference_update if cfg["reference"] == "torch.func" else _per_example_reference_update
        expected = reference(reference_model, criterion, x, y, cfg["max_grad_norm"], cfg["logical_batch"])
        diff = max(float((before[k] - after[k] - expected[k]).abs().max()) for k in expected)
    paired = _paired_ratios(method, model_fn, dataset, criterion, batches, cfg) if job["paired"] else None
    return {
        "method": method,
        "max_abs_update_diff": diff,
        "epsilon": eps,
        "steps": len(times),
        "step_time_s": statistics.median(times[cfg["warmup"]:]),
        "peak_memory_mb": memory.peak_mb,
        "note": note,
        "paired_ratios": paired,
    }


def _paired_ratios(
    method: str, model_fn: Callable[[], nn.Module], dataset: Dataset, criterion: nn.Module,
    batches: list[list[int]], cfg: dict[str, Any],
) -> list[float]:
    """The method's time ÷ non-private training's, per logical step after the warm-up: fresh
    copies of both train the same logical batches, each step of one right after the same
    step of the other (the order alternating). Times of separate runs carry the machine's
    drift (±20% over seconds to minutes was seen on a cloud machine); a ratio of two
    moments this close does not."""
    device = torch.device(cfg["device"])
    steps = {m: _fresh_setup(m, model_fn, criterion, dataset, cfg)[0](batches) for m in ("nonprivate", method)}

    def clock() -> float:
        if cfg["clock"] == "cpu":
            return time.process_time()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    ratios = []
    for i in range(len(batches)):
        taken = {}
        for m in ("nonprivate", method) if i % 2 == 0 else (method, "nonprivate"):
            start = clock()
            next(steps[m])
            taken[m] = clock() - start
        if i >= cfg["warmup"]:
            ratios.append(taken[method] / taken["nonprivate"])
    return ratios


def _fresh_setup(
    method: str, model_fn: Callable[[], nn.Module], criterion: nn.Module, dataset: Dataset, cfg: dict[str, Any],
) -> tuple[Callable[[list[list[int]]], Iterator[None]], Callable[[], float], nn.Module, str]:
    """``_setup`` of ``method`` on a fresh model from the run's seed, at its σ and lr."""
    torch.manual_seed(cfg["seed"])
    model = model_fn().to(torch.device(cfg["device"])).train()
    return _setup(method, model, criterion, dataset, cfg, sigma=cfg["noise_multiplier"], lr=cfg["lr"])


def _reference_names(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under the names of the model as built: Opacus's DPMultiheadAttention keeps
    q/k/v in three Linear layers where ``nn.MultiheadAttention`` has one ``in_proj``."""
    out = {k: v.detach().clone() for k, v in module.named_parameters()}
    for key in [k for k in out if k.endswith("qlinear.weight") or k.endswith("qlinear.bias")]:
        prefix, kind = key.rsplit("qlinear.", 1)
        parts = [out.pop(f"{prefix}{p}linear.{kind}") for p in "qkv"]
        out[f"{prefix}in_proj_{kind}"] = torch.cat(parts)
    return out


class _PeakMemory:
    """Peak memory above the level at entry. On CPU the resident set size: the kernel's
    high-water mark reset at entry (Linux ``/proc/self/clear_refs``, where allowed) and
    the resident size sampled every millisecond by a thread, whichever is higher; on CUDA the allocator's peak. ``cpu_time()`` is the
    process's CPU time less the sampling thread's."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler_cpu = 0.0

    def cpu_time(self) -> float:
        return time.process_time() - self._sampler_cpu

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            # the kernel's high-water mark where it can be reset, and a sampling thread
            # always: the mark was seen to miss a transient allocation (it stayed at the
            # level at entry), and sampling alone misses what lives under a millisecond
            self._hwm = _reset_high_water_mark()
            self._base = self._peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss())
            self._sampler_cpu = time.thread_time()

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss(), _high_water_mark() if self._hwm else 0)
            self.peak_mb = (peak - self._base) / 2**20


def allocated_bytes(step: Callable[[], Any]) -> tuple[int, int]:
    """(peak, net) bytes of torch's live CPU allocations during ``step()``, relative to the
    level at its start (the profiler's allocation records): what torch code holds, not what
    the process's allocator keeps mapped, so steadier than the resident set size."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the high-water mark is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_high_water_mark() -> bool:
    """Sets the peak resident set size (VmHWM) to the current one; False where the
    kernel does not allow it (not Linux, or a restricted /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() <= _rss()
    except (OSError, ValueError, StopIteration):
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def _resolve(workload: Any) -> tuple[Callable[[], nn.Module], Dataset, nn.Module]:
    if isinstance(workload, str):
        from dpclip.workloads import load_workload

        w = load_workload(workload)
        return w.model_fn, w.dataset, w.criterion
    return workload


def run(
    model_fn: Callable[[], nn.Module] | str,
    dataset: Dataset | None = None,
    criterion: nn.Module | None = None,
    *,
    logical_batch: int,
    micro_batch: int,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    methods: Sequence[str] = DEFAULT_METHODS,
    delta: float = 1e-5,
    warmup: int = 1,
    repeats: int = 1,
    seed: int = 0,
    threads: int = 2,
    lr: float = 0.1,
    isolate: bool = True,
    device: str | None = None,
    clock: str = "wall",
    reference: str | None = "torch.func",
) -> ComparisonResult:
    """Run every method on the same logical batches; one ``Row`` per method.

    Args:
        model_fn: builds a fresh model (a module-level function, so that it can
            be sent to a fresh process), or a workload spec ("mlp", "cnn",
            "transformer", "tiny" or "module:function") that each process loads.
        dataset, criterion: the data (indexable, yielding (x, y)) and a loss
            module with reduction "mean"; not needed with a workload spec.
        logical_batch: L, expected examples per optimizer step (q = L/N).
        micro_batch: B, the most examples per forward/backward.
        steps: timed optimizer steps (after ``warmup`` more); the time ratios take as
            many again of each private method and of non-private training.
        noise_multiplier, max_grad_norm: σ and C for every private method.
        methods: a subset of ``METHODS``, in the order of the rows.
        delta: δ for ε.
        repeats: how many times each method runs (interleaved).
        threads: ``torch.set_num_threads`` in each run.
        isolate: each (method, repeat) in its own process, so that its peak
            memory is its own; False runs in this process (peak memory then
            includes what this process already held: for quick checks only).
        device: "cpu" or "cuda" (default: cuda when available).
        clock: step time as "wall" time or as the process's "cpu" time (less
            the memory sampler's; with ``threads=1`` the work of one core).
        reference: the per-sample gradients of the correctness check:
            "torch.func" (vmap), "per-example" (one example at a time, for
            models vmap cannot run) or None (no check: ``max_abs_update_diff``
            is None).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Expected methods from {list(METHODS)}, got {list(methods)}")
    if clock not in CLOCKS:
        raise ValueError(f"Expected clock in {list(CLOCKS)}, got {clock!r}")
    if reference not in REFERENCES:
        raise ValueError(f"Expected reference in {list(REFERENCES)}, got {reference!r}")
    for name, value in (("logical_batch", logical_batch), ("micro_batch", micro_batch), ("steps", steps),
                        ("repeats", repeats), ("threads", threads)):
        validate_int(name, value)
    validate_int("warmup", warmup, minimum=0)
    if micro_batch > logical_batch:
        raise ValueError(
            f"Expected micro_batch={micro_batch} <= logical_batch={logical_batch}: a micro-batch is "
            "a part of the logical batch"
        )
    workload: Any = model_fn if isinstance(model_fn, str) else (model_fn, dataset, criterion)
    if not isinstance(model_fn, str) and (dataset is None or criterion is None):
        raise ValueError("pass dataset and criterion with a model_fn (or a workload spec string)")
    data = _resolve(workload)[1]
    n = len(data)  # type: ignore[arg-type]
    item = data[0] if n else None
    if n and not (isinstance(item, (tuple, list)) and len(item) == 2):
        shape = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
        raise ValueError(
            f"the workload's dataset gives {shape} per example; compare takes (x, y) pairs, with "
            "x the model's one input: for a model of several inputs, such as (categories, "
            "continuous, y), give one tensor the model splits (the features side by side, in "
            "one dtype) and y"
        )
    if logical_batch > n:
        raise ValueError(f"logical_batch={logical_batch} exceeds the dataset size {n}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = {
        "logical_batch": logical_batch, "micro_batch": micro_batch, "steps": steps, "warmup": warmup,
        "noise_multiplier": float(noise_multiplier), "max_grad_norm": float(max_grad_norm),
        "delta": delta, "repeats": repeats, "seed": seed, "threads": threads, "lr": lr,
        "device": device, "dataset_size": n, "isolate": isolate, "clock": clock, "reference": reference,
        "workload": model_fn if isinstance(model_fn, str) else getattr(model_fn, "__qualname__", repr(model_fn)),
    }
    if isolate and not isinstance(model_fn, str):
        import pickle

        try:
            pickle.dumps(workload)
        except Exception as err:  # noqa: BLE001 - any pickling failure gets the same advice
            raise ValueError(
                "isolate=True sends model_fn, dataset and criterion to fresh processes, so they "
                f"must be picklable (a module-level function, not a lambda): {err}; or pass "
                "isolate=False"
            ) from None
    batches = _draw_batches(n, logical_batch, warmup + steps, seed)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    order = list(methods)
    for r in range(repeats):
        for method in order[r % len(order):] + order[: r % len(order)]:
            job = {"method": method, "workload": workload, "batches": batches, "config": config, "check": r == 0,
                   "paired": method != "nonprivate" and "nonprivate" in methods}
            results[method].append(_in_fresh_process(job) if isolate else _measure(job))
    rows = _rows(methods, results)
    environment = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "python": platform.python_version(), **package_versions(),
        "cuda": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    return ComparisonResult(tuple(rows), config, environment)


def refusal(
    workload: Callable[[], nn.Module] | str,
    method: str,
    dataset: Dataset | None = None,
    criterion: nn.Module | None = None,
    *,
    logical_batch: int,
    micro_batch: int,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> str | None:
    """The error ``method`` raises when it trains one logical batch of the workload (a
    model Opacus does not accept, say) as ``"TypeName: message"``, or None when it
    trains. Runs in this process; call it before ``run`` to leave such a method out.
    Arguments as for ``run`` (``workload`` is ``run``'s ``model_fn``)."""
    if method not in METHODS:
        raise ValueError(f"Expected a method from {list(METHODS)}, got {method!r}")
    import warnings

    model_fn, dataset, criterion = _resolve(workload if isinstance(workload, str) else (workload, dataset, criterion))
    cfg = {"device": device, "logical_batch": logical_batch, "micro_batch": micro_batch,
           "max_grad_norm": max_grad_norm, "seed": seed}
    batches = _draw_batches(len(dataset), logical_batch, 1, seed)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train, _, _, _ = _setup(method, model_fn().to(device).train(), criterion, dataset, cfg, sigma=1.0, lr=0.1)
            next(train(batches))
    except Exception as err:  # noqa: BLE001 - whatever the library raises is the answer
        return f"{type(err).__name__}: {err}"
    return None


def _in_fresh_process(job: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_process_context(job["workload"])) as pool:
        return pool.submit(_measure, job).result()


def _fresh_process_context(workload: Any) -> multiprocessing.context.BaseContext:
    """Processes forked from a server that imported torch, Opacus, dpclip and the workload's
    module once: a spawned process imports them again, seconds each (Hugging Face models:
    about 10 s a run on 2 cores). Spawn where there is no forkserver (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    modules = ["torch", "opacus", "opacus.utils.batch_memory_manager", "dpclip.compare"]
    if isinstance(workload, str) and ":" in workload:
        modules.append(workload.partition(":")[0])
    # Takes effect when the server starts (the first run of this process).
    context.set_forkserver_preload(modules)
    return context


def _time_ratio(method: str, runs: list[dict[str, Any]]) -> float | None:
    """The median of the paired ratios of all runs (``_paired_ratios``); None without
    ``nonprivate`` among the methods (nothing was paired)."""
    if method == "nonprivate":
        return 1.0
    paired = [x for r in runs for x in (r["paired_ratios"] or [])]
    return statistics.median(paired) if paired else None


def _rows(methods: Sequence[str], results: dict[str, list[dict[str, Any]]]) -> list[Row]:
    base = results.get("nonprivate")
    base_mem = statistics.median(r["peak_memory_mb"] for r in base) if base else None
    rows = []
    for m in methods:
        rs = results[m]
        t = [r["step_time_s"] for r in rs]
        mem = statistics.median(r["peak_memory_mb"] for r in rs)
        diffs = [r["max_abs_update_diff"] for r in rs if r["max_abs_update_diff"] is not None]
        rows.append(Row(
            method=m,
            max_abs_update_diff=max(diffs) if diffs else None,
            epsilon=rs[0]["epsilon"],
            steps=rs[0]["steps"],
            step_time_s=statistics.median(t),
            step_time_min_s=min(t),
            step_time_max_s=max(t),
            peak_memory_mb=mem,
            time_ratio=_time_ratio(m, rs),
            memory_ratio=mem / base_mem if base_mem and base_mem > 0 else None,
            note=rs[0]["note"],
        ))
    return rows
