"""Public datasets fetched on first use (kdsearch.train.fetch), from a real HTTP server on
127.0.0.1 serving a small CIFAR-10 archive this module writes, named to the code as a mirror
(KDSEARCH_ARCHIVES), so every line of the fetch is the real one: once per node under a file
lock, md5-checked, nothing half-written left, one line when it cannot."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdsearch.errors import KdsearchError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.specs import DataSpec
from kdsearch.train.fetch import ARCHIVES_ENV, CIFAR_FILES, DATA_ENV, dataset_root, default_data_root, read_cifar
from tests.archive_server import ARCHIVE, FOLDER, GARBAGE, Server, md5, mirror
from tests.helpers import run_cli


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server({"/cifar-10-python.tar.gz": ARCHIVE, "/garbage.tar.gz": GARBAGE})
    try:
        yield s
    finally:
        s.close()


def cifar_space(tmp_path: Path) -> Path:
    """A space naming cifar10 with no data.root: a tiny student, one epoch, a timm teacher (random
    weights: this is about the data) whose logits are cached."""
    import timm
    from safetensors.torch import save_file

    teacher = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10, in_chans=3).state_dict(), str(teacher))
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: fetched\n"
        "data: {name: cifar10, img_size: 32}\n"
        f"teacher: {{model: test_resnet, checkpoint: {teacher}}}\n"
        "student: {embed_dim: [32, 48], depth: 1, num_heads: 2, patch_size: 8, pos_embed: learned}\n"
        "recipe: {alpha: 0.5}\n"
        "train: {epochs: 1, batch_size: 32}\n"
        "resources: {cpus: 1}\n"
        "search: {trials: 2, sampler: random, seed: 0, max_concurrent: 2}\n"
    )
    return space


def test_the_table_states_torchvisions_archives_and_files() -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        archive = DATASETS[name].archive
        assert archive is not None
        assert (archive.url, archive.md5, archive.filename, archive.folder) == (
            cls.url, cls.tgz_md5, cls.filename, cls.base_folder,
        )  # fmt: skip
        train, test, _ = CIFAR_FILES[name]
        assert (train, test) == ([f for f, _ in cls.train_list], [f for f, _ in cls.test_list])


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "kdsearch" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_root() == Path.home() / ".cache" / "kdsearch" / "data"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "mine"))
    assert default_data_root() == tmp_path / "mine"


def test_processes_that_ask_at_once_fetch_once(server: Server, tmp_path: Path) -> None:
    """Four processes call dataset_root together: the server holds the one GET until the three
    others say they wait for the lock, so all four meet the fetch; every one returns only when the
    whole folder is in place (each reads it: 100 training images)."""
    env = {
        **os.environ,
        DATA_ENV: str(tmp_path / "cache"),
        ARCHIVES_ENV: str(mirror(tmp_path, f"{server.url}/cifar-10-python.tar.gz", md5(ARCHIVE))),
    }
    code = (
        "from kdsearch.space.specs import DataSpec; from kdsearch.train.fetch import dataset_root, read_cifar; "
        "root = dataset_root(DataSpec(name='cifar10')); "  # its progress lines to stderr
        "print(root, len(read_cifar(root, 'cifar10', True)[1]))"
    )
    server.gate.clear()
    logs = [tmp_path / f"err{i}.txt" for i in range(4)]
    with contextlib.ExitStack() as files:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=files.enter_context(open(log, "w")),
            )
            for log in logs
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum("waiting for another" in log.read_text() for log in logs) < 3:
            time.sleep(0.05)
        server.gate.set()
        outs = [p.communicate(timeout=60)[0].decode() for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    assert sum("waiting for another process fetching it" in e for e in errs) == 3, errs
    assert {out.strip() for out in outs} == {f"{tmp_path / 'cache'} 100"}
    assert server.gets == {"/cifar-10-python.tar.gz": 1}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{FOLDER}.lock", FOLDER]


@pytest.mark.parametrize("served", ["wrong_md5", "not_a_tar"])
def test_a_corrupt_archive_is_one_line_and_leaves_nothing(
    served: str, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, digest = (
        (f"{server.url}/cifar-10-python.tar.gz", md5(b"other bytes"))
        if served == "wrong_md5"
        else (f"{server.url}/garbage.tar.gz", md5(GARBAGE))
    )
    monkeypatch.setenv(ARCHIVES_ENV, str(mirror(tmp_path, url, digest)))
    root = tmp_path / "data"
    with pytest.raises(KdsearchError, match=f"^data.root: {root} is not a folder; make it"):
        dataset_root(DataSpec(name="cifar10", root=str(root)), log=lambda s: None)  # a root named is never made
    root.mkdir()
    with pytest.raises(KdsearchError) as info:
        dataset_root(DataSpec(name="cifar10", root=str(root)), log=lambda s: None)
    line = str(info.value)
    assert "\n" not in line and line.endswith(f"nothing half-written was kept in {root}"), line
    assert ("has md5" if served == "wrong_md5" else "does not extract") in line, line
    assert [p.name for p in root.iterdir()] == [f".{FOLDER}.lock"]  # no archive, no folder, no temporary file


def test_a_corrupt_archive_stops_the_cli_in_one_line(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdsearch trial` on a space naming cifar10, its archive's md5 wrong: exit 2, one error line
    (after the line saying it fetches), and the cache folder holds nothing but the lock."""
    space = cifar_space(tmp_path)
    url = f"{server.url}/cifar-10-python.tar.gz"
    monkeypatch.setenv(ARCHIVES_ENV, str(mirror(tmp_path, url, md5(b"other bytes"))))
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "cache"))
    assert run_cli(["trial", str(space), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("kdsearch: error:")]
    assert errors == [
        f"kdsearch: error: cifar10: the archive from {url} has md5 {md5(ARCHIVE)}, not {md5(b'other bytes')} "
        f"(corrupt or truncated); nothing half-written was kept in {tmp_path / 'cache'}"
    ], err
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{FOLDER}.lock"]


def test_no_server_is_one_line_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: one line saying which folder to fill and how; an archive put there by
    hand is then checked and extracted without a server."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(
        ARCHIVES_ENV, str(mirror(tmp_path, f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", md5(ARCHIVE)))
    )
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "cache"))
    with pytest.raises(KdsearchError) as info:
        dataset_root(DataSpec(name="cifar10"), log=lambda s: None)
    root = tmp_path / "cache"
    assert str(info.value) == (
        f"cifar10: cannot fetch http://127.0.0.1:{port}/cifar-10-python.tar.gz ([Errno 111] Connection refused); "
        f"put {FOLDER}/ in {root}, or the archive cifar-10-python.tar.gz there, or set data.root to a folder "
        f"holding one (or {ARCHIVES_ENV} to a mirror)"
    )
    (root / "cifar-10-python.tar.gz").write_bytes(ARCHIVE)  # as the line says
    assert dataset_root(DataSpec(name="cifar10"), log=lambda s: None) == root
    assert len(read_cifar(root, "cifar10", False)[1]) == 20


def test_a_search_fetches_once_per_node_in_its_workers(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real search of a space naming cifar10 with no data.root: two trials in parallel and a
    teacher-cache task, each loading the data in its own Ray worker. The workers' cache folder
    (the environment Ray started with: one node) is not the driver's, so the driver's check of
    the data and the workers' loads are two nodes' fetches: exactly two GETs, and both trials
    complete."""
    import ray

    from kdsearch.results.tables import load_run
    from kdsearch.search.ray_session import init_ray

    assert not ray.is_initialized(), "a Ray left running would not have this test's environment"
    space = cifar_space(tmp_path)
    monkeypatch.setenv(ARCHIVES_ENV, str(mirror(tmp_path, f"{server.url}/cifar-10-python.tar.gz", md5(ARCHIVE))))
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "workers"))
    init_ray(None)  # its workers inherit this environment
    try:
        monkeypatch.setenv(DATA_ENV, str(tmp_path / "driver"))
        assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs")]) == 0
    finally:
        ray.shutdown()
    assert server.gets == {"/cifar-10-python.tar.gz": 2}
    for node in ("driver", "workers"):
        assert sorted(p.name for p in (tmp_path / node).iterdir()) == [f".{FOLDER}.lock", FOLDER]
    run = load_run(tmp_path / "runs" / "fetched")
    assert [r["status"] for r in run.trials] == ["completed", "completed"]


def test_data_read_from_files_travels_as_its_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a search ships to its workers: CIFAR as its DataSpec, loaded once per worker process
    (the same images as the driver's); digits loaded."""
    from kdsearch.search.trainable import SearchTrainable
    from kdsearch.search.worker_data import shipped, worker_data
    from kdsearch.space.file import load_space
    from kdsearch.train.data import load_data

    monkeypatch.setenv(ARCHIVES_ENV, str(mirror(tmp_path, "http://127.0.0.1:9/cifar-10-python.tar.gz", md5(ARCHIVE))))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(ARCHIVE)  # put there by hand: no server
    space = cifar_space(tmp_path)
    space.write_text(space.read_text().replace("img_size: 32}", f"img_size: 32, root: {tmp_path / 'data'}}}"))
    space = load_space(space)
    data = load_data(space)
    trainable = SearchTrainable.of(space, None, (data, None, None))  # type: ignore[arg-type]
    assert trainable.data == space.data
    loaded = worker_data(trainable.data)
    assert worker_data(space.data) is loaded  # once per process
    assert (loaded.fingerprint, loaded.num_train) == (data.fingerprint, data.num_train) == (data.fingerprint, 80)
    digits = load_data(DataSpec())
    assert shipped(digits) is digits and worker_data(digits) is digits
