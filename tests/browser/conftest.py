"""A throwaway JupyterLab server and a headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    process: subprocess.Popen

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (the test's temporary folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop(url: str, token: str, process: subprocess.Popen) -> None:
    """Shut the server down (kernels first, through its API), then make sure it is gone."""
    request = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
        process.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab from this venv on a loopback port, with a temporary token and root."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: run `make setup` as root (apt install chromium)")
    root = tmp_path / "root"
    root.mkdir()
    # no "get Jupyter news?" toast over the page (nor a request for news)
    notification = (tmp_path / "config" / "lab" / "user-settings" / "@jupyterlab" /
                    "apputils-extension" / "notification.jupyterlab-settings")
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token = secrets.token_hex(16)
    port = _free_port()
    environment = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (tmp_path / "jupyterlab.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
            f"--port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
            "--allow-root", "--ServerApp.terminals_enabled=False",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()
                    ) from None
                time.sleep(0.5)
        yield Lab(url=url, token=token, root=root, process=process)
    finally:
        _stop(url, token, process)
        log.close()
        strays = _processes_mentioning(str(tmp_path))
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not strays, f"JupyterLab left processes behind: {strays}"


@pytest.fixture
def browser_page(tmp_path: Path):
    """A headless Chromium page (Debian's browser, never a downloaded one)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            yield page
        finally:
            browser.close()
