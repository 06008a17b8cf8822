"""Driving the kit's JupyterLab commands and headless Chromium from the browser test.

* :func:`running_lab` starts a command (``python -m helpers.commands.lab`` / ``python -m autograder.lab``) as a
  user would, reads the URL it prints, waits until the server answers, and stops it afterwards.
* :func:`chromium_page` launches the Debian Chromium (``/usr/bin/chromium``) through Playwright with a
  fresh profile and the flags that keep it off the network; Playwright never downloads a browser.
* The rest are small JupyterLab actions (open a file, fill a cell, run all, save) done through the UI.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from helpers.course import KIT_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETUP_HINT = "run scripts/setup_browser_test.sh (installs Debian's chromium and Playwright into .venv)"
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook shown in the main area


def missing_browser_tools() -> list[str]:
    """What the browser test lacks on this machine (empty when it can run)."""
    missing = [] if Path(CHROMIUM).exists() else [f"{CHROMIUM} (Debian package chromium)"]
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright")
    return missing


@dataclass(frozen=True)
class RunningLab:
    """A JupyterLab server started by one of the kit's commands."""

    process: subprocess.Popen
    banner: dict[str, str]  # the "key : value" lines it printed before starting
    log: Path

    @property
    def url(self) -> str:
        return self.banner["open"]

    @property
    def base(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def token(self) -> str:
        return parse_qs(urlsplit(self.url).query)["token"][0]


def isolated_jupyter_env(home: Path) -> dict[str, str]:
    """This process's environment with private Jupyter/IPython folders (no user config, no old workspaces)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JUPYTER_TOKEN", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        env[var] = str(home / var.lower())
    return env


def _banner(text: str) -> dict[str, str]:
    pairs = (re.match(r"^\s+([a-z ]+?)\s*:\s+(\S.*)$", line) for line in text.splitlines())
    return {m.group(1): m.group(2).strip() for m in pairs if m}


def _wait_until_serving(process: subprocess.Popen, log: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the command exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        banner = _banner(log.read_text())
        if "open" in banner:
            parts = urlsplit(banner["open"])
            try:
                with urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/api/status?{parts.query}", timeout=5):
                    return banner
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop a server (SIGTERM: Jupyter shuts down cleanly and the command removes its temporary files),
    then kill it if it does not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def running_lab(args: list[str], env: dict[str, str], log: Path, timeout: float = 240) -> Iterator[RunningLab]:
    """Run ``python args...`` from the kit root, output to ``log``; yield once the server answers."""
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen([sys.executable, *args], cwd=KIT_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield RunningLab(process, _wait_until_serving(process, log, timeout), log)
    finally:
        stop(process)


@contextmanager
def chromium_page(profile: Path, width: int = 1400, height: int = 1000):
    """A Playwright page in headless Debian Chromium with a fresh profile folder."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def open_from_file_browser(page, *names: str) -> None:
    """Double-click ``names`` one after the other in JupyterLab's file browser (folders, then a file)."""
    for name in names:
        item = page.locator(".jp-DirListing-item", has=page.locator(".jp-DirListing-itemText", has_text=name))
        item.first.dblclick(timeout=60_000)


def wait_notebook_ready(page, kernel_display_name: str, timeout_ms: int = 180_000) -> None:
    """Wait until the shown notebook has rendered its cells and the status bar shows its kernel (by its
    display name) connected and idle."""
    page.locator(f"{NOTEBOOK} .jp-Cell").first.wait_for(timeout=timeout_ms)
    page.locator("#jp-main-statusbar").get_by_text(f"{kernel_display_name} | Idle", exact=True).wait_for(
        timeout=timeout_ms)


def cell(page, index: int):
    """The ``index``-th cell of the shown notebook, scrolled into view."""
    c = page.locator(f"{NOTEBOOK} .jp-Notebook .jp-Cell").nth(index)
    c.scroll_into_view_if_needed()
    return c


def cell_source(page, index: int) -> str:
    """The text in a cell's editor (one DOM element per line; empty lines hold only a <br>)."""
    lines = cell(page, index).locator(".cm-content .cm-line").evaluate_all("els => els.map(e => e.textContent)")
    return "\n".join(lines)


def type_into_cell(page, index: int, code: str) -> None:
    """Replace a cell's text by ``code`` as a paste would (no auto-indent or bracket closing)."""
    cell(page, index).locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(code)
    page.keyboard.press("Escape")  # back to command mode


def run_all_cells(page, timeout_ms: int = 900_000) -> None:
    """Run > Run All Cells, then wait until no cell is queued or running and the kernel is idle."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
    prompts = f"[...document.querySelectorAll('{NOTEBOOK} .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent)"
    page.wait_for_function(f"() => {prompts}.some(t => t.includes('*'))", timeout=60_000)
    page.wait_for_function(
        f"() => !{prompts}.some(t => t.includes('*')) && document.querySelector("
        f"\"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']\") !== null",
        timeout=timeout_ms, polling=500)


def save_notebook(page, timeout_ms: int = 60_000) -> None:
    """File > Save Notebook, then wait until the tab no longer shows unsaved changes."""
    page.locator(".lm-MenuBar-itemLabel", has_text="File").click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Save Notebook", exact=True).click()
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
                           timeout=timeout_ms)



class Timings:
    """Wall-clock seconds of the test's phases, written to a JSON file as each one ends."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, {}

    def record(self, name: str, since: float) -> None:
        """``name`` took from ``since`` (a ``time.monotonic()`` value) until now."""
        self.seconds[name] = round(time.monotonic() - since, 1)
        self.path.write_text(json.dumps(self.seconds, indent=1))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.record(name, start)
