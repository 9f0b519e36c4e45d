"""Small helpers shared by tests."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest
from torch import nn

from kdsearch.cli import main
from kdsearch.models.student import Attention
from kdsearch.results.tables import RunPaths
from kdsearch.space.specs import POS_EMBEDS, StudentSpec

# Three student sizes, tiny to DeiT-Tiny at 224px, and every pos_embed x distillation token of each
SIZES = {
    "tiny": StudentSpec(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    "small": StudentSpec(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=3.0),
    "deit_tiny": StudentSpec(
        img_size=224,
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        in_chans=3,
        num_classes=1000,
        mlp_ratio=4.0,
    ),
}
GRID = [
    pytest.param(
        dataclasses.replace(SIZES[size], pos_embed=pe, distill_token=dt), id=f"{size}-{pe}-{'dist' if dt else 'cls'}"
    )
    for size, pe, dt in itertools.product(SIZES, POS_EMBEDS, (False, True))
]


Test = TypeVar("Test", bound=Callable[..., object])


def in_ci() -> bool:
    """Whether the tests run in CI: `CI` set to anything but "", "0" or "false" (.ci/run sets
    CI=true, as GitHub Actions, GitLab CI and most services do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def missing(reason: str) -> NoReturn:
    """End the running test because a tool or permission it needs is missing here (`reason` says
    which): a skip on a developer's machine, a failure in CI, where .ci/run installs every such
    tool and runs as root, so CI never passes with the test unrun."""
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this test must run here (.ci/run installs what it needs)", pytrace=False)
    pytest.skip(reason)


def needs(reason: str | None) -> Callable[[Test], Test]:
    """A test's decorator: the test runs when `reason` is None (what it needs is here); otherwise
    it ends as `missing(reason)` says (skipped before its fixtures, or failed in CI)."""

    def decorate(test: Test) -> Test:
        if reason is None:
            return test
        if not in_ci():
            return pytest.mark.skip(reason=reason)(test)

        @functools.wraps(test)
        def refused(*args: object, **kwargs: object) -> NoReturn:
            missing(reason)

        return refused  # type: ignore[return-value]

    return decorate


def run_cli(args: list[str]) -> int:
    """Run the `kdsearch` command in this process, as the console script does; return its exit code."""
    try:
        main(args)
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    return 0


SEARCH_SPACE = """
name: digits_search
data: {{name: digits, img_size: 16}}
teacher: {{model: kdsearch/digits_cnn, checkpoint: {checkpoint}}}
student:
  embed_dim: [32, 48]
  depth: {{choices: [1, 2], default: 2}}
  num_heads: [2, 4]
  mlp_ratio: 2.0
  patch_size: [4, 2]
  pos_embed: [learned, sincos, relpos, rope, cpe, none]
  distill_token: [false, true]
recipe:
  alpha: {{low: 0.0, high: 1.0}}
  temperature: {{low: 1.0, high: 8.0, log: true, default: 4.0}}
train: {{epochs: {epochs}, batch_size: 64, lr: 2.0e-3, warmup_epochs: 1}}
early_stopping: {{grace_epochs: 2, reduction_factor: 2, beaten_by: 1}}
budget: {{max_gflops: 0.004}}
resources: {{cpus: 1}}
search: {{trials: {trials}, sampler: {sampler}, seed: {seed}, max_failures: 2, max_concurrent: {max_concurrent}}}
"""


def write_space(
    tmp_path: Path,
    teacher: Path,
    trials: int = 8,
    epochs: int = 6,
    sampler: str = "random",
    seed: int = 3,
    max_concurrent: int | None = None,
) -> Path:
    """A digits space for tests; its defaults are what `default_spec()` (a single trial) uses.

    `max_concurrent=1` makes the order of trials, and so early stopping, deterministic.
    """
    path = tmp_path / "space.yaml"
    path.write_text(
        SEARCH_SPACE.format(
            checkpoint=teacher,
            trials=trials,
            epochs=epochs,
            sampler=sampler,
            seed=seed,
            max_concurrent="null" if max_concurrent is None else max_concurrent,
        )
    )
    return path


def train_every_trial(space: Path, **search: object) -> Path:
    """The space with no budget and no early stopping (every trial trains to its last epoch), and
    `search` set in its search section."""
    import yaml

    raw = yaml.safe_load(space.read_text())
    raw["budget"] = {"max_gflops": None}
    raw["early_stopping"] = {"enabled": False}
    raw["search"].update(search)
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    return space


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch every `Attention` in `model` to SDPA (True) or the explicit matmul path (False)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = enabled


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model`'s attention on the explicit path inside the block, restoring each setting after.

    FlopCounterMode counts the explicit path's matmuls; SDPA on CPU is counted as 0.
    """
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.fused_attn for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.fused_attn = s


def run_dir(result) -> Path:
    """The local folder of a search's run (its `RunPaths` storage)."""
    return result.paths.store.local_path()


@contextlib.contextmanager
def one_ray() -> Iterator[None]:
    """One embedded Ray for every in-process search of the block (run_search leaves a Ray it did
    not start running: about 5 s saved per search after the first), started with this process's
    environment as it is now, which its workers inherit; shut down after. A Ray already running
    is shut down first: its workers have the environment of when it started."""
    import ray

    from kdsearch.search.ray_session import init_ray

    ray.shutdown()
    init_ray(None)
    try:
        yield
    finally:
        ray.shutdown()


def search_stopped_by_storage(space: Path, storage: str | Path, fault: Callable[[], None], resume: bool = False) -> str:
    """Run the search of `space` while `fault` (in a thread) breaks its storage; returns the
    line it stopped with, checked for what every storage stop says: one line, the run's
    tables the last whole ones, kdsearch's resume command; and no traceback in what the
    driver's loggers (Ray's included) wrote meanwhile. (Logs are read here, not with capfd:
    Ray's handler writes to the stream it found at import, which pytest's per-test capture
    does not see, and the "ray" logger does not propagate to the root.)"""
    from kdsearch.search.run import run_search
    from kdsearch.storage import StorageError

    logged, loggers = _Formatted(), [logging.getLogger(), logging.getLogger("ray")]  # "ray" does not propagate
    for lg in loggers:
        lg.addHandler(logged)
    breaker = threading.Thread(target=fault, daemon=True)
    breaker.start()
    try:
        with pytest.raises(StorageError) as info:
            run_search(space, storage=storage, resume=resume, say=lambda s: None)
    finally:
        for lg in loggers:
            lg.removeHandler(logged)
    breaker.join(timeout=5)
    assert logged.texts, "nothing was logged: the check below would see nothing"
    tracebacks = [t for t in logged.texts if "Traceback" in t]
    assert not tracebacks, tracebacks[0]
    line = str(info.value)
    assert "\n" not in line, line
    assert f"the search stopped: {storage}/digits_search's tables hold the last whole state" in line, line
    assert line.endswith(f"--storage {storage} --name digits_search --resume"), line
    return line


class _Formatted(logging.Handler):
    """Every record that reaches the loggers it is attached to, formatted as a handler would print it (its
    traceback included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))


KDSEARCH = [sys.executable, "-c", "from kdsearch.cli import main; main()"]


def interrupt_search(args: list[str], run: RunPaths) -> tuple[str, str]:
    """Run `kdsearch ARGS` (a search writing `run`), press Ctrl-C once its first trial is
    recorded (SIGINT to the driver only, as a terminal's Ctrl-C reaches it), and return its
    stdout and stderr after it exits 0."""
    proc = subprocess.Popen(
        [*KDSEARCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not run.rows(RunPaths.TRIALS) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return out, err


def stop_session(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop a server started with `start_new_session=True`: SIGTERM to its process group, then
    SIGKILL after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
