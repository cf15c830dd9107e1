"""Headless Chromium driven over the DevTools protocol, as a person uses a page: load it, type into fields, press
buttons, read what is shown, take a screenshot. A few calls of the protocol over tornado's WebSocket client."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect


class Chromium:
    """One headless Chromium with one page, `width` × `height` CSS pixels. Use `async with`."""

    def __init__(self, profile: Path, width: int, height: int) -> None:
        self.profile, self.width, self.height = profile, width, height
        self._ids = itertools.count(1)
        self._process: subprocess.Popen[str] | None = None
        self._socket: WebSocketClientConnection | None = None
        self._session = ""
        self._drain = threading.Thread()

    async def __aenter__(self) -> Chromium:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is needed (make test installs Debian's chromium package)"
        # The page's certificate comes from Vigie's CA, which the MDM installs on real devices; this throwaway
        # profile has no trust store to add it to. TLS itself is checked with curl --cacert in the tests.
        self._process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--disable-background-networking", "--ignore-certificate-errors", "--remote-debugging-port=0",
             "--accept-lang=fr-FR,fr",  # a French school's devices
             f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}", "about:blank"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert self._process.stderr is not None
        url = None
        for _ in range(200):
            line = await asyncio.to_thread(self._process.stderr.readline)
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url, "Chromium did not start its DevTools endpoint"
        # Chromium goes on logging: read it away, or a full pipe would stop the browser.
        self._drain = threading.Thread(target=self._process.stderr.read, daemon=True)
        self._drain.start()
        self._socket = await websocket_connect(url, max_message_size=64 * 1024 * 1024)
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self._session = attached["sessionId"]
        await self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._socket is not None:
            self._socket.close()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._drain.join(10)  # the browser has gone: its stderr ends
            if self._process.stderr is not None:
                self._process.stderr.close()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._socket is not None
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if self._session and not method.startswith("Target."):
            message["sessionId"] = self._session
        await self._socket.write_message(json.dumps(message))
        while True:
            raw = await asyncio.wait_for(self._socket.read_message(), 30)
            assert raw is not None, "Chromium closed the connection"
            answer = json.loads(raw)
            if answer.get("id") == message_id:
                assert "error" not in answer, answer["error"]
                result: dict[str, Any] = answer.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_loaded()

    async def wait_loaded(self) -> None:
        await asyncio.sleep(0.2)
        for _ in range(100):
            if await self.evaluate("document.readyState") == "complete":
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the page did not finish loading")

    async def fill(self, selector: str, text: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(text)}")

    async def press(self, selector: str) -> None:
        """Click a button as a finger or a mouse would, and wait for the page it leads to."""
        await self.evaluate("window.vigieOldPage = true")
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        for _ in range(150):
            await asyncio.sleep(0.1)
            try:
                if await self.evaluate("window.vigieOldPage === undefined && document.readyState === 'complete'"):
                    return
            except AssertionError:
                continue  # the old page went away between two questions
        raise AssertionError("the button led to no new page")

    async def text(self) -> str:
        value: str = await self.evaluate("document.body.innerText")
        return value

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
