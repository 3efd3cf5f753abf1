"""Web chat server: the chat page, the reference's streaming protocol and an OpenAI-compatible API.

    python serve.py                                 # newest SFT checkpoint on http://127.0.0.1:8000
    python serve.py --stage rl --host 0.0.0.0 --port 8080
    python serve.py --num-gpus 8                    # one model replica per GPU (one on CPU/MPS)

Endpoints:
    GET  /                     the chat page (chat.html beside this file)
    GET  /health, /stats       the replicas: how many, how many free
    POST /chat/completions     {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?} ->
                               SSE `data: {"token": "...", "gpu": 0, "type": "text"}` ... `data: {"done": true}`
                               ("type" is "python" / "python_output" inside a calculator call / its result)
    POST /v1/chat/completions  OpenAI chat completions, "stream" true or false;  GET /v1/models
                               e.g. OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Messages alternate user, assistant, ..., user; an optional "system" message may come first and is folded
into the first user turn (the chat format has no system slot). Content is a string or a list of parts
{"type": "text"|"python"|"python_output", "text": ...}. Limits: 1-500 messages, each at most 8000
characters and 32000 in total, temperature 0-2, top_k 0-200 (0: no filtering), max_tokens 1-4096, a body
of at most 1 MiB. A request breaking one gets a 4xx with an OpenAI-style error naming the field. When a
conversation outgrows the model's context its oldest turns are dropped. Requests wait for a free
replica; a client that goes away mid-reply frees its replica at the next token. No CORS headers: only
the page served here (same origin) can call the API from a browser.
"""
import contextlib
import http.server
import json
import math
import os
import queue
import random
import threading
import time
import uuid
from http import HTTPStatus

import torch

from common import (STAGE_SCRIPTS, Engine, NanochatError, Utf8Streamer, add_sampling_flags, argument_parser,
                    autodetect_device_type, build_chat_prompt, get_logger, int_flag, load_model)

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20     # JSON escaping can grow 32000 characters six-fold; this leaves room
WAIT_FOR_REPLICA_S = 300     # then 503: better an answer than a hung client
CLIENT_TIMEOUT_S = 60        # a connection that sends nothing for this long is closed
PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
PART_TYPES = ("text", "python", "python_output")
log = get_logger("serve")


class RequestError(Exception):
    """A client mistake, answered with `status` and {"error": {"message", "type", "param"}}."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class Replica:
    """One model copy with its engine; serves one request at a time."""

    def __init__(self, replica_id, model, tokenizer):
        self.id, self.model, self.tokenizer, self.engine = replica_id, model, tokenizer, Engine(model, tokenizer)
        self.device, self.max_context = next(model.parameters()).device, model.config.sequence_len


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
    """A thread per connection; replicas wait in a queue and each request borrows one."""
    daemon_threads = True

    def __init__(self, address, replicas, defaults, model_name):
        super().__init__(address, ChatHandler)
        self.replicas, self.defaults, self.model_name = replicas, defaults, model_name
        self.free, self.counts, self.counts_lock = queue.Queue(), {"completions": 0, "disconnects": 0}, threading.Lock()
        for replica in replicas:
            self.free.put(replica)

    def add_replica(self, replica):
        self.replicas.append(replica)
        self.free.put(replica)

    def count(self, name):
        with self.counts_lock:
            self.counts[name] += 1

    @contextlib.contextmanager
    def borrow_replica(self):
        try:
            replica = self.free.get(timeout=WAIT_FOR_REPLICA_S)
        except queue.Empty:
            raise RequestError(f"all {len(self.replicas)} model replicas stayed busy for {WAIT_FOR_REPLICA_S} s: "
                               "try again later", status=503) from None
        try:
            yield replica
        finally:
            self.free.put(replica)  # whatever happened: finished, failed, or the client went away

    def health(self):
        return {"status": "ok", "ready": True, "model": self.model_name, "num_gpus": len(self.replicas),
                "available_workers": self.free.qsize(), "defaults": self.defaults}

    def stats(self):
        free = self.free.qsize()
        return {"total_workers": len(self.replicas), "available_workers": free,
                "busy_workers": len(self.replicas) - free, **self.counts,
                "workers": [{"gpu_id": r.id, "device": str(r.device)} for r in self.replicas]}


def make_server(replicas, host="127.0.0.1", port=8000, temperature=0.8, top_k=50, max_tokens=512, model_name="nanochat"):
    """Bind (port 0: any free port, see server.server_address) without serving; call serve_forever()."""
    defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
    return ChatServer((host, port), replicas, defaults, model_name)


def reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def error_body(message, param=None, status=400):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ChatHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nanochat"
    timeout = CLIENT_TIMEOUT_S

    # -- plumbing: one log line per request, JSON everywhere --

    def handle_one_request(self):
        self.started, self.status, self.note = time.perf_counter(), None, ""
        super().handle_one_request()
        if self.status is not None:
            elapsed_ms = (time.perf_counter() - self.started) * 1000
            request = f"{self.command} {getattr(self, 'path', '')[:100]}"  # no path when the request line was bad
            log.info(f"{self.client_address[0]} {request} {self.status} {elapsed_ms:.0f}ms {self.note}".rstrip())

    def parse_request(self):  # the request line has arrived: time from here, not from an idle keep-alive
        self.started = time.perf_counter()
        return super().parse_request()

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def log_message(self, format, *args):
        pass  # handle_one_request logs instead

    def send_error(self, code, message=None, explain=None):  # also the base class's: bad request line, no do_PUT...
        status = HTTPStatus.METHOD_NOT_ALLOWED if code == HTTPStatus.NOT_IMPLEMENTED else code
        self.send_json(status, error_body(message or HTTPStatus(status).phrase, status=status), close=True)

    def send_json(self, status, payload, close=False):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
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
        if not length.strip().isdigit():
            raise RequestError(f"Content-Length must be a non-negative integer, got {length!r}")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the request body has {int(length)} bytes, at most {MAX_BODY_BYTES} allowed", status=413)
        try:
            return json.loads(self.rfile.read(int(length)), parse_constant=reject_constant)
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
            self.send_json(e.status, error_body(e.message, e.param, e.status), close=True)
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
        seed = job["seed"] if job["seed"] is not None else random.randrange(2**31)
        self.server.count("completions")
        with self.server.borrow_replica() as replica:
            result = {"tokens": 0, "finish_reason": "length"}

            def reply_tokens():
                device = torch.cuda.device(replica.device) if replica.device.type == "cuda" else contextlib.nullcontext()
                with device:
                    for column, _ in replica.engine.generate(prompt, 1, max_tokens, job["temperature"],
                                                             job["top_k"] or None, job["top_p"], seed):
                        if column[0] in replica.engine.stop_tokens:
                            result["finish_reason"] = "stop"
                            return
                        result["tokens"] += 1
                        yield column[0]

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
                tokens.close()  # stops the engine at once when the client left mid-reply
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
        server.add_replica(Replica(i, model, tokenizer))
    server.model_name = f"nanochat-{args.stage}-{meta['model_tag']}"
    log.info(f"serving {server.model_name} with {len(devices)} replica(s) on {devices[0].type}: "
             f"http://{args.host}:{server.server_address[1]}/  (Ctrl+C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
