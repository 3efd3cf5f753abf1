"""serve.py over real HTTP on an ephemeral 127.0.0.1 port, with a tiny model on CPU: both streaming
protocols and the non-streaming one, /health /stats /v1/models, malformed and out-of-limit requests,
concurrent clients, a client that drops mid-reply, and the command line."""
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import serve
from common import NanochatError, Tokenizer, build_chat_prompt, save_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN_TEXT = ["hello world, the quick brown fox jumps over the lazy dog. " * 20,
              "what is 2+3? it is 5. ok, fine. count the r in strawberry. " * 20, "café naïve über " * 5]


def tiny_model(vocab_size, seed, sequence_len=512):
    from model import GPTConfig, build_gpt
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    return build_gpt(config, "cpu").eval()


def steer(model, tokenizer):
    """Wrap the real model's forward so tests know what a reply will be: the stop tokens are masked, so a
    free reply runs to max_tokens (exact counts; long enough to outlast a dropped client), and
    `model.script` (ids, None = free) forces the tokens of each reply in turn. `model.delay` slows it."""
    forward = model.forward
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    model.script, model.delay, state = [], 0.0, {"pos": 0}

    def steered(idx, *args, **kwargs):
        logits = forward(idx, *args, **kwargs)
        state["pos"] = 0 if idx.size(1) > 1 else state["pos"] + 1  # a prompt (prefill) starts a reply
        logits[:, -1, stops] = -1e4
        if state["pos"] < len(model.script) and model.script[state["pos"]] is not None:
            logits[:, -1, model.script[state["pos"]]] = 1e4
        time.sleep(model.delay)
        return logits

    model.forward = steered


def make_replicas(count=2):
    tokenizer = Tokenizer.train(iter(TRAIN_TEXT), 300)
    replicas = []
    for i in range(count):
        model = tiny_model(tokenizer.get_vocab_size(), seed=0)  # replicas are copies of one model
        steer(model, tokenizer)
        replicas.append(serve.Replica(i, model, tokenizer))
    return replicas


def start_server(replicas, **kwargs):
    server = serve.make_server(replicas, "127.0.0.1", 0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server():
    server = start_server(make_replicas(2), max_tokens=16, model_name="tiny")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def models(server):
    """The replicas' models, reset to free replies at full speed after the test."""
    models = [r.model for r in server.replicas]
    yield models
    for m in models:
        m.script, m.delay = [], 0.0


def script(models, tokens):
    for m in models:
        m.script = list(tokens)


def request(server, method, path, body=None, headers=None, raw=None):
    """-> (status, headers, body bytes). `raw` sends bytes as they are, request line included."""
    sock = socket.create_connection(server.server_address, timeout=30)
    if raw is None:
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        head = {"Host": "test", "Content-Length": str(len(data)), **(headers or {})}
        raw = f"{method} {path} HTTP/1.1\r\n".encode() + "".join(
            f"{k}: {v}\r\n" for k, v in head.items() if v is not None).encode() + b"\r\n" + data
    sock.sendall(raw)
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    payload = response.read()
    sock.close()
    return response.status, response.headers, payload


def events(payload):
    """SSE body -> list of the `data:` payloads (JSON decoded where it is JSON)."""
    out = []
    for block in payload.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def stats(server):
    return json.loads(request(server, "GET", "/stats")[2])


# ---- the protocols ----

def test_reference_protocol_streams_utf8_safe_tokens_then_done(server, models):
    tok = server.replicas[0].tokenizer
    # "café" with é as its two raw bytes, forced one token each: the first byte alone is no character
    script(models, tok.encode("hello caf") + [tok.enc.encode_single_token(b"\xc3"), tok.enc.encode_single_token(b"\xa9")]
           + [tok.encode_special("<|assistant_end|>")])
    status, headers, payload = request(server, "POST", "/chat/completions", {"messages": [user("hi")]})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    data = events(payload)
    assert data[-1] == {"done": True}
    assert all(set(d) == {"token", "gpu", "type"} and d["type"] == "text" for d in data[:-1])
    assert "".join(d["token"] for d in data[:-1]) == "hello café"
    assert all("\ufffd" not in d["token"] for d in data[:-1])
    assert len(data) - 1 >= 3  # streamed piece by piece, not in one go


def test_reference_protocol_types_calculator_calls(server, models):
    tok = server.replicas[0].tokenizer
    special = tok.encode_special
    # the model writes the call; the engine forces <|output_start|>5<|output_end|> (3 positions, None)
    script(models, [special("<|python_start|>"), *tok.encode("2+3"), special("<|python_end|>"), None, None, None,
                    *tok.encode(" ok"), special("<|assistant_end|>")])
    status, _, payload = request(server, "POST", "/chat/completions", {"messages": [user("what is 2+3?")]})
    pieces = [(d["type"], d["token"]) for d in events(payload)[:-1]]
    merged = []
    for kind, text in pieces:
        merged[-1:] = [(kind, merged[-1][1] + text)] if merged and merged[-1][0] == kind else merged[-1:] + [(kind, text)]
    assert merged == [("python", "2+3"), ("python_output", "5"), ("text", " ok")]
    # the page sends such a reply back as parts; the OpenAI protocol shows the call as readable text
    parts = [{"type": kind, "text": text} for kind, text in merged]
    body = {"messages": [user("what is 2+3?"), {"role": "assistant", "content": parts}, user("and 3+4?")]}
    status, _, payload = request(server, "POST", "/v1/chat/completions", body)
    reply = json.loads(payload)
    assert status == 200 and reply["choices"][0]["message"]["content"].startswith("[calculator: 2+3 = 5]")
    expected_prompt = build_chat_prompt(tok, body["messages"], 512, 16)[0]
    assert reply["usage"]["prompt_tokens"] == len(expected_prompt)


def test_openai_non_streaming_completion(server, models):
    tok = server.replicas[0].tokenizer
    script(models, tok.encode("hello world") + [tok.encode_special("<|assistant_end|>")])
    messages = [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello"), user("how are you?")]
    status, headers, payload = request(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages})
    reply = json.loads(payload)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-") and reply["model"] == "tiny"
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello world"},
                                 "finish_reason": "stop"}]
    prompt = build_chat_prompt(tok, messages, 512, 16)[0]
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(tok.encode("hello world")),
                              "total_tokens": len(prompt) + len(tok.encode("hello world"))}


def test_openai_streaming_chunks_usage_and_done(server, models):
    body = {"messages": [user("hi")], "stream": True, "max_tokens": 7, "temperature": 0,
            "stream_options": {"include_usage": True}}
    status, headers, payload = request(server, "POST", "/v1/chat/completions", body)
    data = events(payload)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]  # free replies never stop
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-2])
    # temperature 0 is greedy: the same request without streaming gives the same text
    body.update(stream=False)
    reply = json.loads(request(server, "POST", "/v1/chat/completions", body)[2])
    assert streamed == reply["choices"][0]["message"]["content"]


def test_the_official_openai_client_works_unchanged(server, models):
    openai = pytest.importorskip("openai", reason="the openai package is not a dependency: pip install openai to run this")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[user("hi")], temperature=3)
    assert error.value.status_code == 400 and error.value.body["param"] == "temperature"


def test_health_stats_models_and_page(server):
    health = json.loads(request(server, "GET", "/health")[2])
    assert health["status"] == "ok" and health["ready"] and health["num_gpus"] == 2
    assert health["available_workers"] == 2 and health["defaults"]["max_tokens"] == 16
    s = stats(server)
    assert (s["total_workers"], s["available_workers"], s["busy_workers"]) == (2, 2, 0)
    assert [{k: w[k] for k in ("gpu_id", "device", "decoding", "waiting")} for w in s["workers"]] == [
        {"gpu_id": 0, "device": "cpu", "decoding": 0, "waiting": 0}, {"gpu_id": 1, "device": "cpu", "decoding": 0, "waiting": 0}]
    models = json.loads(request(server, "GET", "/v1/models")[2])
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    status, headers, page = request(server, "GET", "/?x=1")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<title>nanochat</title>" in page
    assert b"src=" not in page and b"href=" not in page and b"https://" not in page  # self-contained, no CDN


def test_long_conversations_drop_oldest_turns(server, models):
    tok = server.replicas[0].tokenizer
    turn = "the quick brown fox jumps over the lazy dog " * 10  # ~100 tokens
    messages = [m for _ in range(6) for m in (user(turn), assistant(turn))] + [user("and now?")]
    status, _, payload = request(server, "POST", "/v1/chat/completions", {"messages": messages})
    usage = json.loads(payload)["usage"]
    assert status == 200 and usage["prompt_tokens"] + 16 <= 512
    assert usage["prompt_tokens"] == len(build_chat_prompt(tok, messages, 512, 16)[0])


# ---- bad requests ----

def conversation(*texts):
    return {"messages": [(user if i % 2 == 0 else assistant)(t) for i, t in enumerate(texts)]}


OK = {"messages": [user("hi")]}
BAD_REQUESTS = [  # (method, path, body | raw bytes, headers, status, param)
    ("POST", "/chat/completions", b"{not json", None, 400, None),
    ("POST", "/chat/completions", b"[1, 2]", None, 400, None),
    ("POST", "/chat/completions", b'{"messages": "\xff\xfe"}', None, 400, None),
    ("POST", "/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, 400, None),
    ("POST", "/chat/completions", {}, None, 400, "messages"),
    ("POST", "/chat/completions", {"messages": "hi"}, None, 400, "messages"),
    ("POST", "/chat/completions", {"messages": []}, None, 400, "messages"),
    ("POST", "/chat/completions", conversation(*["hi"] * 501), None, 400, "messages"),
    ("POST", "/chat/completions", {"messages": ["hi"]}, None, 400, "messages[0]"),
    ("POST", "/chat/completions", {"messages": [{"content": "hi"}]}, None, 400, "messages[0].role"),
    ("POST", "/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, None, 400, "messages[0].role"),
    ("POST", "/chat/completions", {"messages": [user("a"), user("b")]}, None, 400, "messages[1].role"),
    ("POST", "/chat/completions", {"messages": [user("a"), {"role": "system", "content": "s"}]}, None, 400, "messages[1].role"),
    ("POST", "/chat/completions", {"messages": [assistant("a"), user("b")]}, None, 400, "messages[0].role"),
    ("POST", "/chat/completions", conversation("a", "b"), None, 400, "messages[1].role"),
    ("POST", "/chat/completions", {"messages": [{"role": "user"}]}, None, 400, "messages[0].content"),
    ("POST", "/chat/completions", {"messages": [user("")]}, None, 400, "messages[0].content"),
    ("POST", "/chat/completions", {"messages": [user(5)]}, None, 400, "messages[0].content"),
    ("POST", "/chat/completions", {"messages": [user("x" * 8001)]}, None, 400, "messages[0].content"),
    ("POST", "/chat/completions", conversation(*["y" * 7000] * 5), None, 400, "messages"),
    ("POST", "/chat/completions", {"messages": [user([{"type": "image_url", "image_url": "x"}])]}, None, 400,
     "messages[0].content[0].type"),
    ("POST", "/chat/completions", {"messages": [user("a"), assistant([{"type": "python", "text": 5}]), user("b")]}, None,
     400, "messages[1].content[0].text"),
    ("POST", "/chat/completions", {"messages": [user("the quick brown fox " * 300)]}, None, 400, "messages"),  # > context
    ("POST", "/chat/completions", {**OK, "temperature": "hot"}, None, 400, "temperature"),
    ("POST", "/chat/completions", {**OK, "temperature": -0.1}, None, 400, "temperature"),
    ("POST", "/chat/completions", {**OK, "temperature": 2.5}, None, 400, "temperature"),
    ("POST", "/chat/completions", {**OK, "temperature": True}, None, 400, "temperature"),
    ("POST", "/chat/completions", {**OK, "top_k": -1}, None, 400, "top_k"),
    ("POST", "/chat/completions", {**OK, "top_k": 201}, None, 400, "top_k"),
    ("POST", "/chat/completions", {**OK, "top_k": 3.5}, None, 400, "top_k"),
    ("POST", "/chat/completions", {**OK, "max_tokens": 0}, None, 400, "max_tokens"),
    ("POST", "/chat/completions", {**OK, "max_tokens": 4097}, None, 400, "max_tokens"),
    ("POST", "/chat/completions", {**OK, "max_tokens": "10"}, None, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {**OK, "stream": "yes"}, None, 400, "stream"),
    ("POST", "/v1/chat/completions", {**OK, "n": 2}, None, 400, "n"),
    ("POST", "/v1/chat/completions", {**OK, "stop": ["\n"]}, None, 400, "stop"),
    ("POST", "/v1/chat/completions", {**OK, "top_p": 1.5}, None, 400, "top_p"),
    ("POST", "/v1/chat/completions", {**OK, "max_completion_tokens": 0}, None, 400, "max_completion_tokens"),
    ("POST", "/v1/chat/completions", {**OK, "stream": True, "stream_options": "usage"}, None, 400, "stream_options"),
    ("POST", "/chat/completions", b"{}", {"Content-Length": str(2 << 20)}, 413, None),  # body never sent
    ("POST", "/chat/completions", b"{}", {"Content-Length": None}, 411, None),
    ("POST", "/chat/completions", b"{}", {"Content-Length": "abc"}, 400, None),
    ("POST", "/chat/completions", b"2\r\n{}\r\n0\r\n\r\n", {"Content-Length": None, "Transfer-Encoding": "chunked"}, 411, None),
    ("GET", "/chat/completions", None, None, 405, None),
    ("POST", "/health", OK, None, 405, None),
    ("DELETE", "/v1/chat/completions", None, None, 405, None),
    ("GET", "/nope", None, None, 404, None),
    ("POST", "/v1/nope", OK, None, 404, None),
    ("GET", None, b"GET / / HTTP/1.1\r\n\r\n", None, 400, None),  # a malformed request line
    ("POST", None, b"POST /chat/completions HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}", None, 400, None),  # "²"
    ("POST", "/chat/completions", b"[" * 100_000, None, 400, None),  # nesting that would exhaust the recursion
]


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(server):
    assert len(BAD_REQUESTS) >= 30
    for method, path, body, headers, expected_status, expected_param in BAD_REQUESTS:
        raw = body if path is None else None
        status, _, payload = request(server, method, path, body, headers, raw=raw)
        error = json.loads(payload)["error"]
        assert (status, error["param"]) == (expected_status, expected_param), (method, path, error)
        assert error["type"] == "invalid_request_error" and error["message"]
    assert stats(server)["available_workers"] == 2  # no replica was taken by a rejected request
    status, _, payload = request(server, "POST", "/v1/chat/completions", OK)
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 16


# ---- concurrency and dropped clients ----

def test_eight_concurrent_streaming_clients_all_complete(server, models):
    for m in models:
        m.delay = 0.005  # ~80 ms a reply: the 8 requests overlap and queue for the 2 replicas
    before = stats(server)["completions"]
    results, busy, done = [None] * 8, [], threading.Event()

    def client(i):
        if i % 2:
            body = {"messages": [user(f"client {i}")], "stream": True, "stream_options": {"include_usage": True}}
            results[i] = events(request(server, "POST", "/v1/chat/completions", body)[2])
        else:
            results[i] = events(request(server, "POST", "/chat/completions", {"messages": [user(f"client {i}")]})[2])

    def watch():
        while not done.is_set():
            busy.append(stats(server)["busy_workers"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    watcher.join()
    for i, data in enumerate(results):
        if i % 2:
            assert data[-1] == "[DONE]" and data[-2]["usage"]["completion_tokens"] == 16
        else:
            assert data[-1] == {"done": True} and len(data) > 1
    assert max(busy) == 2  # both replicas served at once, never more
    s = stats(server)
    assert s["completions"] - before == 8 and s["available_workers"] == 2


def test_dropped_client_frees_its_replica(server, models):
    for m in models:
        m.delay = 0.01  # a full reply (~490 tokens) would take ~5 s
    before = stats(server)["disconnects"]
    sock = socket.create_connection(server.server_address)
    body = json.dumps({"messages": [user("tell me everything")], "max_tokens": 4096}).encode()
    sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while b"data: " not in received:  # streaming has begun
        received += sock.recv(4096)
    assert stats(server)["busy_workers"] == 1
    sock.close()
    start = time.time()
    while stats(server)["available_workers"] != 2:
        assert time.time() - start < 2, "the replica was not freed after the client left"
        time.sleep(0.02)
    assert stats(server)["disconnects"] == before + 1
    status, _, payload = request(server, "POST", "/chat/completions", {"messages": [user("still there?")], "max_tokens": 2})
    assert status == 200 and events(payload)[-1] == {"done": True}


# ---- the command line ----

def test_command_line_serves_a_checkpoint_and_explains_a_missing_one(base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["serve.py", "--port", "0"])  # any free port: 8000 may be taken here
    with pytest.raises(NanochatError) as missing:  # a SystemExit: the script prints its message and exits 1
        serve.main()
    assert "sft.py" in str(missing.value) and "\n" not in str(missing.value)

    tokenizer = Tokenizer.train(iter(TRAIN_TEXT), 300)
    tokenizer.save(str(base_dir / "tokenizer"))
    model = tiny_model(tokenizer.get_vocab_size(), seed=0, sequence_len=128)
    meta = {"step": 5, "model_config": {k: getattr(model.config, k) for k in
            ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")}}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None, meta)
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", "0", "--device-type", "cpu",
                                 "--max-tokens", "5"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        start = time.time()
        while "http://127.0.0.1:" not in log_path.read_text():
            assert proc.poll() is None and time.time() - start < 60, log_path.read_text()
            time.sleep(0.1)
        port = int(log_path.read_text().split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(OK), {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        assert reply["model"] == "nanochat-sft-d1" and reply["usage"]["completion_tokens"] <= 5
        time.sleep(0.2)
        assert "POST /v1/chat/completions 200" in log_path.read_text()  # one log line per request
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- client mistakes that must not cost the server (no 5xx, no tracebacks, no endless heads) ----

def test_clients_that_vanish_after_a_bad_request_leave_no_traceback(server, capsys):
    for _ in range(20):  # the reset arrives before or after the server answers: either way no traceback
        sock = socket.create_connection(server.server_address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
        sock.sendall(b"POST /chat/completions HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n")
        sock.close()
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        server.handle_error(None, ("10.0.0.1", 5))  # what socketserver calls when a handler raises
    time.sleep(0.2)
    assert "Traceback" not in capsys.readouterr().err
    assert request(server, "GET", "/health")[0] == 200


def test_a_request_head_trickling_in_is_cut_off_at_the_deadline(server, monkeypatch):
    monkeypatch.setattr(serve, "HEAD_DEADLINE_S", 1.0)
    sock = socket.create_connection(server.server_address, timeout=10)
    start = time.time()
    sock.sendall(b"POST /chat/completions HTTP/1.1\r\n")
    closed = False
    while time.time() - start < 5:
        try:
            sock.sendall(b"X-Slow: 1\r\n")  # one header line at a time, each well within the per-read timeout
            sock.settimeout(0.3)
            closed = sock.recv(1) == b""
        except socket.timeout:
            continue
        except OSError:
            closed = True
        if closed:
            break
    assert closed and time.time() - start < 2.5
    sock.close()


# ---- continuous batching ----

def batching_server(max_batch, max_queue=64, delay=0.0):
    (replica,) = make_replicas(1)
    replica = serve.Replica(0, replica.model, replica.tokenizer, max_batch=max_batch, max_queue=max_queue)
    replica.model.delay = delay
    return start_server([replica], max_tokens=16, model_name="tiny")


def test_concurrent_requests_get_the_tokens_they_get_alone():
    server = batching_server(max_batch=4, delay=0.01)
    bodies = [{"messages": [user("hi " * (1 + 3 * i))], "max_tokens": 8 + 4 * i, "temperature": (0, 1.0)[i % 2],
               "seed": i, "top_k": (0, 30)[i % 2]} for i in range(6)]
    def reply(body):
        return json.loads(request(server, "POST", "/v1/chat/completions", body)[2])["choices"][0]["message"]["content"]
    expected = [reply(body) for body in bodies]  # one at a time
    got, decoding = [None] * len(bodies), []

    def client(i):
        got[i] = reply(bodies[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        decoding.append(stats(server)["workers"][0]["decoding"])
        time.sleep(0.01)
    assert got == expected
    assert max(decoding) > 1  # they really were decoded together
    assert max(decoding) <= 4  # never more than --max-batch
    server.shutdown()
    server.server_close()


def test_a_full_queue_answers_503_with_retry_after_and_a_dropped_client_frees_its_row():
    server = batching_server(max_batch=1, max_queue=1, delay=0.01)
    hog = socket.create_connection(server.server_address)
    body = json.dumps({"messages": [user("go on")], "max_tokens": 4096}).encode()
    hog.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while b"data: " not in received:  # the only row is taken
        received += hog.recv(4096)
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(
        response=request(server, "POST", "/chat/completions", {"messages": [user("me next")], "max_tokens": 3})))
    waiter.start()
    start = time.time()
    while stats(server)["workers"][0]["waiting"] != 1:
        assert time.time() - start < 5
        time.sleep(0.01)
    status, headers, payload = request(server, "POST", "/v1/chat/completions", OK)
    assert status == 503 and headers["Retry-After"] == str(serve.RETRY_AFTER_S)
    assert json.loads(payload)["error"]["type"] == "server_error"
    hog.close()  # the client goes away: its row goes to the waiting request
    waiter.join(timeout=10)
    status, _, payload = queued["response"]
    assert status == 200 and events(payload)[-1] == {"done": True}
    assert stats(server)["workers"][0]["decoding"] == 0 and stats(server)["disconnects"] == 1
    server.shutdown()
    server.server_close()
