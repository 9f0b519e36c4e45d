"""Only `kdsearch.search` and the CLI's search command may import Ray; the package import is light."""

from __future__ import annotations

import subprocess
import sys


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_import_kdsearch_does_not_import_ray_or_torch() -> None:
    mods = modules_after("import kdsearch")
    assert "ray" not in mods
    assert "torch" not in mods


def test_space_and_cli_do_not_import_ray() -> None:
    mods = modules_after(
        "import kdsearch.space, kdsearch.summary, kdsearch.cli, kdsearch.student, kdsearch.flops, kdsearch.trial, kdsearch.teacher, kdsearch.data, kdsearch.distill"
    )
    assert "ray" not in mods
    assert "optuna" not in mods  # the space is define-by-run: it needs a trial, not optuna itself


def test_lazy_exports_resolve() -> None:
    import kdsearch

    for name in kdsearch.__all__:
        assert getattr(kdsearch, name) is not None
