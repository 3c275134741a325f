"""A page as a reader sees it: headless chromium driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: the browser reads commands on fd 3 and writes answers on fd 4, one JSON
message per NUL-terminated chunk; no port, no network). The browser is Debian's chromium, installed by
scripts/ci/browser.sh when missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def find_browser() -> str:
    p = subprocess.run(["bash", str(REPO / "scripts" / "ci" / "browser.sh")], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"scripts/ci/browser.sh failed: {p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1]


class Browser:
    def __init__(self, binary: str, width: int = 1280, height: int = 900):
        self.profile = tempfile.TemporaryDirectory(prefix="dvlm_chromium_")
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # the browser's fd 3 / fd 4, whatever numbers os.pipe() gave us
        args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}", "about:blank"]

        def fds():  # in the child: our pipe ends become its fd 3 and 4 (dup first: they may be 3 or 4 already)
            r, w = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        # close_fds=False: fd 3 / 4 (inheritable after dup2) survive exec; every other fd of ours is
        # close-on-exec (Python's default)
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.width, self.height = width, height
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            ans = self._read(timeout)
            if ans.get("id") == self._id:
                if "error" in ans:
                    raise RuntimeError(f"{method}: {ans['error']}")
                return ans.get("result", {})

    def open(self, url: str, timeout: float = 60) -> None:
        self.call("Page.navigate", session=True, url=url)
        deadline = time.time() + timeout
        while self.eval("document.readyState") != "complete" or not self.eval(
                "Array.from(document.images).every(i => i.complete)"):
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.1)

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", session=True, expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)
        self.profile.cleanup()
