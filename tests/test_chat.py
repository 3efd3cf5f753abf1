"""chat.py end to end: a tiny checkpoint in a temporary base dir, chat.py run as a subprocess with -p and
with commands piped into stdin; plus Ctrl-C during a reply and the no-checkpoint message."""
import dataclasses
import os
import subprocess
import sys

import pytest

import chat
from common import Engine, build_chat_prompt, checkpoint_dir, display_text, save_checkpoint
from test_engine import make_model, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 40


def save_tiny_checkpoint(base_dir, sequence_len=128):
    """Save a tokenizer and an SFT checkpoint; returns an in-process Engine over the same weights."""
    tok = make_tokenizer()
    tok.save(str(base_dir / "tokenizer"))
    model = make_model(tok.get_vocab_size(), sequence_len=sequence_len)
    meta = {"model_config": dataclasses.asdict(model.config), "step": 5}
    save_checkpoint(checkpoint_dir("sft", "d2"), 5, model.state_dict(), None, meta)
    return Engine(model, tok)


@pytest.fixture
def tiny_checkpoint(base_dir):
    return save_tiny_checkpoint(base_dir)


def expected_reply(engine, messages, max_tokens=MAX_TOKENS):
    prompt, _, max_tokens = build_chat_prompt(engine.tokenizer, messages, engine.model.config.sequence_len,
                                              max_tokens)
    (sequence,), _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return display_text(engine.tokenizer, sequence[len(prompt):])


def run_chat(*args, stdin=""):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--device-type", "cpu", *args],
                          input=stdin, capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)


def test_prompt_mode_answers_and_exits(tiny_checkpoint):
    result = run_chat("-p", "hello world", "--temperature", "0", "--max-tokens", str(MAX_TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_reply(tiny_checkpoint, [{"role": "user", "content": "hello world"}]) + "\n"


def test_interactive_commands_through_a_pipe(tiny_checkpoint):
    stdin = "/temperature 0\nhello world\n/topk 5\n\n/bogus\n/clear\nthe fox\nquit\nnever read\n"
    result = run_chat("--max-tokens", str(MAX_TOKENS), stdin=stdin)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(temperature 0.0)" in out and "(top k 5)" in out and "(new conversation)" in out
    assert "(unknown command /bogus)" in out and "/temperature v" in out.split("(top k 5)")[1]
    first = expected_reply(tiny_checkpoint, [{"role": "user", "content": "hello world"}])
    after_clear = expected_reply(tiny_checkpoint, [{"role": "user", "content": "the fox"}])  # no history
    assert f"Assistant: {first}\n" in out and f"Assistant: {after_clear}\n" in out
    assert out.count("Assistant: ") == 2  # stopped at "quit"


def test_long_conversation_forgets_oldest_turns(tiny_checkpoint, capsys):
    # context 128, room for a reply of 64 (half the context): the second turn cannot keep the first one
    result = run_chat("--max-tokens", "100", "-t", "0", stdin="hello world\n" + "the quick brown fox " * 8 + "\n")
    assert result.returncode == 0, result.stderr
    assert "forgot the 1 oldest turn(s)" in result.stderr
    messages = [{"role": "user", "content": "the quick brown fox " * 40}]  # alone longer than the context
    assert not chat.answer(tiny_checkpoint, messages, {"max_tokens": 100, "temperature": 0.0, "top_k": 0}, seed=0)
    assert messages == [] and "too long" in capsys.readouterr().err


@pytest.mark.parametrize("context", [128, 256])
def test_default_flags_answer_on_small_contexts(base_dir, context):
    """The default --max-tokens exceeds these contexts: the reply gets what the context leaves."""
    engine = save_tiny_checkpoint(base_dir, sequence_len=context)
    result = run_chat("-p", "hello world", "-t", "0")
    assert result.returncode == 0, result.stderr
    reply = expected_reply(engine, [{"role": "user", "content": "hello world"}], max_tokens=512)
    assert reply and result.stdout == reply + "\n"
    result = run_chat(stdin="/maxtokens 0\n/maxtokens 7\nhello world\n")
    assert "(/maxtokens needs a value" in result.stdout and "(max tokens 7)" in result.stdout
    assert result.stdout.count("Assistant: ") == 1


def test_missing_checkpoint_names_the_fix(base_dir):
    result = run_chat("-p", "hi")
    assert result.returncode != 0 and "sft.py" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_stops_only_the_reply(capsys):
    tok = make_tokenizer()

    class InterruptedEngine:
        tokenizer, stop_tokens = tok, {tok.get_bos_token_id()}

        def generate(self, *args, **kwargs):
            for token in tok.encode("the quick"):
                yield [token], [1]
            raise KeyboardInterrupt

    tokens = chat.stream_reply(InterruptedEngine(), [0], {"max_tokens": 10, "temperature": 0.0, "top_k": 0}, 0)
    assert tokens == tok.encode("the quick")
    assert capsys.readouterr().out == "the quick [stopped]\n"
