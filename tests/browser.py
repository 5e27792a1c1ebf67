"""A real browser for the tests: headless Chromium (Debian's ``chromium``) driven over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ending in NUL, on
file descriptors 3 and 4), with nothing but the standard library.

:func:`open_page` loads a file, waits for its load event and returns a :class:`Page`, whose
:meth:`Page.evaluate` runs JavaScript in it and whose ``errors`` are every error the page
raised or logged (exceptions, ``console.error``, failed loads of its resources).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",  # as root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no connections out of a closed network
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError(
            "these tests need Chromium: `apt-get install chromium` (.ci/run installs it)"
        )
    return found


@dataclass
class Page:
    proc: subprocess.Popen[bytes]
    send_fd: int
    recv: Any
    session: str = ""
    next_id: int = 0
    errors: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    buffer: bytes = b""

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict[str, Any]:
        end = time.monotonic() + timeout
        for seen in self.events:
            if seen.get("method") == method:
                return seen
        while time.monotonic() < end:
            event = self._read()
            self._event(event)
            if event.get("method") == method:
                return event
        raise TimeoutError(f"no {method} in {timeout} s")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            chunk = os.read(self.recv, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(f"console.error: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text')}")


@contextlib.contextmanager
def open_page(path: Path, width: int = 1400, height: int = 1000) -> Iterator[Page]:
    """``path`` loaded in headless Chromium, in a window of ``width`` x ``height``."""
    to_browser, from_us = os.pipe()  # Chromium reads commands on fd 3
    from_browser, to_us = os.pipe()  # and writes replies on fd 4
    profile = tempfile.mkdtemp(prefix="layoutc-chromium-")
    argv = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]

    def fds() -> None:
        os.dup2(to_browser, 3)
        os.dup2(to_us, 4)

    proc = subprocess.Popen(
        argv,
        pass_fds=(3, 4),  # kept open once fds() has put the pipes there
        preexec_fn=fds,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_browser)
    os.close(to_us)
    page = Page(proc, from_us, from_browser)
    try:
        target = page.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = page.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        page.call("Page.navigate", {"url": path.resolve().as_uri()})
        page.wait_for("Page.loadEventFired")
        yield page
    finally:
        with contextlib.suppress(Exception):
            page.call("Browser.close", session=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(from_us)
        os.close(from_browser)
        shutil.rmtree(profile, ignore_errors=True)
