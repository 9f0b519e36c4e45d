"""A real headless Chromium for the tests of pages kdsearch writes (the report, compare's page)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
NO_CHROMIUM = "no Chromium found (.ci/run installs Debian's chromium package)"


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium loads the page with `args` (--dump-dom, --screenshot=PATH) in a fresh profile."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=10000",
                "--window-size=1100,1400",
                *args,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def render(page: Path) -> tuple[str, list[str]]:
    """Headless Chromium loads the page; returns the DOM after scripts ran and the console errors."""
    proc = chromium(page, "--dump-dom")
    errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "Uncaught" in ln)]
    return proc.stdout, errors
