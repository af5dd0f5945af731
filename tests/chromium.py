"""A real headless Chromium (Debian package ``chromium``, installed by ``make chromium``) driven
over the Chrome DevTools Protocol with the ``websockets`` package, for tests of HTML pages.

* :class:`Chromium` starts the browser in its own session with the flags of
  docs/field-notes.md, a fresh
  ``--user-data-dir`` and ``--remote-debugging-port=0``, and reads the ``DevTools listening on
  ws://...`` line Chromium prints on stderr (no polling of the port); it ends the process group
  by PID.
* :meth:`Chromium.open` loads a page in a new tab and records every JavaScript error: uncaught
  exceptions (``Runtime.exceptionThrown``), ``console.error`` (``Runtime.consoleAPICalled``)
  and browser log errors (``Log.entryAdded``); CDP reference:
  https://chromedevtools.github.io/devtools-protocol/ (Target, Page, Runtime, Log domains).
* :func:`png_pixels` decodes a PNG screenshot with the standard library (zlib; PNG filter
  types 0-4 of the PNG specification, section 9) so tests can tell a blank image from a drawn
  one.
* :func:`dump_dom` runs ``chromium --headless --dump-dom`` (DOM after scripts ran).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


# Plotly.newPlot draws asynchronously: wait frame by frame (awaiting requestAnimationFrame, no
# timer) until every plot has its SVG; then describe each plot and where it is on the page.
WAIT_FOR_PLOTS_JS = """
(async () => {
  for (let i = 0; i < 1200; i++) {
    const gds = [...document.querySelectorAll('.js-plotly-plot')];
    if (gds.length && gds.every(g => g._fullLayout && g.querySelector('svg.main-svg'))) {
      return gds.map(g => {
        const r = g.getBoundingClientRect();
        return {id: g.id, type: g.data[0].type, traces: g.data.length,
                x: r.left + window.scrollX, y: r.top + window.scrollY,
                width: r.width, height: r.height,
                drawn: g.querySelectorAll('.scatterlayer .trace, .heatmaplayer image, ' +
                                          '.barlayer .trace').length};
      });
    }
    await new Promise(r => requestAnimationFrame(r));
  }
  return null;
})()
"""


def chromium_binary() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )


def dump_dom(url: str, user_data_dir: Path, budget_ms: int = 20_000) -> str:
    """The DOM after the page's scripts ran (``--virtual-time-budget`` lets timers finish)."""
    binary = chromium_binary()
    assert binary, "chromium is not installed: run `make chromium`"
    proc = subprocess.run(
        [
            binary,
            *FLAGS,
            f"--user-data-dir={user_data_dir}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout


@dataclass
class Page:
    """One tab: ``evaluate`` JavaScript, take screenshots; ``errors`` collects JS errors."""

    ws: Any
    session_id: str
    errors: list[str] = field(default_factory=list)
    _next_id: int = 0
    _waiters: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    _events: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        mid = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[mid] = fut
        msg = {"id": mid, "method": method, "params": params or {}, "sessionId": self.session_id}
        await self.ws.send(json.dumps(msg))
        return await fut

    def expect(self, event: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._events[event] = fut
        return fut

    def dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg and msg["id"] in self._waiters:
            fut = self._waiters.pop(msg["id"])
            if "error" in msg:
                fut.set_exception(RuntimeError(f"CDP error: {msg['error']}"))
            else:
                fut.set_result(msg.get("result"))
            return
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append(
                f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}"
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(
                "console.error: " + " ".join(str(a.get("value", a)) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url')}")
        fut = self._events.pop(method, None) if method else None
        if fut is not None and not fut.done():
            fut.set_result(params)

    async def evaluate(self, expression: str) -> Any:
        """Value of ``expression`` (promises awaited); raises on a JS exception."""
        res = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS exception: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        res = await self.send("Page.captureScreenshot", params)
        return base64.b64decode(res["data"])


class Chromium:
    """A headless Chromium with the DevTools protocol on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_url = ""
        self.log_path = workdir / "chromium.log"
        self._drain: threading.Thread | None = None

    def start(self) -> None:
        binary = chromium_binary()
        assert binary, "chromium is not installed: run `make chromium`"
        profile = self.workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--enable-logging=stderr",
                "--v=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        log = self.log_path.open("wb")
        for raw in self.proc.stderr:  # blocks until Chromium says where it listens
            log.write(raw)
            line = raw.decode(errors="replace")
            if "DevTools listening on " in line:
                self.ws_url = line.split("DevTools listening on ", 1)[1].strip()
                break
        else:
            log.close()
            raise RuntimeError(f"chromium exited before listening: {self.log_path.read_text()}")
        stream = self.proc.stderr

        def drain() -> None:
            with log:
                for chunk in stream:
                    log.write(chunk)

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self._drain is not None:
            self._drain.join(timeout=10)
        self.proc = None

    @contextmanager
    def running(self) -> Iterator[Chromium]:
        self.start()
        try:
            yield self
        finally:
            self.close()

    async def open(self, url: str, width: int = 1280, height: int = 900) -> tuple[Any, Page]:
        """Connect, open ``url`` in a new tab, wait for its load event; returns the socket (to
        close) and the page. JS errors from the start of loading are in ``page.errors``."""
        from websockets.asyncio.client import connect

        ws = await connect(self.ws_url, max_size=None)
        pending: dict[int, asyncio.Future[Any]] = {}

        async def browser_call(mid: int, method: str, params: dict[str, Any]) -> Any:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            pending[mid] = fut
            await ws.send(json.dumps({"id": mid, "method": method, "params": params}))
            return await fut

        pages: list[Page] = []

        async def reader() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if "sessionId" in msg and pages:
                    pages[0].dispatch(msg)
                elif msg.get("id") in pending:
                    pending.pop(msg["id"]).set_result(msg.get("result"))

        task = asyncio.get_running_loop().create_task(reader())
        target = await browser_call(-1, "Target.createTarget", {"url": "about:blank"})
        attached = await browser_call(
            -2, "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(ws, attached["sessionId"])
        pages.append(page)
        page._reader = task  # type: ignore[attr-defined]  # keep the task referenced
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await page.send(domain)
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        loaded = page.expect("Page.loadEventFired")
        await page.send("Page.navigate", {"url": url})
        await asyncio.wait_for(loaded, timeout=60)
        return ws, page


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    i = 0
    for _ in range(height):
        ftype = raw[i]
        line = bytearray(raw[i + 1 : i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if ftype == 1:
                line[x] = (line[x] + a) & 0xFF
            elif ftype == 2:
                line[x] = (line[x] + b) & 0xFF
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def colour_stats(png: bytes) -> tuple[int, float]:
    """(distinct colours, fraction of pixels that are not white) of a PNG screenshot."""
    width, height, rows = png_pixels(png)
    channels = len(rows[0]) // width
    colours: set[bytes] = set()
    non_white = 0
    for row in rows:
        for x in range(0, len(row), channels):
            px = row[x : x + 3]
            colours.add(px)
            if px != b"\xff\xff\xff":
                non_white += 1
    return len(colours), non_white / (width * height)
