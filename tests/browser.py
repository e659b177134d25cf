"""Drive a real headless Chromium over the DevTools protocol, with the stdlib only.

Tests use it to load a page the way a user's browser would and check what the user would see: console
errors, uncaught exceptions, dialogs, network requests, decoded images, rendered text, a screenshot.

Example:
    >>> with Chromium() as browser:
    ...     page = browser.open(Path("report/index.html").resolve().as_uri(), offline=True)
    ...     page.evaluate("document.title"), page.errors()
    ('bobench report', [])

The DevTools websocket is spoken by a minimal client (:class:`_WebSocket`): text frames, fragmentation,
ping/pong and close, which is all Chromium's endpoint uses; no third-party package needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

__all__ = ["BrowserMissingError", "Chromium", "Page", "find_chromium"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's fixed accept-key suffix


class BrowserMissingError(RuntimeError):
    """No Chromium on this machine (``make test`` installs Debian's ``chromium`` package)."""


def find_chromium() -> str:
    """Path of a Chromium/Chrome binary: ``$CHROMIUM``, else the first of the usual names on PATH.

    Raises:
        BrowserMissingError: none found; the message says how to install it.
    """
    for name in (os.environ.get("CHROMIUM", ""), *_CANDIDATES):
        if name and (path := shutil.which(name)):
            return path
    raise BrowserMissingError(
        "Chromium is not installed; `make test` installs it (Debian: "
        "apt-get install -y --no-install-recommends chromium), or set $CHROMIUM to a Chrome binary"
    )


class _WebSocket:
    """Blocking RFC 6455 client: masked text frames out, (fragmented) text frames in."""

    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        self._sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall(
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if not head.startswith(b"HTTP/1.1 101") or accept.encode() not in head:
            raise ConnectionError(f"websocket handshake with {url} failed: {head[:200]!r}")

    def _fill(self) -> None:
        chunk = self._sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("DevTools websocket closed by the browser")
        self._buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)  # clients must mask every frame
        masked = int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        self._sock.sendall(header + mask + (masked.to_bytes(n, "big") if n else b""))

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        """The next complete text message (pings are answered on the way)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8))
            mask = self._take(4) if b1 & 0x80 else b""
            payload = self._take(n)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools websocket closed by the browser")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self._sock.close()


class Page:
    """One tab, attached in flat mode; it records what the page did while we drove it.

    Attributes:
        console: ``(level, text)`` of console API calls (``console.log``, ``console.error``, ...).
        log: ``(level, text)`` of browser log entries (CSP violations, failed loads, ...).
        exceptions: text of uncaught exceptions.
        dialogs: messages of ``alert``/``confirm``/``prompt`` dialogs (each is dismissed at once).
        requests: URLs the page requested (documents, images, ...; ``data:`` URLs included).
    """

    def __init__(self, browser: Chromium, session: str) -> None:
        self._browser, self._session = browser, session
        self.console: list[tuple[str, str]] = []
        self.log: list[tuple[str, str]] = []
        self.exceptions: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self._events: list[str] = []

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call a DevTools method in this tab and return its result."""
        return self._browser.send(method, params, session=self._session)

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        self._events.append(method)
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append((params.get("type", ""), text))
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
        elif method == "Log.entryAdded":
            self.log.append((params["entry"]["level"], params["entry"]["text"]))
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            # A dialog blocks the page until handled: dismiss it without waiting for the reply.
            self._browser.post("Page.handleJavaScriptDialog", {"accept": False}, session=self._session)
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])

    def wait_for(self, event: str, timeout: float | None = None) -> None:
        """Block until this tab has received ``event`` (e.g. ``Page.loadEventFired``)."""
        deadline = time.monotonic() + (timeout or self._browser.timeout)
        while event not in self._events:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout or self._browser.timeout} s")
            self._browser.pump()

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """Value of a JS expression in the page (JSON-serialisable results only).

        Raises:
            RuntimeError: the expression threw.
        """
        r = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def images(self) -> list[dict[str, Any]]:
        """Every ``<img>``: ``{"alt", "width", "height"}`` natural size once decoded (0 if it cannot be)."""
        js = """Promise.all([...document.images].map(img => img.decode().then(() => 0, () => 0).then(() =>
            ({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight}))))"""
        return self.evaluate(js, await_promise=True)

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """Save a PNG of the viewport, or of the whole page when ``full_page``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params |= {"captureBeyondViewport": True, "clip": {**size, "x": 0, "y": 0, "scale": 1}}
        data = self.send("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[str]:
        """Console errors, error-level log entries and uncaught exceptions, as text."""
        return [
            *(f"console.{lvl}: {t}" for lvl, t in self.console if lvl in ("error", "assert")),
            *(f"log {lvl}: {t}" for lvl, t in self.log if lvl == "error"),
            *(f"exception: {t}" for t in self.exceptions),
        ]


class Chromium:
    """A headless Chromium process and its DevTools connection; use as a context manager.

    Args:
        binary: browser executable (default: :func:`find_chromium`).
        timeout: seconds any single wait (start, command, load) may take: a hang guard only, generous
            so that a busy 2-core CI machine never reaches it.
        width, height: viewport size of new tabs.
    """

    def __init__(self, binary: str | None = None, *, timeout: float = 120.0, width: int = 1280,
                 height: int = 900) -> None:  # fmt: skip
        self.binary = binary or find_chromium()
        self.timeout, self.width, self.height = timeout, width, height
        self._next_id = 0
        self._pages: dict[str, Page] = {}
        self._replies: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> Chromium:
        self._dir = Path(tempfile.mkdtemp(prefix="bobench-chromium-"))
        stderr = (self._dir / "stderr.log").open("wb")
        cmd = [
            self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
            f"--user-data-dir={self._dir / 'profile'}", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", "about:blank",
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        try:
            self._ws = _WebSocket(self._devtools_url(), self.timeout)
        except BaseException:
            self._stop()
            raise
        return self

    def _devtools_url(self) -> str:
        # Chromium prints the browser endpoint to stderr once its random port is bound.
        deadline = time.monotonic() + self.timeout
        log = self._dir / "stderr.log"
        while time.monotonic() < deadline:
            if m := _LISTENING.search(log.read_text(errors="replace")):
                return m.group(1)
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.binary} exited with {self._proc.returncode}: {log.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.binary} printed no DevTools URL in {self.timeout} s: {log.read_text()[-2000:]}"
        )

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if hasattr(self, "_ws"):
            with contextlib.suppress(OSError):
                self.post("Browser.close")
            self._ws.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def post(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> int:
        """Send a command without waiting; returns its id."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._ws.send(json.dumps(msg))
        return self._next_id

    def pump(self) -> None:
        """Read one message: file a reply by id, or hand an event to its tab."""
        msg = json.loads(self._ws.recv())
        if "id" in msg:
            self._replies[msg["id"]] = msg
        elif (page := self._pages.get(msg.get("sessionId", ""))) is not None:
            page._on_event(msg["method"], msg.get("params", {}))

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> dict:
        """Call a DevTools method and return its result, handling events that arrive meanwhile.

        Raises:
            RuntimeError: the browser answered with an error.
            TimeoutError: no answer within ``timeout``.
        """
        wanted = self.post(method, params, session=session)
        deadline = time.monotonic() + self.timeout
        while wanted not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {method} within {self.timeout} s")
            self.pump()
        reply = self._replies.pop(wanted)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, *, offline: bool = False) -> Page:
        """A new tab that has loaded ``url`` (its load event fired), optionally with the network cut.

        Raises:
            RuntimeError: navigation failed (the browser's error text is in the message).
        """
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = self._pages[session] = Page(self, session)
        for domain in ("Runtime", "Log", "Page", "Network"):
            page.send(f"{domain}.enable")
        metrics = {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}
        page.send("Emulation.setDeviceMetricsOverride", metrics)
        if offline:
            conditions = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
            page.send("Network.emulateNetworkConditions", conditions)
        nav = page.send("Page.navigate", {"url": url})
        if nav.get("errorText"):
            raise RuntimeError(f"cannot load {url}: {nav['errorText']}")
        page.wait_for("Page.loadEventFired")
        return page
