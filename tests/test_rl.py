"""rl.py: rollouts through the calculator, the policy-gradient loss, exact resume (in-process and script)."""
import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F

from common import AnswerGraded, Engine, Task, Tokenizer, load_checkpoint, save_checkpoint
from model import GPTConfig, build_gpt
from rl import policy_gradient_loss, rl_step, rollout, tool_use
from test_chain import RL_FLAGS, RL_STEPS, chain_dir, copy_of, read_jsonl, run_script, tear_last_line

CHAT = {"messages": [{"role": "user", "content": "what is two plus three"},
                     {"role": "assistant", "content": [{"type": "text", "text": "so "},
                                                       {"type": "python", "text": "2+3"},
                                                       {"type": "python_output", "text": "5"},
                                                       {"type": "text", "text": " #### 5"}]}]}


class OneQuestion(AnswerGraded, Task):
    """Test data: the same GSM8K-style question `size` times, graded on its '#### 5'."""

    def __init__(self, size=4):
        super().__init__()
        self.size = size

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return CHAT


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


_cache = {}


def tool_calling_model():
    """(tokenizer, model): a tiny GPT overfit on CHAT, so it writes the calculator call by itself."""
    if not _cache:
        tokenizer = Tokenizer.train(iter(["what is two plus three so #### 5 2+3 " * 40]), 300)
        ids, _ = tokenizer.render_conversation(CHAT)
        torch.manual_seed(0)
        config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                           n_embd=64)
        model = build_gpt(config, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        for _ in range(40):
            model(x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _cache["v"] = tokenizer, model
    tokenizer, model = _cache["v"]
    return tokenizer, copy.deepcopy(model)


def rl_args(**kw):
    return types.SimpleNamespace(**{**dict(max_new_tokens=16, temperature=1.0, top_k=None, examples_per_step=2,
                                           num_samples=4, device_batch_size=2), **kw})


def test_rollouts_run_through_the_calculator():
    tokenizer, model = tool_calling_model()
    task = OneQuestion()
    sequences, masks, rewards, prompt_len = rollout(Engine(model, tokenizer), tokenizer, task, 0, 4, 2, 0,
                                                    rl_args(temperature=0.0))
    assert len(sequences) == 4 and rewards == [1.0] * 4
    calls, results = tool_use(tokenizer, sequences, masks, prompt_len)
    assert calls == results == 4
    output_start = tokenizer.encode_special("<|output_start|>")
    for seq, mask in zip(sequences, masks):
        i = seq.index(output_start)
        assert mask[i:i + 3] == [0, 0, 0] and tokenizer.decode(seq[i + 1:i + 2]) == "5"  # forced by the engine
        assert all(m == 0 for m in mask[:prompt_len])


def test_policy_gradient_loss_weights_learned_tokens_by_advantage():
    tokenizer, model = tool_calling_model()
    sequences = [[1, 5, 6, 7, 8], [1, 5, 9]]
    masks = [[0, 0, 1, 0, 1], [0, 0, 1]]  # a forced tool token in the middle of row 0 carries no gradient
    advantages = [0.5, -1.0]
    loss = policy_gradient_loss(model, sequences, masks, advantages, pad_token=3, normalizer=2)
    logp = F.log_softmax(model(torch.tensor([[1, 5, 6, 7], [1, 5, 3, 3]])), dim=-1)
    expected = 0.5 * (logp[0, 1, 6] + logp[0, 3, 8]) - 1.0 * logp[1, 1, 9]
    assert torch.allclose(loss, -expected / (3 * 2), atol=1e-5)


def test_resumed_steps_match_uninterrupted_ones(tmp_path):
    """Mixed rewards (hot sampling) so the steps really move the weights; resume from a saved checkpoint."""
    tokenizer, base_model = tool_calling_model()
    task, args = OneQuestion(), rl_args(temperature=1.5)

    def fresh():
        model = copy.deepcopy(base_model)
        optimizer = model.setup_optimizer()
        for group in optimizer.param_groups:
            group["lr"] *= 0.05
            group["initial_lr"] = group["lr"]
        return model, optimizer

    model, optimizer = fresh()
    stats = []
    for step in range(3):
        stats.append(rl_step(model, optimizer, Engine(model, tokenizer), tokenizer, task, step, 1 - step / 3, args))
        if step == 1:
            save_checkpoint(str(tmp_path), 2, model.state_dict(), optimizer.state_dict(), {"step": 2})
    assert any(s["loss"] != 0.0 for s in stats) and any(0 < s["reward"] < 1 for s in stats)
    resumed, resumed_optimizer = fresh()
    model_state, optim_state, _ = load_checkpoint(str(tmp_path), 2, "cpu", load_optimizer=True)
    resumed.load_state_dict(model_state)
    resumed_optimizer.load_state_dict(optim_state)
    again = rl_step(resumed, resumed_optimizer, Engine(resumed, tokenizer), tokenizer, task, 2, 1 / 3, args)
    assert again == stats[2]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_script_resume_repeats_the_run(tmp_path_factory, http_mirror, tmp_path):
    chain = chain_dir(tmp_path_factory, http_mirror)
    expected = read_jsonl(chain / "chatrl_checkpoints" / "d2" / "metrics.jsonl")
    base = copy_of(chain, tmp_path / "base")
    tear_last_line(base / "chatrl_checkpoints" / "d2" / "metrics.jsonl")  # killed mid-way through a line
    run_script(base, http_mirror, "rl.py", *RL_FLAGS, "--resume-from-step", RL_STEPS - 1)
    got = read_jsonl(base / "chatrl_checkpoints" / "d2" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "dt"} for r in rows]  # noqa: E731
    assert drop_time(got) == drop_time(expected)
    a = torch.load(chain / "chatrl_checkpoints" / "d2" / f"model_{RL_STEPS:06d}.pt")
    b = torch.load(base / "chatrl_checkpoints" / "d2" / f"model_{RL_STEPS:06d}.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_thirds_compare_the_first_and_last_third_of_the_steps(tmp_path):
    from rl import reward_thirds
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "pass@1": 0.5}] + [{"step": s, "reward": r} for s, r in enumerate([0.1, 0.2, 0.3, 0.3, 0.6, 0.7, 0.8])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, last = reward_thirds(path)
    assert first == pytest.approx(0.15) and last == pytest.approx(0.75)  # 7 steps: thirds of 2
    path.write_text(json.dumps({"step": 0, "reward": 1.0}) + "\n")
    assert reward_thirds(path) is None and reward_thirds(tmp_path / "missing.jsonl") is None


def test_spellingbee_task_trains_and_reports(tmp_path_factory, http_mirror, tmp_path):
    """rl.py --task spellingbee: rewards come from SpellingBee's grader, pass@1 before and after is printed,
    and the report section names the task."""
    base = copy_of(chain_dir(tmp_path_factory, http_mirror), tmp_path / "base")
    proc = run_script(base, http_mirror, "rl.py", "--task", "spellingbee", "--num-iterations", 3,
                      "--examples-per-step", 1, "--num-samples", 2, "--device-batch-size", 2, "--max-new-tokens", 16,
                      "--eval-every", 3, "--eval-examples", 2)
    rows = read_jsonl(base / "chatrl_checkpoints" / "d2" / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [0, 1, 2]
    assert "mean reward: first third of the steps" in proc.stdout
    assert "spellingbee test pass@1:" in proc.stdout and "before RL (the SFT model)" in proc.stdout
    assert "- task: spellingbee" in (base / "report" / "chat-rl.md").read_text()
    bad = run_script(base, http_mirror, "rl.py", "--task", "arc", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--task" in bad.stderr
