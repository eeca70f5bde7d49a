"""The budget cap: the step that would pass max_epsilon is refused before anything changes."""

from __future__ import annotations

import warnings

import pytest
import torch

import accounting as acc
import dpclip
from tests.accounting import oracle
from tests.dpclip.private_run import private_mlp, train

CAP, DELTA, Q, SIGMA = 3.0, 1e-5, 16 / 80, 1.5


def test_run_stops_at_exactly_the_last_allowed_step_and_the_refused_step_changes_nothing():
    engine, model, opt, crit, loader = private_mlp(noise_multiplier=SIGMA, max_epsilon=CAP, target_delta=DELTA)
    allowed = engine.steps_remaining
    assert allowed > 5  # more than one epoch of 5 steps: the cap binds mid-training
    # dp-accounting itself: the allowed steps fit the cap and one more would not.
    assert oracle.rdp_epsilon(Q, SIGMA, allowed, DELTA) <= CAP < oracle.rdp_epsilon(Q, SIGMA, allowed + 1, DELTA)
    refused = 0
    while refused == 0:
        for x, y in loader:
            crit(model(x), y).backward()
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            entries = engine.ledger.entries
            noise_state = opt.generator.get_state()
            try:
                opt.step()
            except dpclip.PrivacyBudgetExceeded as err:
                refused += 1
                assert f"max_epsilon={CAP:g}" in str(err)
                assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
                assert engine.ledger.entries == entries
                assert torch.equal(opt.generator.get_state(), noise_state)  # no noise drawn
                # the logical batch was dropped, so that the final state can be saved
                assert "logical batch (" in str(err) and opt.micro_batches_accumulated == 0
                with warnings.catch_warnings():  # (a spent budget resumes nothing: no word of the pass)
                    warnings.simplefilter("error")
                    assert engine.state_dict()["ledger"] == engine.ledger.state_dict()
                break
            opt.zero_grad()
    assert engine.steps == allowed
    assert engine.steps_remaining == 0
    with warnings.catch_warnings():  # after leaving the loop too
        warnings.simplefilter("error")
        engine.state_dict()
    assert engine.get_epsilon(DELTA) <= CAP
    report = engine.report()
    assert (report.max_epsilon, report.steps_remaining) == (CAP, 0)
    assert any("nearly" in w for w in report.warnings)


def test_skipped_steps_inside_a_logical_batch_are_not_refused():
    engine, model, opt, crit, loader = private_mlp(noise_multiplier=SIGMA, max_epsilon=CAP, target_delta=DELTA)
    x, y = next(iter(loader))
    engine._budget_cache = (0, 0, engine.ledger.entries)  # pretend the budget is spent
    crit(model(x), y).backward()
    assert opt.step() is None  # micro-batch 1 of 2: a skip, not a step
    crit(model(x), y).backward()
    with pytest.raises(dpclip.PrivacyBudgetExceeded):
        opt.step()


def test_resumed_run_counts_what_the_first_part_spent():
    first, *run = private_mlp(noise_multiplier=SIGMA, max_epsilon=CAP, target_delta=DELTA)
    train(first, *run)
    second, *_ = private_mlp(noise_multiplier=SIGMA, max_epsilon=CAP, target_delta=DELTA, seed=0)
    full = second.steps_remaining
    second.load_state_dict(first.state_dict())
    assert second.ledger.entries == first.ledger.entries
    assert second.steps_remaining == first.steps_remaining == full - first.steps
    spent = acc.Ledger()
    spent.load_state_dict(first.ledger.state_dict())
    assert second.steps_remaining == acc.max_steps(CAP, DELTA, Q, SIGMA, "rdp", spent=spent)


def test_a_ledger_changed_by_merge_is_recounted_for_the_cap():
    engine, *_ = private_mlp(noise_multiplier=SIGMA, max_epsilon=CAP, target_delta=DELTA)
    earlier = acc.Ledger()
    earlier.record(acc.PoissonGaussian(Q, 0.8), 5)  # a noisier earlier part of the run
    engine.ledger.merge(earlier)
    assert engine.steps_remaining == acc.max_steps(CAP, DELTA, Q, SIGMA, "rdp", spent=engine.ledger)


def test_load_state_dict_refuses_another_run():
    first, *_ = private_mlp()
    other, *_ = private_mlp(noise_multiplier=2.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="schema"):
        other.load_state_dict({"ledger": {}})
    # another dataset size: the field named, and the fix (it printed the two plans whole)
    bigger, *_ = private_mlp(n=96)
    with pytest.raises(ValueError, match=r"saved batching differs from this engine's \(dataset_size 80 saved, 96 here;"
                       r".*the same dataset, batch size"):
        bigger.load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_epsilon=1.0), "together"),
        (dict(target_delta=1e-5), "together"),
        (dict(max_epsilon=-1.0, target_delta=1e-5), "max_epsilon"),
        (dict(max_epsilon=1.0, target_delta=2.0), "delta"),
        (dict(max_epsilon=1.0, target_delta=1e-5, accountant="gdp"), "approximation"),
    ],
)
def test_bad_budget_is_refused_before_anything_changes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        private_mlp(**kwargs)


def test_a_cap_beyond_the_calibrated_range_is_refused_at_once():
    with pytest.raises(ValueError, match="max_epsilon=1000 <= 100"):
        dpclip.PrivacyBudget(1000.0, 1e-5, "prv")
