"""Open a page in the distribution's headless Chromium (/usr/bin/chromium, Debian package
`chromium`), through the DevTools protocol: console errors, exceptions, every request the page
made, its text, and a full-page screenshot. Chromium is started here and stopped by its PID."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,900", "--remote-debugging-port=0"]


def executable() -> str | None:
    return shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None


def open_page(url: str, screenshot: Path, timeout: float = 60.0) -> dict:
    """Loads `url`; returns {console_errors, requests, text, screenshot}."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    proc = subprocess.Popen([executable(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        return asyncio.run(asyncio.wait_for(_drive(page["webSocketDebuggerUrl"], url, screenshot), timeout))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the browser and its helpers, by PID
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws_url: str, url: str, screenshot: Path) -> dict:
    import aiohttp

    errors, requests, pending, counter = [], [], {}, iter(range(1, 10**6))
    loaded = asyncio.Event()
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:

        async def reader():
            async for msg in ws:
                data = json.loads(msg.data)
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                method, params = data.get("method"), data.get("params", {})
                if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                    errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
                elif method == "Runtime.exceptionThrown":
                    errors.append(params["exceptionDetails"].get("text", "exception"))
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    errors.append(params["entry"]["text"])
                elif method == "Network.requestWillBeSent":
                    requests.append(params["request"]["url"])
                elif method == "Page.loadEventFired":
                    loaded.set()

        async def call(method: str, **params) -> dict:
            i = next(counter)
            pending[i] = asyncio.get_running_loop().create_future()
            await ws.send_json({"id": i, "method": method, "params": params})
            reply = await pending[i]
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

        task = asyncio.create_task(reader())
        for domain in ("Runtime", "Log", "Network", "Page"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        await loaded.wait()
        await asyncio.sleep(0.5)  # late console messages
        text = (await call("Runtime.evaluate", expression="document.body.innerText"))["result"]["value"]
        size = (await call("Page.getLayoutMetrics"))["cssContentSize"]
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        task.cancel()
    return {"console_errors": errors, "requests": requests, "text": text, "screenshot": screenshot}
