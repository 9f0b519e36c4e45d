"""A trial's attempts: which count against max_failures (its own errors, a worker that died on a
live node) and which do not (a lost node, however often; an attempt its driver took with it)."""

from __future__ import annotations

from pathlib import Path

from kdsearch.search.attempts import Attempts
from kdsearch.storage import Storage

NODE_A, NODE_B, JOB = "a" * 56, "b" * 56, "01000000"


def attempts(tmp_path: Path, dead: set[str]) -> Attempts:
    return Attempts(Storage.open(tmp_path), "t1", alive=lambda node: node not in dead)


def test_a_first_attempt_has_no_failures_and_is_recorded(tmp_path: Path) -> None:
    first = attempts(tmp_path, dead=set())
    assert first.begin(NODE_A, JOB) == []
    assert first.number == 1
    assert (tmp_path / "trials" / "t1" / "attempts" / "0001.json").exists()


def test_an_error_the_attempt_recorded_is_the_trials_own_failure(tmp_path: Path) -> None:
    first = attempts(tmp_path, dead=set())
    first.begin(NODE_A, JOB)
    first.fail("ValueError: boom")
    second = attempts(tmp_path, dead=set())
    assert second.begin(NODE_B, JOB) == ["ValueError: boom"]
    assert second.number == 2


def test_lost_nodes_never_count_however_often(tmp_path: Path) -> None:
    for node in ("n1", "n2", "n3", "n4", "n5"):
        assert attempts(tmp_path, dead={"n1", "n2", "n3", "n4"}).begin(node, JOB) == []


def test_a_worker_that_vanished_on_a_live_node_is_the_trials_failure(tmp_path: Path) -> None:
    attempts(tmp_path, dead=set()).begin(NODE_A, JOB)
    own = attempts(tmp_path, dead=set()).begin(NODE_B, JOB)
    assert own == [
        f"its worker process ended without an error on node {NODE_A[:12]}, which lives (a crash or the OOM killer)"
    ]


def test_a_node_lives_while_its_raylet_answers() -> None:
    """`node_alive` against a real Ray: the node of this driver lives; an id no node has does not."""
    import ray

    from kdsearch.search.attempts import node_alive
    from kdsearch.search.ray_session import init_ray

    owns = not ray.is_initialized()
    init_ray(None)
    try:
        assert node_alive(ray.get_runtime_context().get_node_id())
        assert not node_alive("f" * 56)
    finally:
        if owns:
            ray.shutdown()


def test_an_attempt_of_an_earlier_driver_ended_with_it(tmp_path: Path) -> None:
    attempts(tmp_path, dead=set()).begin(NODE_A, "01000000")
    assert attempts(tmp_path, dead=set()).begin(NODE_A, "02000000") == []
