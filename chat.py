"""Talk to a trained model in the terminal.

    python chat.py                                   # interactive chat with the latest SFT checkpoint
    python chat.py -p "Why is the sky blue?"         # answer once and exit
    python chat.py --stage rl --temperature 0.8      # another stage / sampling settings

Runs on the CPU, Apple MPS or one GPU (picked automatically, or --device-type cpu|mps|cuda).
The reply streams as it is generated; calculator calls show as [calculator: 2+3 = 5].
Commands: /clear (new conversation), /temperature v, /topk v (0 = off), /maxtokens n, /help, /quit (also quit, exit).
Ctrl-C during a reply stops that reply; Ctrl-C or Ctrl-D at the prompt leaves.
A conversation longer than the model's context loses its oldest turns (you are told when).
"""
import argparse
import contextlib
import sys

import torch

from common import (Engine, NanochatError, Utf8Streamer, add_sampling_flags, argument_parser, build_chat_prompt, compute_init, float_flag,
                    int_flag, load_model, reply_to_content)
from model import DECODE_DTYPES

HELP = "commands: /clear  /temperature v  /topk v  /maxtokens n  /help  /quit"


def parse_args():
    parser = argument_parser(__doc__)
    parser.add_argument("--stage", default="sft", choices=["sft", "rl", "base"], help="which checkpoint family")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag, e.g. d20 (None = most recent)")
    parser.add_argument("-s", "--step", type=int_flag(0), default=None, help="checkpoint step (None = most recent)")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    add_sampling_flags(parser, temperature=0.6)
    parser.add_argument("-m", "--max-tokens", type=int_flag(1), default=512,
                        help="longest reply, in tokens (at most what the model's context leaves)")
    parser.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES,
                        help="weight precision for decoding (auto: int8a8 on a CPU for matrices over 32 MB, "
                             "else the compute dtype)")
    parser.add_argument("--compile", action="store_true",
                        help="decode steps through torch.compile: faster tokens after a slow first reply (compiling)")
    parser.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    return parser.parse_args()


def stream_reply(engine, prompt, settings, seed):
    """Print the reply as it is generated; Ctrl-C stops it early. Returns the reply's tokens."""
    streamer, tokens = Utf8Streamer(engine.tokenizer), []
    try:
        for column, _ in engine.generate(prompt, max_tokens=settings["max_tokens"], seed=seed,
                                         temperature=settings["temperature"], top_k=settings["top_k"] or None):
            if column[0] in engine.stop_tokens:
                break
            tokens.append(column[0])
            print(streamer.push(column[0]), end="", flush=True)
    except KeyboardInterrupt:
        print(streamer.flush() + " [stopped]", end="")
    print(streamer.flush(), flush=True)
    return tokens


SETTINGS = {"/temperature": ("temperature", float_flag(0, 2)), "/topk": ("top_k", int_flag(0)),
            "/maxtokens": ("max_tokens", int_flag(1))}


def run_command(line, settings, messages):
    """Handle a /command; returns False to quit."""
    name, _, value = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/clear":
        messages.clear()
        print("(new conversation)")
    elif name == "/help":
        print(HELP)
    elif name in SETTINGS:
        key, parse = SETTINGS[name]
        try:
            settings[key] = parse(value.strip())
            print(f"({key.replace('_', ' ')} {settings[key]})")
        except Exception as e:  # argparse's type error says what is allowed
            print(f"({name} needs a value: {e}) {HELP}")
    else:
        print(f"(unknown command {name}) {HELP}")
    return True


def answer(engine, messages, settings, seed, prefix=""):
    """Add the assistant's reply to `messages`, trimming the oldest turns if the context is full.
    Returns False when the last message alone is too long (it is removed again)."""
    try:
        prompt, dropped, max_tokens = build_chat_prompt(engine.tokenizer, messages, engine.model.config.sequence_len,
                                                        settings["max_tokens"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        messages.pop()
        return False
    if dropped:
        del messages[:2 * dropped]
        print(f"(the conversation outgrew the model's context: forgot the {dropped} oldest turn(s))", file=sys.stderr)
    print(prefix, end="", flush=True)  # after any notice, so that it does not split the reply
    tokens = stream_reply(engine, prompt, dict(settings, max_tokens=max_tokens), seed)
    messages.append({"role": "assistant", "content": reply_to_content(engine.tokenizer, tokens)})
    return True


def main():
    args = parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the conversation itself
        _, _, _, _, device = compute_init(args.device_type)
        model, tokenizer, _ = load_model(args.stage, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer, args.decode_dtype, args.compile)  # inference only: weights stored once
    settings = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    messages = []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        return 0 if answer(engine, messages, settings, seed=42) else 1
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"nanochat {args.stage} model ({device}). {HELP}")
    for turn in range(10**9):
        try:
            line = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("quit", "exit") or (line.startswith("/") and not run_command(line, settings, messages)):
            return 0
        if line.startswith("/"):
            continue
        messages.append({"role": "user", "content": line})
        answer(engine, messages, settings, seed=42 + turn, prefix="Assistant: ")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NanochatError as e:
        sys.exit(f"error: {e}")
