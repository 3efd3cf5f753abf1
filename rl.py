"""Reinforcement learning on GSM8K (or SpellingBee): on-policy REINFORCE with a mean baseline (a simplified GRPO).

For each question the model samples several answers through the KV-cache engine, with the calculator
tool on; reward = 1 for the correct final number, advantage = reward - mean reward of the question's
samples; the loss is the advantage-weighted log-likelihood of the sampled tokens (tool outputs and the
prompt excluded), normalized per token. No KL term, no reference model, no clipping: every step samples
fresh from the current weights.

    python rl.py                                     # CPU / one GPU, from the latest SFT checkpoint
    torchrun --nproc_per_node=8 rl.py                # 8 GPUs (examples per step are split over ranks)
    python rl.py --num-iterations 20 --num-samples 4 --device-batch-size 4 --max-new-tokens 128   # small CPU run
    python rl.py --resume-from-step 60               # continue exactly from a checkpoint of this run
    python rl.py --task spellingbee                  # letter counting: where a tiny (CPU) model earns reward

Several nodes: torchrun --nnodes=N --node_rank=i --master_addr=... --nproc_per_node=8 rl.py
Reads <base>/chatsft_checkpoints/<tag>/, writes <base>/chatrl_checkpoints/<tag>/ (model, optimizer shards,
meta) and metrics.jsonl with reward, calculator use and pass@k.
"""
import os
import time

import torch
import torch.distributed as dist

from common import (GSM8K, Engine, SpellingBee, NanochatError, ReplyParser, add_sampling_flags, add_stage_flags, argument_parser, compute_cleanup, compute_init, due,
                    float_flag, format_duration, int_flag, load_model, log_metrics, print0, read_metrics, report_section,
                    resume_run, run_meta, save_checkpoint, scale_lrs, set_schedule, start_run)


def parse_args(argv=None):
    p = argument_parser(__doc__)
    add_stage_flags(p, parent="SFT", lrs=(0.2, 0.004, 0.02))
    p.add_argument("--task", default="gsm8k", choices=["gsm8k", "spellingbee"],
                   help="what the reward grades: GSM8K answers, or SpellingBee letter counts")
    p.add_argument("--num-epochs", type=int_flag(1), default=1, help="passes over the task's train split")
    p.add_argument("--num-iterations", type=int_flag(1, never=True), default=-1,
                   help="cap on the number of steps (-1 = the epochs decide)")
    g = p.add_argument_group("sampling")
    g.add_argument("--device-batch-size", type=int_flag(1), default=8, help="samples per forward/backward pass")
    g.add_argument("--examples-per-step", type=int_flag(1), default=16, help="questions per step, over all ranks")
    g.add_argument("--num-samples", type=int_flag(1), default=16, help="samples per question")
    g.add_argument("--max-new-tokens", type=int_flag(1), default=256, help="longest sampled answer")
    add_sampling_flags(g, temperature=1.0)
    g = p.add_argument_group("optimization")
    g.add_argument("--weight-decay", type=float_flag(0), default=0.0, help="Muon weight decay")
    g.add_argument("--init-lr-frac", type=float_flag(0), default=0.05, help="all LRs are scaled by this")
    g = p.add_argument_group("evaluation and saving")
    g.add_argument("--eval-every", type=int_flag(1, never=True), default=60,
                   help="pass@k on the task's test split every N steps and at the end (-1 = never)")
    g.add_argument("--eval-examples", type=int_flag(1), default=400, help="test questions per evaluation")
    p.set_defaults(save_every=60)
    return p.parse_args(argv)


def rl_tasks(name):
    """(train, test) tasks of --task; the reward and pass@k grade the final '#### N' of a sample."""
    if name == "spellingbee":
        return SpellingBee(size=100_000, split="train"), SpellingBee(size=1000, split="test")
    return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")


def reward_thirds(metrics_path):
    """Mean reward over the first and over the last third of the steps logged, or None for under 3 steps."""
    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []  # rank 0 writes it
    rewards = [row["reward"] for row in rows if "reward" in row]
    third = len(rewards) // 3
    if third == 0:
        return None
    return sum(rewards[:third]) / third, sum(rewards[-third:]) / third


def sample_seed(*keys):
    """Seed of one engine call, a function of (step, example index, pass) only: a resumed run resamples
    exactly what the interrupted one would have. hash() of a tuple of ints is not salted per process."""
    return hash(keys) & 0x7FFFFFFF


def tool_use(tokenizer, sequences, masks, prompt_len):
    """(calculator calls, answered calls) in the samples: <|python_start|>...<|python_end|> blocks the
    model wrote (the engine ran each), and results the engine forced (mask 0)."""
    calls = results = 0
    for seq, mask in zip(sequences, masks):
        parser = ReplyParser(tokenizer)
        for token, m in zip(seq[prompt_len:], mask[prompt_len:]):
            what = parser.push(token)
            calls += what == "close" and parser.ended[0] == "python"
            results += what == "open" and parser.kind == "python_output" and m == 0
    return calls, results


@torch.no_grad()
def rollout(engine, tokenizer, task, index, num_samples, batch_size, step, args):
    """Sample `num_samples` answers to question `index` in passes of `batch_size`. Returns
    (sequences, masks, rewards, prompt_len): sequences are prompt + sample, masks 0 on prompt and tool output."""
    conversation = task[index]
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for sampling_pass in range(num_samples // batch_size):
        seqs, ms = engine.generate_batch(prompt, num_samples=batch_size, max_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k,
                                         seed=sample_seed(step, index, sampling_pass))
        sequences += seqs
        masks += ms
    rewards = [float(task.reward(conversation, tokenizer.decode(seq[len(prompt):]))) for seq in sequences]
    return sequences, masks, rewards, len(prompt)


def policy_gradient_loss(model, sequences, masks, advantages, pad_token, normalizer):
    """-sum(advantage * log p(sampled token)) over the learned tokens / normalizer; padding and
    tool outputs (mask 0) carry no gradient."""
    device = next(model.parameters()).device
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_token] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long, device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    logp = -model(inputs, targets, loss_reduction="none").view(targets.shape)  # 0 where ignored
    weights = torch.tensor(advantages, dtype=logp.dtype, device=device).unsqueeze(1)
    return -(logp * weights).sum() / ((targets >= 0).sum().clamp(min=1) * normalizer)


def rl_step(model, optimizer, engine, tokenizer, task, step, lrm, args, rank=0, world_size=1):
    """One on-policy step: sample this rank's questions of `step`, then one optimizer step on the
    advantage-weighted log-likelihood, gradients accumulated over every pass and question. Everything
    random derives from (step, question, pass), so a resumed run repeats it exactly. Returns stats
    summed over ranks: mean reward and sample length, calculator calls/results, loss."""
    device = next(model.parameters()).device
    examples_per_rank = args.examples_per_step // world_size
    model.eval()
    rollouts = []
    for k in range(examples_per_rank):
        index = (step * args.examples_per_step + rank + k * world_size) % len(task)
        rollouts.append(rollout(engine, tokenizer, task, index, args.num_samples, args.device_batch_size, step, args))
    model.train()
    set_schedule(optimizer, lrm)
    pad_token = tokenizer.encode_special("<|assistant_end|>")
    normalizer = (args.num_samples // args.device_batch_size) * examples_per_rank
    stats = torch.zeros(6, device=device)  # reward sum, samples, tokens sampled, calls, results, loss
    for sequences, masks, rewards, prompt_len in rollouts:
        mean_reward = sum(rewards) / len(rewards)
        advantages = [r - mean_reward for r in rewards]  # no std division: plain REINFORCE baseline
        for b in range(0, len(sequences), args.device_batch_size):
            batch = slice(b, b + args.device_batch_size)
            loss = policy_gradient_loss(model, sequences[batch], masks[batch], advantages[batch], pad_token,
                                        normalizer)
            loss.backward()
            stats[5] += loss.detach()
        stats[:5] += torch.tensor([sum(rewards), len(rewards), sum(len(s) - prompt_len for s in sequences),
                                   *tool_use(tokenizer, sequences, masks, prompt_len)], device=device)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return {"reward": (stats[0] / stats[1]).item(), "seq_len": (stats[2] / stats[1]).item(),
            "calculator_calls": int(stats[3].item()), "calculator_results": int(stats[4].item()),
            "loss": stats[5].item() / world_size}


@torch.no_grad()
def pass_at_k(engine, tokenizer, task, num_examples, k, args, rank, world_size, device):
    """pass@1..k on the first `num_examples` test questions (strided over ranks), k samples each."""
    hits = torch.zeros(k, device=device)
    total = torch.zeros((), device=device)
    for index in range(rank, min(num_examples, len(task)), world_size):
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=sample_seed(-1, index))
        correct = [bool(task.evaluate(conversation, tokenizer.decode(s[len(prompt):]))) for s in seqs]
        hits += torch.tensor([any(correct[:j + 1]) for j in range(k)], dtype=torch.float, device=device)
        total += 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(hits)
        dist.all_reduce(total)
    return {f"pass@{j + 1}": (hits[j] / total.clamp(min=1)).item() for j in range(k)}


def main(args):
    _, rank, _, world_size, device = compute_init(args.device_type)
    if args.examples_per_step % world_size:
        raise NanochatError(f"--examples-per-step {args.examples_per_step} must be a multiple of the "
                            f"number of GPUs ({world_size})")
    if args.num_samples % args.device_batch_size:
        raise NanochatError(f"--num-samples {args.num_samples} must be a multiple of --device-batch-size "
                            f"{args.device_batch_size}")
    model, tokenizer, sft_meta = load_model("sft", device, phase="train", model_tag=args.model_tag,
                                            step=args.model_step)
    model_tag = sft_meta["model_tag"]
    engine = Engine(model, tokenizer)
    train_task, val_task = rl_tasks(args.task)
    num_steps = (len(train_task) // args.examples_per_step) * args.num_epochs
    if args.num_iterations > 0:
        num_steps = min(num_steps, args.num_iterations)
    if num_steps < 1:
        raise NanochatError(f"{args.task} train has {len(train_task)} questions, fewer than --examples-per-step "
                            f"{args.examples_per_step}: lower it")
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    scale_lrs(optimizer, args.init_lr_frac)
    out_dir, metrics_path = start_run("rl", model_tag, args.resume_from_step)
    step = 0
    if args.resume_from_step >= 0:
        step = resume_run(out_dir, args.resume_from_step, device, model, optimizer, rank)["step"]
    print0(f"RL {model_tag}: {num_steps} steps x {args.examples_per_step} questions x {args.num_samples} samples, "
           f"{args.max_new_tokens} new tokens max, LR x {args.init_lr_frac}")

    t_start, start_step, evals, first_evals = time.time(), step, {}, {}
    while True:
        last_step = step >= num_steps
        if due(args.eval_every, step, last_step):
            model.eval()
            evals = pass_at_k(engine, tokenizer, val_task, args.eval_examples, args.device_batch_size, args,
                              rank, world_size, device)
            model.train()
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in evals.items()))
            log_metrics(metrics_path, step=step, **evals)
            first_evals = first_evals or evals
        if last_step or due(args.save_every, step, last_step, after=start_step):
            meta = run_meta(step, model, args, model_tag, {"num_steps": num_steps}, parent_step=sft_meta["step"])
            save_checkpoint(out_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank)
            print0(f"saved {out_dir} step {step}")
        if last_step:
            break

        t0 = time.time()
        lrm = 1.0 - step / num_steps
        stats = rl_step(model, optimizer, engine, tokenizer, train_task, step, lrm, args, rank, world_size)
        step += 1
        dt = time.time() - t0
        eta = (time.time() - t_start) / (step - start_step) * (num_steps - step)
        print0(f"step {step - 1:05d}/{num_steps} | reward {stats['reward']:.3f} | seq len {stats['seq_len']:.1f} | "
               f"calculator calls {stats['calculator_calls']} ({stats['calculator_results']} answered) | "
               f"loss {stats['loss']:.6f} | lrm {lrm:.3f} | {dt:.1f}s | eta {format_duration(eta)}")
        log_metrics(metrics_path, step=step - 1, **stats, lrm=lrm, dt=dt)
    thirds = reward_thirds(metrics_path)
    if thirds:
        print0(f"mean reward: first third of the steps {thirds[0]:.3f}, last third {thirds[1]:.3f}")
    if first_evals and evals and start_step == 0:
        print0(f"{args.task} test pass@1: {first_evals['pass@1']:.4f} before RL (the SFT model), "
               f"{evals['pass@1']:.4f} after")
    report_section("Chat RL", {"task": args.task, "steps": step, "examples per step": args.examples_per_step,
                               "samples per question": args.num_samples,
                               "mean reward, first third of the steps": thirds[0] if thirds else None,
                               "mean reward, last third of the steps": thirds[1] if thirds else None,
                               "pass@1 before RL (the SFT model)": first_evals.get("pass@1") if start_step == 0 else None,
                               **evals}, column="RL")
    compute_cleanup()


if __name__ == "__main__":
    main(parse_args())
