"""Headless Chromium, driven over the DevTools protocol on loopback (tests only).

Opens a local HTML file the way a person's browser does and reports what a person would see:
console errors and uncaught exceptions, every image (decoded or not, its natural size), every
section with its heading and height, and a full-page PNG screenshot. The browser is the Debian
package ``chromium`` (``.ci/run`` installs it); nothing is downloaded.

The browser is kept off the network: every host name resolves to nothing
(``--host-resolver-rules``), every request that is not to loopback goes to a closed local port
as its proxy, and the background services that phone home are switched off.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED_ENV = "ITEM_EMBEDDINGS_BROWSER_REQUIRED"   # set by .ci/run: a missing browser fails
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT_S = 20.0
STEP_TIMEOUT_S = 20.0
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--disable-default-apps", "--disable-extensions",
         "--disable-domain-reliability", "--disable-client-side-phishing-detection",
         "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")

# What the page reports about itself once loaded (evaluated in the page).
_INSPECT = """(() => ({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, section: i.closest('section')?.id || ''})),
  sections: Array.from(document.querySelectorAll('section')).map(s => ({id: s.id,
    heading: s.querySelector('h2')?.textContent || '',
    height: s.getBoundingClientRect().height})),
  nav: Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href')),
  title: document.title,
  width: document.documentElement.scrollWidth,
  height: document.documentElement.scrollHeight,
}))()"""


def find_chromium() -> str | None:
    """The browser binary: ``$CHROMIUM`` or the first of CANDIDATES on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


@dataclass
class PageView:
    """What the browser showed for one page."""

    console_errors: list[str]
    images: list[dict[str, Any]]
    sections: list[dict[str, Any]]
    nav: list[str]
    title: str
    size: tuple[int, int]
    screenshot: bytes                     # full-page PNG
    timings: dict[str, float] = field(default_factory=dict)


class DevTools:
    """One DevTools websocket session: commands with ids, events collected as they come."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), STEP_TIMEOUT_S)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    async def wait_for(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), STEP_TIMEOUT_S)
            self.events.append(message)
            if message.get("method") == method:
                return message


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and error log entries (failed loads among them)."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                 for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append("exception: " + str(details.get("exception", {}).get("description")
                                             or details.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return found


async def _inspect(port: int, page: Path, width: int) -> PageView:
    import aiohttp

    timings = {}
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        target = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = DevTools(ws)
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                await tools.send(domain)
            await tools.send("Emulation.setDeviceMetricsOverride", width=width, height=900,
                             deviceScaleFactor=1, mobile=False)
            await tools.send("Page.navigate", url=page.resolve().as_uri())
            await tools.wait_for("Page.loadEventFired")
            timings["load_s"] = time.perf_counter() - started
            result = await tools.send("Runtime.evaluate", expression=_INSPECT,
                                      returnByValue=True, awaitPromise=True)
            state = result["result"]["value"]
            shot = await tools.send("Page.captureScreenshot", format="png",
                                    captureBeyondViewport=True)
            timings["total_s"] = time.perf_counter() - started
            return PageView(console_errors=_errors(tools.events), images=state["images"],
                            sections=state["sections"], nav=state["nav"], title=state["title"],
                            size=(state["width"], state["height"]),
                            screenshot=base64.b64decode(shot["data"]), timings=timings)


def _devtools_port(process: subprocess.Popen, profile: Path, log) -> int:
    """The port Chromium chose, from the DevToolsActivePort file it writes when ready."""
    deadline = time.monotonic() + START_TIMEOUT_S
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"chromium exited with status {process.returncode}: "
                               f"{log.read().decode(errors='replace')[-2000:]}")
        if port_file.is_file():
            first = port_file.read_text().splitlines()[:1]
            if first and re.fullmatch(r"\d+", first[0]):
                return int(first[0])
        time.sleep(0.05)
    raise TimeoutError(f"chromium did not open its DevTools port in {START_TIMEOUT_S:.0f} s")


def view_page(page: str | os.PathLike, *, width: int = 1400,
              chromium: str | None = None) -> PageView:
    """Open ``page`` (a local HTML file) in headless Chromium and report what it showed."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary (apt-get install chromium, or set CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="qa-report-browser-") as profile, \
            open(Path(profile).parent / f"{Path(profile).name}.log", "w+b") as log:
        process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=log)
        try:
            port = _devtools_port(process, Path(profile), log)
            return asyncio.run(_inspect(port, Path(page), width))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.unlink(log.name)
