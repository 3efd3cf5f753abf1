"""The chat page in a real headless Chromium on a phone-sized screen, driven over the DevTools protocol
(its --remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4, so no websocket client is
needed). Types, sends with Enter, watches the reply stream in, regenerates, edits, uses slash commands
and sees the error line once the server is gone. Skipped when Chromium is not installed
(.ci/run installs it from Debian packages)."""
import base64
import json
import queue
import shutil
import subprocess
import threading
import time

import pytest

from test_serve import make_replicas, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed: `apt-get install chromium` "
                                                         "(.ci/run does) to test the chat page in a browser")


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, profile_dir):
        # the shell moves our pipes to the fds Chromium reads (3) and writes (4) DevTools messages on
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", "about:blank"]
        self.proc = subprocess.Popen(["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', CHROMIUM, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.replies, self.next_id = queue.Queue(), 0
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 30
        while not (pages := [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]):
            assert time.time() < deadline, "Chromium opened no page"
            time.sleep(0.1)
        self.session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]

    def _read(self):
        buffer = b""
        while chunk := self.proc.stdout.read1(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in map(json.loads, messages):
                if "id" in message:  # replies; events are not needed
                    self.replies.put(message)

    def call(self, method, session=None, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        while True:
            reply = self.replies.get(timeout=30)
            if reply["id"] == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def page(self, method, **params):
        return self.call(method, self.session, **params)

    def js(self, expression):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression, timeout=20):
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def click(self, selector):
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def type(self, text):
        self.page("Input.insertText", text=text)

    def key_enter(self, shift=False):
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      modifiers=8 if shift else 0, **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.proc.kill()
        self.proc.wait()


def texts(browser, selector):
    return browser.js(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)")


def test_chat_page_streams_regenerates_edits_and_reports_errors(tmp_path):
    replicas = make_replicas(1)
    model, tok = replicas[0].model, replicas[0].tokenizer
    model.delay = 0.03  # ~30 tokens a second: the reply visibly streams in
    end, special = tok.encode_special("<|assistant_end|>"), tok.encode_special
    model.script = [*tok.encode("hello there, it is "), special("<|python_start|>"), *tok.encode("2+3"),
                    special("<|python_end|>"), None, None, None, *tok.encode(" ok"), end]
    server = start_server(replicas, model_name="tiny-chat")
    browser = Browser(tmp_path / "profile")
    try:
        browser.page("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
        browser.page("Page.navigate", url=f"http://127.0.0.1:{server.server_address[1]}/")
        browser.wait_for("document.title === 'tiny-chat'")  # the page loaded and asked /health
        # every text length the reply shows while it streams
        browser.js("""window.seen = []; new MutationObserver(() => { const m = document.querySelector('.msg.assistant');
                      if (m) seen.push(m.textContent.length); }).observe(document.getElementById('messages'),
                      {subtree: true, childList: true, characterData: true}); true""")
        browser.click("#input")
        browser.type("line one")
        browser.key_enter(shift=True)  # a newline, not a send
        browser.type("line two")
        assert browser.js("document.getElementById('input').value") == "line one\nline two"
        browser.key_enter()
        browser.wait_for("!document.body.classList.contains('busy') && !!document.querySelector('.msg.assistant')")
        assert texts(browser, ".msg.user") == ["line one\nline two"]
        assert texts(browser, ".msg.assistant") == ["hello there, it is 2+35 ok"]
        assert texts(browser, ".msg.assistant .tool.python") == ["2+3"]  # the calculator call, shown apart
        assert texts(browser, ".msg.assistant .tool.python_output") == ["5"]
        assert len(set(browser.js("seen")) - {0}) >= 5  # it grew piece by piece
        assert browser.js("document.documentElement.scrollWidth") <= 390  # fits the phone, no sideways scroll
        browser.screenshot(tmp_path / "chat-phone.png")  # to look at: pytest --basetemp=DIR

        model.script = [*tok.encode("a new answer"), end]  # regenerate: click the reply
        browser.click(".msg.assistant")
        browser.wait_for("document.querySelector('.msg.assistant')?.textContent === 'a new answer'")
        browser.wait_for("!document.body.classList.contains('busy')")
        assert texts(browser, ".msg.user") == ["line one\nline two"] and len(texts(browser, ".msg.assistant")) == 1

        browser.click(".msg.user")  # edit: the message returns to the input, it and its reply leave the chat
        assert browser.js("document.getElementById('input').value") == "line one\nline two"
        assert texts(browser, ".msg") == []
        model.script = [*tok.encode("edited"), end]
        browser.type("!")
        browser.key_enter()
        browser.wait_for("document.querySelector('.msg.assistant')?.textContent === 'edited'")
        assert texts(browser, ".msg.user") == ["line one\nline two!"]
        browser.wait_for("!document.body.classList.contains('busy')")

        for command in ("/temperature 0.5", "/topk", "/help"):
            browser.type(command)
            browser.key_enter()
        browser.screenshot(tmp_path / "chat-phone-commands.png")
        consoles = texts(browser, ".msg.console")
        assert consoles[0] == "temperature set to 0.5" and consoles[1] == "top-k is 50" and "/clear" in consoles[2]
        assert server.counts["completions"] == 3  # commands are not sent to the model
        browser.type("/clear")
        browser.key_enter()
        assert texts(browser, ".msg") == []

        server.shutdown()  # the server goes away: the page says so and keeps the question
        server.server_close()
        browser.type("are you there?")
        browser.key_enter()
        browser.wait_for("document.getElementById('status').textContent.includes('Cannot reach the server')")
        assert browser.js("document.getElementById('input').value") == "are you there?"
        browser.screenshot(tmp_path / "chat-phone-error.png")
    finally:
        browser.close()
        server.server_close()
