"""The Hugging Face benchmark does not rot: every workload of ``benchmarks.hf_workloads``
builds and runs a forward pass, one model trains a dpclip step through
``dpclip.compare`` with the per-example correctness check, Opacus's refusal of a
model is reported, and the benchmark's section replaces itself in the page."""

from __future__ import annotations

import pytest
import torch

from benchmarks import hf_bench, hf_workloads
from dpclip import compare
from dpclip.workloads import load_workload

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize("name", list(hf_workloads.MODELS))
def test_every_workload_builds_and_runs_forward(name):
    w = load_workload(f"benchmarks.hf_workloads:{name}")
    x, y = w.dataset[0]
    model = w.model_fn()
    loss = w.criterion(model(x.unsqueeze(0)), y.unsqueeze(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert len(w.dataset) == hf_workloads.SIZE


def test_sequence_cross_entropy_is_per_sequence():
    logits, labels = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    criterion = hf_workloads.SequenceCrossEntropy(reduction="none")
    per_sequence = criterion(logits, labels)
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[i], labels[i]) for i in range(3)])
    torch.testing.assert_close(per_sequence, expected)
    criterion.reduction = "mean"
    torch.testing.assert_close(criterion(logits, labels), expected.mean())


def test_a_dpclip_step_on_a_workload_matches_the_per_example_reference():
    w = hf_workloads.llama_lora(n=64)
    result = compare.run(
        w.model_fn, w.dataset, w.criterion, logical_batch=8, micro_batch=4, steps=1, warmup=0,
        noise_multiplier=1.0, max_grad_norm=1e-3, methods=["nonprivate", "dpclip"], threads=1,
        clock="cpu", reference="per-example", isolate=False,
    )
    dp = result.row("dpclip")
    # C far below the gradient norms: every example is clipped, so the check covers the factors
    assert dp.max_abs_update_diff is not None and dp.max_abs_update_diff <= 1e-7
    assert dp.step_time_s > 0 and result.config["clock"] == "cpu"


def test_opacus_refusal_is_reported_and_dpclip_trains():
    spec = "benchmarks.hf_workloads:gpt2"
    refused = compare.refusal(spec, "opacus-ghost-bmm", logical_batch=8, micro_batch=4)
    assert refused is not None and "tying" in refused
    assert compare.refusal(spec, "dpclip", logical_batch=8, micro_batch=4) is None


def test_section_is_replaced_in_place_and_the_rest_of_the_page_kept(tmp_path):
    page = tmp_path / "comparison.md"
    page.write_text("# built-in\n\ntable\n")
    hf_bench.write_section(page, "hf", "old\n")
    hf_bench.write_section(page, "hf", "new\n")
    assert page.read_text() == "# built-in\n\ntable\n\n<!-- hf:begin -->\nnew\n<!-- hf:end -->\n"



def test_checkpointing_benchmark_measures_checkpointed_models():
    from benchmarks import checkpointing_bench

    peaks = checkpointing_bench.measure(("transformer", 8, 64, 128))
    assert set(peaks) == {"non-private", "non-private, no checkpointing", "fast", "low", "auto"}
    # the regions are there: checkpointing saves memory without dpclip
    assert peaks["non-private, no checkpointing"][0] > 1.2 * peaks["non-private"][0]
    assert peaks["auto"][1] in ("auto: fast", "auto: low")
    body = checkpointing_bench.section({("transformer", 8, 64, 128): peaks}, 0.1)
    assert "| transformer (8 / 64 / 128) |" in body
