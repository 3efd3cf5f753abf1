"""The chat page in a real headless Chromium, driven over the DevTools protocol (its
--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4, so no websocket client is needed).
Types, sends with Enter, watches the reply stream in, regenerates and edits with the buttons (a plain
click on a message must do nothing), switches back to earlier versions, renders markdown without ever
running HTML from the model, stops a reply, sends the settings panel's values, and sees the error line
once the server is gone. Screenshots (light, dark, phone) land in the test's tmp dir: look at them with
`pytest --basetemp=DIR`. Skipped when Chromium is not installed (.ci/run installs it from Debian packages)."""
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

    def screen(self, width=390, height=844, mobile=True):  # a phone by default
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=2 if mobile else 1,
                  mobile=mobile)

    def color_scheme(self, scheme):  # what prefers-color-scheme answers: "light" or "dark"
        self.page("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": scheme}])

    def open(self, url, **screen):
        self.screen(**screen)
        self.color_scheme("light")
        self.page("Page.navigate", url=url)
        self.wait_for("!!document.getElementById('model-name')?.textContent")  # loaded, and /health answered

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.proc.kill()
        self.proc.wait()


def texts(browser, selector):
    return browser.js(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)")


def idle(browser):
    browser.wait_for("!document.body.classList.contains('busy')")


def send(browser, text):
    browser.click("#input")
    browser.type(text)
    browser.key_enter()


@pytest.fixture
def chat(tmp_path):
    """A served page with one steered tiny model, and a browser to open it with."""
    replicas = make_replicas(1)
    server = start_server(replicas, model_name="nanochat-sft-d20")
    browser = Browser(tmp_path / "profile")
    replica = replicas[0]
    try:
        yield server, browser, replica.model, replica.tokenizer, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


def test_chat_page_streams_regenerates_edits_and_reports_errors(chat, tmp_path):
    server, browser, model, tok, url = chat
    model.delay = 0.03  # ~30 tokens a second: the reply visibly streams in
    end, special = tok.encode_special("<|assistant_end|>"), tok.encode_special
    model.script = [*tok.encode("hello there, it is "), special("<|python_start|>"), *tok.encode("2+3"),
                    special("<|python_end|>"), None, None, None, *tok.encode(" ok"), end]
    browser.open(url)
    assert browser.js("document.title") == "nanochat-sft-d20"
    assert texts(browser, "#model-name") == ["nanochat-sft-d20"]  # the model's name is in the header
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
    browser.wait_for("!!document.querySelector('.msg.assistant')")
    idle(browser)
    assert texts(browser, ".msg.user") == ["line one\nline two"]
    assert texts(browser, ".msg.assistant") == ["hello there, it is 2+35 ok"]
    assert texts(browser, ".msg.assistant .tool.python") == ["2+3"]  # the calculator call, shown apart
    assert texts(browser, ".msg.assistant .tool.python_output") == ["5"]
    assert len(set(browser.js("seen")) - {0}) >= 5  # it grew piece by piece
    assert browser.js("document.documentElement.scrollWidth") <= 390  # fits the phone, no sideways scroll
    browser.screenshot(tmp_path / "chat-phone.png")

    for selector in (".msg.user", ".msg.assistant"):  # a stray click or tap on a message changes nothing
        browser.click(selector)
    time.sleep(0.3)
    assert not browser.js("document.body.classList.contains('busy')") and server.counts["completions"] == 1
    assert texts(browser, ".msg") == ["line one\nline two", "hello there, it is 2+35 ok"]

    model.script = [*tok.encode("a new answer"), end]  # Regenerate: a second version, the first one kept
    browser.click(".turn.assistant [data-action=regenerate]")
    browser.wait_for("document.querySelector('.msg.assistant')?.textContent === 'a new answer'")
    idle(browser)
    assert texts(browser, ".msg.user") == ["line one\nline two"] and len(texts(browser, ".msg.assistant")) == 1
    assert texts(browser, ".turn.assistant .versions") == ["\u20392/2\u203a"]
    browser.click(".turn.assistant [data-action=previous]")  # the old reply is one click away
    assert texts(browser, ".msg.assistant") == ["hello there, it is 2+35 ok"]
    browser.click(".turn.assistant [data-action=next]")
    assert texts(browser, ".msg.assistant") == ["a new answer"]

    browser.click(".turn.user [data-action=edit]")  # Edit: an editor in place, the chat is untouched
    assert browser.js("document.querySelector('.editor textarea').value") == "line one\nline two"
    browser.click(".editor [data-action=cancel]")
    assert texts(browser, ".msg") == ["line one\nline two", "a new answer"]
    browser.click(".turn.user [data-action=edit]")
    browser.screenshot(tmp_path / "chat-phone-editing.png")
    model.script = [*tok.encode("edited"), end]
    browser.type("!")  # the editor has the focus, its caret at the end
    browser.key_enter()
    browser.wait_for("document.querySelector('.msg.assistant')?.textContent === 'edited'")
    idle(browser)
    assert texts(browser, ".msg") == ["line one\nline two!", "edited"]
    browser.click(".turn.user [data-action=previous]")  # the original question, with both its replies
    assert texts(browser, ".msg") == ["line one\nline two", "a new answer"]
    browser.click(".turn.user [data-action=next]")

    for command in ("/temperature 0.5", "/topk", "/help"):
        send(browser, command)
    browser.screenshot(tmp_path / "chat-phone-commands.png")
    consoles = texts(browser, ".msg.console")
    assert consoles[0] == "temperature set to 0.5" and consoles[1] == "top-k is 50" and "/clear" in consoles[2]
    assert browser.js("document.getElementById('set-temperature').value") == "0.5"  # the panel shows it too
    assert server.counts["completions"] == 3  # commands are not sent to the model
    send(browser, "/clear")
    assert texts(browser, ".msg") == []

    server.shutdown()  # the server goes away: the page says so and keeps the question
    server.server_close()
    send(browser, "are you there?")
    browser.wait_for("document.getElementById('status').textContent.includes('Cannot reach the server')")
    assert browser.js("document.getElementById('input').value") == "are you there?"
    browser.screenshot(tmp_path / "chat-phone-error.png")


def test_model_output_is_shown_as_text_never_run_as_html(chat):
    server, browser, model, tok, url = chat
    hostile = ('<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>\n'
               "# <svg onload=window.pwned=3>\n"
               "**<img src=x onerror=window.pwned=4>** `<b>code</b>`\n"
               "- [bad](javascript:window.pwned=5) [quote](https://a.example/\"onmouseover=\"window.pwned=6)\n"
               "```\n</code></pre><img src=x onerror=window.pwned=7>\n```")
    model.script = [*tok.encode(hostile), tok.encode_special("<|assistant_end|>")]
    browser.open(url)
    send(browser, "hi")
    browser.wait_for("!!document.querySelector('.msg.assistant')")
    idle(browser)
    time.sleep(0.3)  # time for an onerror to fire, were there an image
    assert browser.js("window.pwned") is None
    reply = ".msg.assistant"
    assert browser.js(f"document.querySelectorAll('{reply} img, {reply} script, {reply} svg, {reply} b').length") == 0
    shown = texts(browser, reply)[0]
    for piece in ('<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>", "<svg onload=window.pwned=3>",
                  "<b>code</b>", "[bad](javascript:window.pwned=5)", "</code></pre><img src=x onerror=window.pwned=7>"):
        assert piece in shown
    assert texts(browser, f"{reply} h1") == ["<svg onload=window.pwned=3>"]  # markdown still works around it
    assert texts(browser, f"{reply} strong") == ["<img src=x onerror=window.pwned=4>"]
    links = browser.js(f"""[...document.querySelectorAll('{reply} a')].map(a =>
                          [...a.attributes].map(x => x.name + '=' + x.value).sort())""")
    assert links == [['href=https://a.example/"onmouseover="window.pwned=6', "rel=noopener noreferrer", "target=_blank"]]


MARKDOWN = ("## A plan\nSome **bold**, *italic* and `inline code`; see [the docs](https://example.com/a_b).\n\n"
            "- first\n- second with **more**\n\n1. one\n2. two\n\n"
            "```python\nprint('a line far too long for a phone screen to hold without scrolling it')\n```\nDone.")


def test_markdown_renders_and_copies_in_light_dark_and_phone(chat, tmp_path):
    server, browser, model, tok, url = chat
    model.script = [*tok.encode(MARKDOWN), tok.encode_special("<|assistant_end|>")]
    browser.open(url, width=900, height=700, mobile=False)
    browser.click("#settings-toggle")  # the settings panel, open for the screenshots
    send(browser, "make a plan")
    browser.wait_for("!!document.querySelector('.msg.assistant')")
    idle(browser)
    reply = ".msg.assistant"
    assert texts(browser, f"{reply} h2") == ["A plan"]
    assert texts(browser, f"{reply} strong") == ["bold", "more"] and texts(browser, f"{reply} em") == ["italic"]
    assert texts(browser, f"{reply} ul > li") == ["first", "second with more"]
    assert texts(browser, f"{reply} ol > li") == ["one", "two"]
    assert texts(browser, f"{reply} p > code") == ["inline code"]
    assert browser.js(f"document.querySelector('{reply} a').href") == "https://example.com/a_b"
    code = "print('a line far too long for a phone screen to hold without scrolling it')"
    assert texts(browser, f"{reply} pre code") == [code]
    assert texts(browser, f"{reply} p")[-1] == "Done."
    assert texts(browser, ".msg.user") == ["make a plan"]  # people's own text is not markdown
    # a stand-in clipboard: headless Chromium's real one needs permissions and focus
    browser.js("""Object.defineProperty(navigator, 'clipboard', {configurable: true,
                  value: {writeText: async (text) => { window.copied = text; }}}); true""")
    browser.click(".code [data-action=copy-code]")
    assert browser.wait_for("window.copied") == code
    browser.click(".turn.assistant [data-action=copy]")
    browser.wait_for("window.copied !== " + json.dumps(code))
    assert browser.js("window.copied") == MARKDOWN and texts(browser, ".turn.assistant [data-action=copy]") == ["Copied"]
    browser.screenshot(tmp_path / "chat-light.png")

    background = "getComputedStyle(document.body).backgroundColor"
    light = browser.js(background)
    browser.color_scheme("dark")
    assert browser.js(background) != light and light == "rgb(255, 255, 255)"  # dark mode follows the system
    browser.screenshot(tmp_path / "chat-dark.png")

    browser.color_scheme("light")
    browser.screen()
    assert browser.js("document.documentElement.scrollWidth") <= 390  # the long code line scrolls in its box
    assert browser.js("document.querySelector('.code pre').scrollWidth > document.querySelector('.code pre').clientWidth")
    browser.screenshot(tmp_path / "chat-phone-markdown.png")


def test_settings_panel_values_go_with_each_request(chat):
    server, browser, model, tok, url = chat
    model.script = [*tok.encode("one two three four five"), tok.encode_special("<|assistant_end|>")]
    browser.open(url)
    browser.js("""window.sent = []; const realFetch = window.fetch; window.fetch = (url, options) => {
                  if (options && options.body) sent.push(JSON.parse(options.body));
                  return realFetch(url, options); }; true""")  # a record of each request the page sends
    assert browser.js("document.getElementById('settings').hidden")
    browser.click("#settings-toggle")
    assert browser.js("document.getElementById('set-top_k').placeholder") == "50"  # the server's defaults
    for field, value in (("#set-temperature", "0.3"), ("#set-top_k", "7"), ("#set-max_tokens", "3")):
        browser.click(field)
        browser.type(value)
    send(browser, "count")  # leaving the last field commits it
    browser.wait_for("!!document.querySelector('.msg.assistant')?.textContent")
    idle(browser)
    sampling = {k: v for k, v in browser.js("sent[0]").items() if k != "messages"}
    assert sampling == {"temperature": 0.3, "top_k": 7, "max_tokens": 3}
    assert texts(browser, ".msg.assistant") == [tok.decode(model.script[:3])]  # the server honoured max_tokens

    browser.click("#set-top_k")  # out of range: refused, said so, and the field shows what is in force
    browser.js("document.getElementById('set-top_k').select()")
    browser.type("500")
    browser.click("#input")
    assert "top-k must be an integer from 0 to 200" in texts(browser, "#status")[0]
    assert browser.js("document.getElementById('set-top_k').value") == "7"
    send(browser, "/maxtokens 4")  # the commands and the panel are one set of settings
    assert browser.js("document.getElementById('set-max_tokens').value") == "4"
    browser.click("#reset-settings")
    send(browser, "again")
    browser.wait_for("sent.length === 2")
    idle(browser)
    assert browser.js("Object.keys(sent[1])") == ["messages"]  # defaults again: the server's own


def test_stop_marks_the_reply_and_new_chat_clears_the_draft(chat, tmp_path):
    server, browser, model, tok, url = chat
    model.delay = 0.05  # a free reply of up to ~500 tokens: long enough to be stopped
    browser.open(url)
    send(browser, "tell me a long story")
    browser.wait_for("(document.querySelector('.msg.assistant')?.textContent.length || 0) > 5")
    assert texts(browser, "#send") == ["Stop"]
    browser.click("#send")
    idle(browser)
    kept = texts(browser, ".msg.assistant")[0]
    assert len(kept) > 5 and texts(browser, ".turn.assistant .stopped") == ["stopped"]
    time.sleep(0.2)
    assert texts(browser, ".msg.assistant") == [kept]  # nothing more arrives after Stop
    browser.screenshot(tmp_path / "chat-phone-stopped.png")

    browser.click("#input")
    browser.type("a half-written draft")
    browser.click("#new-chat")
    assert texts(browser, ".msg") == [] and browser.js("document.getElementById('input').value") == ""
