"""Web chat server: the chat page, the reference's streaming protocol and an OpenAI-compatible API.

    python serve.py                                 # newest SFT checkpoint on http://127.0.0.1:8000
    python serve.py --stage rl --host 0.0.0.0 --port 8080
    python serve.py --num-gpus 8                    # one model replica per GPU (one on CPU/MPS)
    python serve.py --max-batch 32 --max-queue 256  # conversations decoded at once per replica, waiting room

Endpoints:
    GET  /                     the chat page (chat.html beside this file)
    GET  /health, /stats       the replicas: how many, how many free, requests decoding and waiting
    POST /chat/completions     {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?} ->
                               SSE `data: {"token": "...", "gpu": 0, "type": "text"}` ... `data: {"done": true}`
                               ("type" is "python" / "python_output" inside a calculator call / its result)
    POST /v1/chat/completions  OpenAI chat completions, "stream" true or false;  GET /v1/models
                               e.g. OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Messages alternate user, assistant, ..., user; an optional "system" message may come first and is folded
into the first user turn (the chat format has no system slot). Content is a string or a list of parts
{"type": "text"|"python"|"python_output", "text": ...}. Limits: 1-500 messages, each at most 8000
characters and 32000 in total, temperature 0-2, top_k 0-200 (0: no filtering), max_tokens 1-4096, a body
of at most 1 MiB, a request head (request line and headers) within 60 s. A request breaking one gets a 4xx
with an OpenAI-style error naming the field. When a conversation outgrows the model's context its oldest
turns are dropped.

Many conversations at once (continuous batching): each replica decodes up to --max-batch requests together,
one token for all of them per step (decoding is bound by reading the weights, so a batch costs little more
than one row). A new request goes to the least busy replica, is prefilled alone and joins the batch between
two steps; a request that ends, reaches its max_tokens or whose client goes away leaves at once, freeing its
row. Each keeps its own settings and seed: a seeded or greedy request gets the tokens it would get alone (up
to float rounding). Each replica keeps the KV caches of recent prompts (as many positions as its batch holds):
the next turn of a conversation prefills only the reply and the new message. Beyond the batch, requests wait
in a queue of at most --max-queue per replica; when it is full the answer is 503 with a Retry-After header,
and a request that waited 300 s without a row gets 503 too.
--max-batch 1 serves one request at a time. --decode-dtype sets the precision of the weights for decoding
(auto: int8 weights and activations on the CPU for models whose matrices take over 32 MB, else the compute
dtype); --compile (the default on a CPU) runs the decode steps through torch.compile, compiled at start.
No CORS headers: only the page served here (same origin) can call the API from a browser.
"""
import argparse
import collections
import contextlib
import http.server
import json
import math
import os
import queue
import random
import re
import sys
import threading
import time
import uuid
from http import HTTPStatus

import torch

from common import (STAGE_SCRIPTS, DecodeBatch, Engine, NanochatError, Utf8Streamer, add_sampling_flags,
                    argument_parser, autodetect_device_type, build_chat_prompt, get_logger, int_flag, load_model)
from model import DECODE_DTYPES

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20     # JSON escaping can grow 32000 characters six-fold; this leaves room
WAIT_FOR_REPLICA_S = 300     # then 503: better an answer than a hung client
CLIENT_TIMEOUT_S = 60        # a connection that sends nothing for this long is closed
HEAD_DEADLINE_S = 60         # the whole request head must arrive within this, however slowly it trickles
RETRY_AFTER_S = 5            # what a 503 for a full queue tells the client to wait
MAX_JSON_DEPTH = 64          # deeper nesting is no chat request (and would exhaust the parser's recursion)
PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
PART_TYPES = ("text", "python", "python_output")
log = get_logger("serve")


class RequestError(Exception):
    """A client mistake, answered with `status` and {"error": {"message", "type", "param"}}."""

    def __init__(self, message, param=None, status=400, retry_after=None):
        super().__init__(message)
        self.message, self.param, self.status, self.retry_after = message, param, status, retry_after


def default_max_batch(model):
    """Rows whose KV cache takes at most a quarter of the free memory: at most 64 on a GPU, 16 on a CPU (whose
    decode step costs more per row)."""
    c, device = model.config, model.get_device()
    row_bytes = 2 * c.n_layer * c.sequence_len * c.n_kv_head * (c.n_embd // c.n_head) * model.cos.element_size()
    if device.type == "cuda":
        free, cap = torch.cuda.mem_get_info(device)[0], 64
    else:
        free, cap = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), 16
    return max(1, min(cap, free // 4 // row_bytes))


class Replica:
    """One model copy, its engine and its decode batch, run by a scheduler thread of its own: submit() queues a
    request and returns the queue its events arrive on: ("token", id)..., then ("end", finish_reason) or
    ("error", exception). A request whose job gets "cancelled" set leaves the batch before the next step."""

    def __init__(self, replica_id, model, tokenizer, max_batch=None, max_queue=64, decode_dtype=None, compile=False):
        self.id, self.model, self.tokenizer = replica_id, model, tokenizer
        self.engine = Engine(model, tokenizer, decode_dtype, compile)
        self.device, self.max_context = model.get_device(), model.config.sequence_len
        self.max_batch, self.max_queue = max_batch or default_max_batch(model), max_queue
        self.batch = DecodeBatch(self.engine, self.max_batch)
        if compile:
            log.info(f"replica {replica_id}: compiling the decode steps (10-60 s)")
            self.batch.warm_up()
        # a prefix cache of at most as many positions as the decode batch holds (set after the warm-up, which
        # would store its prompt): the next turn of a conversation prefills only what its last prompt lacked
        self.engine.prefix_tokens = self.max_batch * self.max_context
        self.waiting, self.wakeup = collections.deque(), threading.Condition()
        threading.Thread(target=self.run, name=f"replica-{replica_id}", daemon=True).start()

    def load(self):
        """Requests decoding plus waiting: how busy this replica is."""
        return len(self.batch.rows) + len(self.waiting)

    def submit(self, job):
        with self.wakeup:
            if len(self.waiting) >= self.max_queue:
                raise RequestError(f"the server is at capacity ({self.max_batch} conversations decoding, "
                                   f"{len(self.waiting)} waiting): try again in a few seconds", status=503,
                                   retry_after=RETRY_AFTER_S)
            job["events"], job["cancelled"], job["since"] = queue.Queue(), False, time.monotonic()
            self.waiting.append(job)
            self.wakeup.notify()
        return job["events"]

    def run(self):
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with device:
            while True:
                with self.wakeup:
                    while not self.waiting and not self.batch.rows:
                        self.wakeup.wait()
                    joining = [self.waiting.popleft() for _ in range(min(len(self.waiting),
                                                                          self.max_batch - len(self.batch.rows)))]
                try:
                    self.advance(joining)
                except Exception as e:  # a bug or a device failure: fail the requests in flight, keep serving
                    log.exception(f"replica {self.id} failed")
                    for row in self.batch.rows:
                        row["job"]["events"].put(("error", e))
                    self.batch = DecodeBatch(self.engine, self.max_batch)

    def advance(self, joining):
        """Admit the new requests (each prefilled alone), drop the cancelled ones, run one step of the batch."""
        for job in joining:
            if job["cancelled"]:
                continue
            try:
                row = self.batch.join(job["prompt"], job["max_tokens"], job["temperature"], job["top_k"] or None,
                                      job["top_p"], job["seed"])
            except Exception as e:
                job["events"].put(("error", e))
                continue
            row["job"] = job
        for row in [row for row in self.batch.rows if row["job"]["cancelled"]]:
            self.batch.leave(row)
        if not self.batch.rows:
            return
        for row, token, _ in self.batch.step():
            events = row["job"]["events"]
            if row["done"] is not None:
                events.put(("end", "stop"))
                continue
            events.put(("token", token))
            if row["left"] <= 0:
                events.put(("end", "length"))


# ---- request validation ----

def check_number(body, name, low, high, default, integer=False):
    value = body.get(name)
    if value is None:  # absent, or null as OpenAI clients send for "unset"
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be {kind} between {low} and {high}, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def message_content(content, field, role):
    """-> (content as the renderer wants it, its length in characters). User and system content become
    a string; an assistant's may keep its tool-call parts."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            allowed = PART_TYPES if role == "assistant" else ("text",)
            if not isinstance(part, dict) or part.get("type") not in allowed:
                raise RequestError(f"{field}.content[{j}] must be an object with type one of {list(allowed)}",
                                   f"{field}.content[{j}].type")
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{field}.content[{j}].text must be a string", f"{field}.content[{j}].text")
            parts.append({"type": part["type"], "text": part["text"]})
    else:
        raise RequestError(f"{field}.content must be a string or a list of parts", f"{field}.content")
    length = sum(len(part["text"]) for part in parts)
    if not 1 <= length <= MAX_MESSAGE_CHARS:
        raise RequestError(f"{field}.content has {length} characters: 1 to {MAX_MESSAGE_CHARS} allowed", f"{field}.content")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts), length
    return parts, length


def check_messages(messages):
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise RequestError(f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    checked, total = [], 0
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{field} must be an object with role and content", field)
        role, turn = message.get("role"), i - (bool(checked) and checked[0]["role"] == "system")
        expected = "system" if role == "system" and i == 0 else ("user", "assistant")[turn % 2]
        if role != expected:
            raise RequestError(f"{field}.role is {json.dumps(role)}, expected '{expected}': messages alternate "
                               "user, assistant, ... after an optional first system message", f"{field}.role")
        content, length = message_content(message.get("content"), field, role)
        total += length
        checked.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"messages have {total} characters in total, at most {MAX_TOTAL_CHARS} allowed", "messages")
    if checked[-1]["role"] != "user":
        raise RequestError(f"the last message must be from the user, not {checked[-1]['role']}",
                           f"messages[{len(checked) - 1}].role")
    return checked


def parse_chat_request(body, defaults, openai):
    """Validated generation settings of a chat request, or a RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    job = {"messages": check_messages(body.get("messages")),
           "temperature": check_number(body, "temperature", 0, 2, defaults["temperature"]),
           "top_k": check_number(body, "top_k", 0, 200, defaults["top_k"], integer=True),
           "top_p": check_number(body, "top_p", 0, 1, None),  # 0 keeps only the likeliest token: greedy
           "seed": check_number(body, "seed", -2**63, 2**63 - 1, None, integer=True),
           "stream": True}
    job["max_tokens"] = check_number(body, "max_tokens", 1, 4096, defaults["max_tokens"], integer=True)
    if job["top_p"] == 0:
        job["temperature"], job["top_p"] = 0, None
    if openai:
        job["max_tokens"] = check_number(body, "max_completion_tokens", 1, 4096, job["max_tokens"], integer=True)
        if body.get("n") not in (None, 1):
            raise RequestError("only n=1 (one choice per request) is supported", "n")
        if body.get("stop") not in (None, [], ""):
            raise RequestError("stop sequences are not supported: leave stop unset", "stop")
        job["stream"], options = body.get("stream", False), body.get("stream_options") or {}
        job["include_usage"] = options.get("include_usage", False) if isinstance(options, dict) else None
        if not isinstance(job["stream"], bool):
            raise RequestError("stream must be true or false", "stream")
        if not isinstance(job["include_usage"], bool):
            raise RequestError("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return job


# ---- the HTTP server ----

class ChatServer(http.server.ThreadingHTTPServer):
    """A thread per connection; each request goes to the least busy replica's decode batch."""
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: socketserver's 5 resets a burst of clients connecting at once

    def __init__(self, address, replicas, defaults, model_name):
        super().__init__(address, ChatHandler)
        self.replicas, self.defaults, self.model_name = replicas, defaults, model_name
        self.counts, self.counts_lock = {"completions": 0, "disconnects": 0}, threading.Lock()

    def add_replica(self, replica):
        self.replicas.append(replica)

    def count(self, name):
        with self.counts_lock:
            self.counts[name] += 1

    def pick_replica(self):
        return min(self.replicas, key=lambda r: r.load())

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):  # the client went away: no traceback for that
            log.info(f"{client_address[0]} disconnected ({type(error).__name__})")
        else:
            super().handle_error(request, client_address)

    def health(self):
        return {"status": "ok", "ready": True, "model": self.model_name, "num_gpus": len(self.replicas),
                "available_workers": sum(r.load() == 0 for r in self.replicas), "defaults": self.defaults}

    def stats(self):
        free = sum(r.load() == 0 for r in self.replicas)
        return {"total_workers": len(self.replicas), "available_workers": free,
                "busy_workers": len(self.replicas) - free, **self.counts,
                "workers": [{"gpu_id": r.id, "device": str(r.device), "decoding": len(r.batch.rows),
                             "waiting": len(r.waiting), "max_batch": r.max_batch, "max_queue": r.max_queue}
                            for r in self.replicas]}


def make_server(replicas, host="127.0.0.1", port=8000, temperature=0.8, top_k=50, max_tokens=512, model_name="nanochat"):
    """Bind (port 0: any free port, see server.server_address) without serving; call serve_forever()."""
    defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
    return ChatServer((host, port), replicas, defaults, model_name)


def reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def json_depth(data):
    """How deeply brackets nest in a JSON text (those inside strings counted too: an upper bound)."""
    depth = deepest = 0
    for match in re.finditer(rb"[\[{]|[\]}]", data):
        depth += 1 if match.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def error_body(message, param=None, status=400):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class HeadDeadline:
    """The connection's input while a request head is read: every read waits at most until one deadline for the
    whole head, so a client trickling a header line now and then is cut off too (a socket timeout is per read)."""

    def __init__(self, rfile, connection):
        self.rfile, self.connection, self.deadline = rfile, connection, time.monotonic() + HEAD_DEADLINE_S

    def readline(self, size=-1):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the request head took more than {HEAD_DEADLINE_S} s")
        self.connection.settimeout(min(remaining, CLIENT_TIMEOUT_S))
        return self.rfile.readline(size)

    def __getattr__(self, name):
        return getattr(self.rfile, name)


class ChatHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nanochat"
    timeout = CLIENT_TIMEOUT_S

    # -- plumbing: one log line per request, JSON everywhere --

    def handle_one_request(self):
        self.started, self.status, self.note = time.perf_counter(), None, ""
        raw = self.rfile.rfile if isinstance(self.rfile, HeadDeadline) else self.rfile
        self.rfile = HeadDeadline(raw, self.connection)  # until parse_request has read the headers
        super().handle_one_request()
        if self.status is not None:
            elapsed_ms = (time.perf_counter() - self.started) * 1000
            request = f"{self.command} {getattr(self, 'path', '')[:100]}"  # no path when the request line was bad
            log.info(f"{self.client_address[0]} {request} {self.status} {elapsed_ms:.0f}ms {self.note}".rstrip())

    def parse_request(self):  # the request line has arrived: time from here, not from an idle keep-alive
        self.started = time.perf_counter()
        try:
            return super().parse_request()
        finally:  # the head is in: the body and the next request get the plain per-read timeout
            self.rfile = self.rfile.rfile
            self.connection.settimeout(CLIENT_TIMEOUT_S)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def log_message(self, format, *args):
        pass  # handle_one_request logs instead

    def send_error(self, code, message=None, explain=None):  # also the base class's: bad request line, no do_PUT...
        status = HTTPStatus.METHOD_NOT_ALLOWED if code == HTTPStatus.NOT_IMPLEMENTED else code
        self.send_json(status, error_body(message or HTTPStatus(status).phrase, status=status), close=True)

    def send_json(self, status, payload, close=False, headers=()):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if close:  # after an error the rest of the request body may still be unread: start afresh
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def start_events(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

    def send_event(self, payload):
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())

    def read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("chunked request bodies are not supported: send Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a Content-Length header is required", status=411)
        if not re.fullmatch(r"[0-9]+", length.strip()):  # not isdigit(): that accepts "²", which int() refuses
            raise RequestError(f"Content-Length must be a non-negative integer, got {length!r}")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the request body has {int(length)} bytes, at most {MAX_BODY_BYTES} allowed", status=413)
        data = self.rfile.read(int(length))
        if json_depth(data) > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests brackets more than {MAX_JSON_DEPTH} deep")
        try:
            return json.loads(data, parse_constant=reject_constant)
        except ValueError as e:  # bad JSON, bad UTF-8, NaN/Infinity
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    # -- routes --

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            with open(PAGE_PATH, "rb") as f:
                page = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif path == "/health":
            self.send_json(200, self.server.health())
        elif path == "/stats":
            self.send_json(200, self.server.stats())
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                             "created": 0, "owned_by": "nanochat"}]})
        else:
            self.no_route(path)

    def no_route(self, path):
        known = path in ("/", "/health", "/stats", "/v1/models", "/chat/completions", "/v1/chat/completions")
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                        f"{self.command} {path} is not supported" if known else f"no such endpoint: {path}")

    def do_POST(self):
        path = self.path.split("?")[0]
        if path not in ("/chat/completions", "/v1/chat/completions"):
            return self.no_route(path)
        try:
            job = parse_chat_request(self.read_json(), self.server.defaults, openai=path.startswith("/v1/"))
            self.chat(job, openai=path.startswith("/v1/"))
        except RequestError as e:
            self.note = e.message[:200]
            retry = [("Retry-After", str(e.retry_after))] if e.retry_after else []
            with contextlib.suppress(ConnectionError, TimeoutError):  # the client may be gone already
                self.send_json(e.status, error_body(e.message, e.param, e.status), close=True, headers=retry)
        except (ConnectionError, TimeoutError):
            self.note += ", client disconnected"
            self.server.count("disconnects")
            self.close_connection = True
        except Exception as e:  # a bug or a device failure: say so, keep serving
            log.exception("request failed")
            self.note += f", failed: {e!r}"[:200]
            if self.status is None:
                self.send_json(500, error_body(f"internal error: {e!r}", status=500), close=True)
            else:  # the stream has started: end it with an error event
                with contextlib.suppress(OSError):
                    self.send_event({"error": f"internal error: {e!r}"})

    def chat(self, job, openai):
        tokenizer = self.server.replicas[0].tokenizer  # all replicas share one vocabulary
        max_context = self.server.replicas[0].max_context
        try:
            prompt, dropped, max_tokens = build_chat_prompt(tokenizer, job["messages"], max_context, job["max_tokens"])
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
        job.update(prompt=prompt, max_tokens=max_tokens,
                   seed=job["seed"] if job["seed"] is not None else random.randrange(2**31))
        replica = self.server.pick_replica()
        events = replica.submit(job)
        self.server.count("completions")
        try:
            first = events.get(timeout=WAIT_FOR_REPLICA_S)  # waits in the queue, then for the prefill
        except queue.Empty:
            job["cancelled"] = True
            raise RequestError(f"no free row for {WAIT_FOR_REPLICA_S} s: the server is overloaded, try again "
                               "later", status=503, retry_after=RETRY_AFTER_S) from None
        result = {"tokens": 0, "finish_reason": "length"}

        def reply_tokens():
            event = first
            while True:
                kind, value = event
                if kind == "error":
                    raise value
                if kind == "end":
                    result["finish_reason"] = value
                    return
                result["tokens"] += 1
                yield value
                event = events.get(timeout=WAIT_FOR_REPLICA_S)

        self.note = f"replica {replica.id}, prompt {len(prompt)} tokens"
        self.note += f" ({dropped} old turns dropped)" if dropped else ""
        tokens = reply_tokens()
        try:
            if openai:
                self.openai_reply(job, tokens, result, len(prompt), replica.tokenizer)
            else:
                self.start_events()
                streamer = Utf8Streamer(replica.tokenizer, typed=True)
                for token in tokens:
                    for kind, text in streamer.push(token):
                        self.send_event({"token": text, "gpu": replica.id, "type": kind})
                for kind, text in streamer.flush():
                    self.send_event({"token": text, "gpu": replica.id, "type": kind})
                self.send_event({"done": True})
        finally:
            tokens.close()
            job["cancelled"] = True  # frees its row at once when the client left mid-reply
            self.note += f", {result['tokens']} tokens ({result['finish_reason']})"

    def openai_reply(self, job, tokens, result, prompt_tokens, tokenizer):
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.model_name}
        streamer = Utf8Streamer(tokenizer)  # tool calls read as "[calculator: 2+3 = 5]" for plain clients
        usage = lambda: {"prompt_tokens": prompt_tokens, "completion_tokens": result["tokens"],
                         "total_tokens": prompt_tokens + result["tokens"]}
        if not job["stream"]:
            text = "".join(streamer.push(token) for token in tokens) + streamer.flush()
            return self.send_json(200, {**head, "object": "chat.completion", "usage": usage(), "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": result["finish_reason"]}]})
        chunk = lambda delta, finish=None: {**head, "object": "chat.completion.chunk",
                                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        self.start_events()
        self.send_event(chunk({"role": "assistant", "content": ""}))
        for token in tokens:
            if text := streamer.push(token):
                self.send_event(chunk({"content": text}))
        if text := streamer.flush():
            self.send_event(chunk({"content": text}))
        self.send_event(chunk({}, result["finish_reason"]))
        if job["include_usage"]:
            self.send_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
        self.send_event("[DONE]")


def parse_args():
    parser = argument_parser(__doc__)
    parser.add_argument("-i", "--stage", "--source", default="sft", choices=["base", "sft", "rl"],
                        help="which checkpoints to serve")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag, e.g. d20 (None = the newest)")
    parser.add_argument("-s", "--step", type=int_flag(0), default=None, help="checkpoint step (None = the newest)")
    parser.add_argument("-n", "--num-gpus", type=int_flag(1), default=1, help="model replicas, one per GPU (CUDA only)")
    add_sampling_flags(parser, temperature=0.6)
    parser.add_argument("-m", "--max-tokens", type=int_flag(1, 4096), default=512, help="default reply length limit")
    parser.add_argument("--max-batch", type=int_flag(1, 1024), default=None,
                        help="requests decoded together per replica (default: what a quarter of the free memory "
                             "holds, at most 64 on a GPU, 16 on a CPU; 1: one at a time)")
    parser.add_argument("--max-queue", type=int_flag(0), default=64,
                        help="requests waiting beyond the batch per replica; more get 503 with Retry-After")
    parser.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES,
                        help="weight precision for decoding (auto: int8a8 on a CPU for matrices over 32 MB, "
                             "else the compute dtype)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode steps through torch.compile, compiled at start (default: on a CPU, where it "
                             "measured faster; --no-compile starts at once)")
    parser.add_argument("--port", type=int_flag(0, 65535), default=8000, help="TCP port (0 = any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept connections from other machines")
    parser.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    return parser.parse_args()


def main():
    args = parse_args()
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise NanochatError(f"--num-gpus {args.num_gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    devices = [torch.device("cuda", i) for i in range(args.num_gpus)] if device_type == "cuda" else \
        [torch.device(device_type)]  # one replica: CPU threads / MPS are shared anyway
    try:  # bind first: a taken port is known in a moment, not after loading the model
        server = make_server([], args.host, args.port, args.temperature, args.top_k, args.max_tokens)
    except OSError as e:
        raise NanochatError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): pick another --port") from None
    for i, device in enumerate(devices):
        try:
            model, tokenizer, meta = load_model(args.stage, device, phase="eval", model_tag=args.model_tag, step=args.step)
        except NanochatError as e:
            hint = f" (make one with `python {STAGE_SCRIPTS[args.stage]}`, or pick --stage/--model-tag)"
            raise NanochatError(f"{e}{hint if str(e).startswith('no ') and '`' not in str(e) else ''}") from None
        compile = device.type == "cpu" if args.compile is None else args.compile
        server.add_replica(Replica(i, model, tokenizer, args.max_batch, args.max_queue, args.decode_dtype, compile))
    server.model_name = f"nanochat-{args.stage}-{meta['model_tag']}"
    replica = server.replicas[0]
    log.info(f"serving {server.model_name} with {len(devices)} replica(s) on {devices[0].type}, {replica.max_batch} "
             f"requests decoded at once and {replica.max_queue} waiting per replica, {replica.engine.decode_dtype} "
             f"decode weights{', compiled' if model.compiled_decode is not None else ''}: "
             f"http://{args.host}:{server.server_address[1]}/  (Ctrl+C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
