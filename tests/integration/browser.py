"""A real browser for the console tests: Debian's chromium, driven by Playwright, running
inside a topology host's network namespace.

Playwright talks to the browser over a pipe (--remote-debugging-pipe), not a port, so the
browser process can live in the namespace: its executable is a two-line wrapper that enters
the namespace (`ip netns exec`) and execs /usr/bin/chromium, and every connection the browser
makes starts there. Playwright never downloads a browser here: only the system one is used,
with a fresh profile directory per browser.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from tests.integration.netns import Namespace

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
# Roles of controls a person operates; each must have an accessible name.
CONTROL_ROLES = {"textbox", "searchbox", "combobox", "listbox", "checkbox", "radio", "button",
                 "spinbutton", "slider", "switch", "menuitem", "link"}


class BrowserUnavailable(RuntimeError):
    """Debian's chromium is not installed (.ci/run installs it)."""


def _wrapper(ns: Namespace, directory: Path) -> Path:
    if not CHROMIUM.is_file():
        raise BrowserUnavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    path = directory / "chromium-in-netns"
    path.write_text(f'#!/bin/sh\nexec ip netns exec {ns.ns} {CHROMIUM} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class Browser:
    """One chromium (one profile) in `ns`; pages record a screenshot of every page visited,
    kept as artefacts when a test fails."""

    def __init__(self, pw: Playwright, ns: Namespace, workdir: Path) -> None:
        self.workdir = workdir
        self.profile = Path(tempfile.mkdtemp(prefix="console-profile-", dir=workdir))
        self.shots = workdir / "screenshots"
        self.shots.mkdir(exist_ok=True)
        self._n = 0
        self.context: BrowserContext = pw.chromium.launch_persistent_context(
            str(self.profile), executable_path=str(_wrapper(ns, workdir)), headless=True,
            args=FLAGS, ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(20_000)

    def sign_out_all(self) -> None:
        """Forget every cookie: the next page is a signed-out visitor's."""
        self.context.clear_cookies()

    def shot(self, page: Page, name: str) -> Path:
        self._n += 1
        path = self.shots / f"{self._n:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@contextmanager
def browser_in(ns: Namespace, workdir: Path) -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = Browser(pw, ns, workdir)
        try:
            yield b
        finally:
            b.close()


# -- accessibility basics -------------------------------------------------------------------


def unlabelled_controls(page: Page) -> list[str]:
    """Controls whose accessible name (as chromium computes it) is empty."""
    cdp = page.context.new_cdp_session(page)
    try:
        tree: dict[str, Any] = cdp.send("Accessibility.getFullAXTree")
    finally:
        cdp.detach()
    bad = []
    for node in tree.get("nodes", []):
        if node.get("ignored"):
            continue
        role = (node.get("role") or {}).get("value", "")
        name = (node.get("name") or {}).get("value", "")
        if role in CONTROL_ROLES and not str(name).strip():
            bad.append(f"{role} (backend node {node.get('backendDOMNodeId')})")
    return bad


_FOCUSABLE_JS = """() => Array.from(document.querySelectorAll(
  'a[href], button, input:not([type=hidden]), select, textarea, [tabindex]:not([tabindex="-1"])'))
  .filter(e => !e.disabled && e.getClientRects().length > 0)
  .map((e, i) => { e.dataset.kb = String(i); return e.outerHTML.slice(0, 120); })"""

_ACTIVE_JS = """() => { const e = document.activeElement;
  if (!e || e === document.body || e.dataset.kb === undefined) return null;
  const style = getComputedStyle(e);
  return {index: +e.dataset.kb,
          visible: style.outlineStyle !== 'none' || style.boxShadow !== 'none'}; }"""


def keyboard_gaps(page: Page) -> tuple[list[str], list[str]]:
    """Tab through the page from the top: the interactive elements never reached, and those
    reached without a visible focus indicator."""
    want: list[str] = page.evaluate(_FOCUSABLE_JS)
    page.evaluate("() => { document.activeElement && document.activeElement.blur(); "
                  "window.scrollTo(0, 0); }")
    reached: set[int] = set()
    unseen_focus: list[str] = []
    for _ in range(2 * len(want) + 5):
        page.keyboard.press("Tab")
        active = page.evaluate(_ACTIVE_JS)
        if active is None:
            continue
        if active["index"] in reached:
            break  # wrapped around to the start
        reached.add(active["index"])
        if not active["visible"]:
            unseen_focus.append(want[active["index"]])
    return [w for i, w in enumerate(want) if i not in reached], unseen_focus
