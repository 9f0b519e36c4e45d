"""The Pareto-aware halving rule, without Ray: only cheaper-or-equal, more accurate peers stop a trial."""

from __future__ import annotations

from kdsearch.search.early_stopping import ParetoHalvingRule
from kdsearch.space.search_space import EarlyStopping


def rule(**kw) -> ParetoHalvingRule:
    return ParetoHalvingRule(EarlyStopping(**{"grace_epochs": 2, "reduction_factor": 2, "beaten_by": 2, **kw}))


def test_milestones() -> None:
    r = rule()
    assert [e for e in range(1, 31) if r.is_milestone(e, 30)] == [2, 4, 8, 16]
    assert not r.is_milestone(16, 16)  # the last epoch is no milestone: the trial is done
    assert [e for e in range(1, 31) if rule(grace_epochs=5, reduction_factor=3).is_milestone(e, 30)] == [5, 15]
    assert not any(rule(enabled=False).is_milestone(e, 30) for e in range(31))


def test_a_small_student_is_never_stopped_by_bigger_ones() -> None:
    r = rule(beaten_by=1)
    assert not r.on_result("big1", 2, 10, (100.0,), 0.9)
    assert not r.on_result("big2", 2, 10, (200.0,), 0.95)
    assert not r.on_result("tiny", 2, 10, (10.0,), 0.3)  # far less accurate, but far cheaper


def test_stopped_when_enough_cheaper_peers_are_more_accurate() -> None:
    r = rule(beaten_by=2)
    assert not r.on_result("a", 2, 10, (10.0,), 0.8)
    assert not r.on_result("b", 2, 10, (50.0,), 0.7)  # beaten by one only
    assert r.on_result("c", 2, 10, (50.0,), 0.6)  # a (cheaper) and b (equal cost) both beat it
    assert r.beaten_by("c", 2) == ["a", "b"]


def test_ties_do_not_stop() -> None:
    r = rule(beaten_by=1)
    assert not r.on_result("a", 2, 10, (10.0,), 0.8)
    assert not r.on_result("b", 2, 10, (10.0,), 0.8)  # equal accuracy is not "higher"


def test_every_cost_must_be_no_more() -> None:
    r = rule(beaten_by=1)
    assert not r.on_result("a", 2, 10, (10.0, 500.0), 0.9)  # cheaper FLOPs, more params
    assert not r.on_result("b", 2, 10, (20.0, 100.0), 0.5)
    assert r.on_result("c", 2, 10, (20.0, 600.0), 0.5)  # a costs no more in both and is better


def test_only_same_epoch_peers_count() -> None:
    r = rule(beaten_by=1)
    assert not r.on_result("a", 4, 10, (10.0,), 0.9)
    assert not r.on_result("b", 2, 10, (50.0,), 0.2)  # a was recorded at epoch 4, not 2
    assert not r.on_result("c", 3, 10, (50.0,), 0.1)  # not a milestone at all
