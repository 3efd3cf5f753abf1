"""Chat fine-tuning (SFT): teach the pretrained base model the conversation format, multiple choice,
calculator use and spelling, on a mixture of chat datasets, learning only the assistant's tokens.

    python sft.py                                   # CPU / one GPU; sizes and LRs come from the base checkpoint
    torchrun --nproc_per_node=8 sft.py              # 8 GPUs (same world size as pretraining: optimizer warm start)
    python sft.py --max-seq-len 256 --device-batch-size 4 --num-iterations 100 --mmlu-epochs 0   # small CPU run
    python sft.py --resume-from-step 400            # continue a run exactly where its checkpoint left it

Several nodes: torchrun --nnodes=N --node_rank=i --master_addr=... --nproc_per_node=8 sft.py
Reads <base>/base_checkpoints/<tag>/ (latest step unless --model-step), writes
<base>/chatsft_checkpoints/<tag>/: model, optimizer shards, meta (with the packer position for exact
resume) and metrics.jsonl.
"""
import argparse
import glob
import math
import os
import time

import torch
import torch.distributed as dist

from common import (CATEGORICAL_TASKS, CHAT_TASKS, GSM8K, MMLU, CustomJSON, MissingSplitError, NanochatError,
                    add_stage_flags,
                    SimpleSpelling, SmolTalk, SpellingBee, TaskMixture, argument_parser, chatcore, checkpoint_dir,
                    compute_cleanup, compute_init, due, evaluate_bpb, float_flag, format_duration, gather_states,
                    get_token_bytes, int_flag, load_checkpoint, load_model, log_metrics, print0, report_section,
                    resume_run, run_chat_eval, run_meta, save_checkpoint, scale_lrs, set_schedule, start_run)


def parse_args(argv=None):
    p = argument_parser(__doc__)
    add_stage_flags(p, parent="base")
    p.add_argument("--load-optimizer", type=int_flag(0, 1), default=1, help="1: warm-start the optimizer from the base run")
    p.add_argument("--num-iterations", type=int_flag(1, never=True), default=-1,
                   help="optimizer steps (-1 = one epoch of the mixture)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (None = on for CUDA, off elsewhere)")
    g = p.add_argument_group("sizes (None = the base run's)")
    g.add_argument("--max-seq-len", type=int_flag(2), default=None, help="row length in tokens")
    g.add_argument("--device-batch-size", type=int_flag(1), default=None, help="rows per micro-step")
    g.add_argument("--total-batch-size", type=int_flag(1), default=None, help="tokens per optimizer step")
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--init-lr-frac", type=float_flag(0), default=0.8, help="all LRs are scaled by this at the start")
    g.add_argument("--warmup-ratio", type=float_flag(0, 1), default=0.0, help="share of the run of LR warmup")
    g.add_argument("--warmdown-ratio", type=float_flag(0, 1), default=0.5, help="share of the run of LR decay")
    g.add_argument("--final-lr-frac", type=float_flag(0, 1), default=0.0, help="LR at the end, as a share")
    g = p.add_argument_group("evaluation and saving")
    g.add_argument("--eval-every", type=int_flag(1, never=True), default=200,
                   help="val bpb every N steps and at the end (-1 = never)")
    g.add_argument("--eval-tokens", type=int_flag(1), default=40 * 524288, help="val tokens per evaluation")
    g.add_argument("--chatcore-every", type=int_flag(1, never=True), default=200,
                   help="ChatCORE every N steps and at the end (-1 = never)")
    g.add_argument("--chatcore-max-cat", type=int_flag(1, never=True), default=-1,
                   help="problems per categorical task (-1 = all)")
    g.add_argument("--chatcore-max-sample", type=int_flag(1), default=24, help="problems per generative task")
    g.add_argument("--chatcore-max-new-tokens", type=int_flag(1), default=512, help="reply length limit")
    g = p.add_argument_group("the mixture (0 leaves a task out)")
    g.add_argument("--smoltalk-epochs", type=int_flag(0), default=1, help="SmolTalk passes")
    g.add_argument("--mmlu-epochs", type=int_flag(0), default=3, help="MMLU auxiliary_train passes")
    g.add_argument("--gsm8k-epochs", type=int_flag(0), default=4, help="GSM8K train passes")
    g.add_argument("--identity-epochs", type=int_flag(0), default=2, help="identity conversation passes")
    g.add_argument("--identity-path", default=None, help="identity chats jsonl, path or URL (None = nanochat's)")
    g.add_argument("--identity-size", type=int_flag(1, never=True), default=-1,
                   help="identity conversations per pass (-1 = all)")
    g.add_argument("--simple-spelling-size", type=int_flag(0), default=200_000, help="SimpleSpelling examples")
    g.add_argument("--spelling-bee-size", type=int_flag(0), default=80_000, help="SpellingBee examples")
    g.add_argument("--spelling-bee-short-frac", type=float_flag(0, 1), default=0.0,
                   help="share of SpellingBee answers that are the python call alone; the rest spell, count, "
                        "then check with python")
    g.add_argument("--gsm8k-size", type=int_flag(1, never=True), default=-1,
                   help="GSM8K train problems per pass (-1 = all 7473)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data: the mixture and the best-fit packer
# ---------------------------------------------------------------------------------------------

def build_train_mixture(args):
    """Each task is passed `epochs` times: TaskMixture shuffles all entries once, so that oversamples it."""
    tasks = [SmolTalk(split="train")] * args.smoltalk_epochs
    if args.mmlu_epochs > 0:
        try:
            mmlu = MMLU(subset="auxiliary_train", split="train")
        except MissingSplitError as e:
            raise MissingSplitError(f"MMLU auxiliary_train is missing from the data source: pass --mmlu-epochs 0 "
                                    f"to train without it ({e})") from None
        tasks += [mmlu] * args.mmlu_epochs
    if args.gsm8k_epochs > 0:
        stop = args.gsm8k_size if args.gsm8k_size > 0 else None
        tasks += [GSM8K(subset="main", split="train", stop=stop)] * args.gsm8k_epochs
    if args.identity_epochs > 0:
        stop = args.identity_size if args.identity_size > 0 else None
        identity = CustomJSON(args.identity_path, stop=stop) if args.identity_path else CustomJSON(stop=stop)
        tasks += [identity] * args.identity_epochs
    if args.simple_spelling_size > 0:
        tasks.append(SimpleSpelling(size=args.simple_spelling_size, split="train"))
    if args.spelling_bee_size > 0:
        tasks.append(SpellingBee(size=args.spelling_bee_size, split="train",
                                 short_frac=args.spelling_bee_short_frac))
    if not tasks:
        raise NanochatError("the SFT mixture is empty: give at least one task a non-zero epoch count or size")
    return TaskMixture(tasks)


def build_val_mixture():
    return TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                        GSM8K(subset="main", split="test", stop=420)])


def new_packer_state(rank):
    return {"cursor": rank, "epoch": 0, "buffer": [], "consumed": 0, "truncated": 0, "skipped": 0}


def render_for_row(tokenizer, conversation, capacity):
    """(ids, mask, was_truncated): rendered and cut to one row, so every conversation fits somewhere."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=capacity + 1)
    return ids[:capacity], mask[:capacity], len(ids) > capacity


def sft_batches(dataset, tokenizer, batch_size, seq_len, device, state, rank=0, world_size=1, buffer_size=100):
    """Best-fit packing with padding: each row (seq_len + 1 tokens) takes the longest buffered conversation
    that still fits, again and again, then is padded with BOS (mask 0). Conversations longer than a row are
    truncated to it (counted), those left with nothing to learn are skipped (counted), so no row stalls and
    every row has a supervised token. Yields (inputs, targets, state); `state` (a fresh dict) is the packer
    position after this batch: the buffer holds dataset indices and is re-rendered on resume."""
    capacity = seq_len + 1
    bos = tokenizer.get_bos_token_id()
    state = dict(state, buffer=list(state["buffer"]))
    buffer = [(i, *render_for_row(tokenizer, dataset[i], capacity)[:2]) for i in state["buffer"]]

    def refill(buffer):
        attempts = 0
        while len(buffer) < buffer_size:
            attempts += 1
            if attempts > len(dataset) and not buffer:
                raise NanochatError(f"no conversation has a supervised token within {capacity} tokens: "
                                    "raise --max-seq-len")
            index = state["cursor"]
            state["cursor"] += world_size
            if state["cursor"] >= len(dataset):
                state["cursor"] %= len(dataset)
                state["epoch"] += 1
            ids, mask, truncated = render_for_row(tokenizer, dataset[index], capacity)
            state["truncated"] += truncated
            if not any(mask[1:]):  # nothing left to learn: consumed, but never packed
                state["skipped"] += 1
                state["consumed"] += world_size
                continue
            buffer.append((index, ids, mask))

    while True:
        rows, masks = [], []
        for _ in range(batch_size):
            row, row_mask = [], []
            while True:
                refill(buffer)  # before every pick, as the reference does
                space = capacity - len(row)
                fitting = [k for k, item in enumerate(buffer) if len(item[1]) <= space]
                if not fitting:
                    break
                _, ids, mask = buffer.pop(max(fitting, key=lambda k: len(buffer[k][1])))  # first of the longest
                row += ids
                row_mask += mask
                state["consumed"] += world_size
            rows.append(row + [bos] * (capacity - len(row)))
            masks.append(row_mask + [0] * (capacity - len(row_mask)))
        batch = torch.tensor(rows, dtype=torch.long)
        targets = batch[:, 1:].clone()
        targets[torch.tensor(masks)[:, 1:] == 0] = -1
        state["buffer"] = [item[0] for item in buffer]
        yield batch[:, :-1].to(device), targets.to(device), dict(state, buffer=list(state["buffer"]))


def sft_loss(model, inputs, targets):
    """Mean cross-entropy over the supervised targets; exactly 0 (not NaN) when there are none."""
    return model(inputs, targets, loss_reduction="sum") / (targets >= 0).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Schedules, logging, checkpoints
# ---------------------------------------------------------------------------------------------

def lr_multiplier(progress, args):
    if progress < args.warmup_ratio:
        return (progress + 1e-8) / args.warmup_ratio
    if progress <= 1.0 - args.warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - args.warmdown_ratio)) / args.warmdown_ratio
    return (1 - decay) * 1.0 + decay * args.final_lr_frac


def muon_momentum(step):
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def resolve_sizes(args, base_meta, world_size):
    """seq len, device batch, total batch: flags win, else the base run's (as resolved there)."""
    seq_len = args.max_seq_len or base_meta.get("max_seq_len") or base_meta["model_config"]["sequence_len"]
    device_batch = args.device_batch_size or base_meta.get("device_batch_size") or 32
    tokens_per_micro = device_batch * seq_len * world_size
    total = args.total_batch_size
    if total is None:
        # the base total only carries over when the micro-batch shape does too
        inherited = base_meta.get("total_batch_size")
        overridden = args.max_seq_len or args.device_batch_size
        total = tokens_per_micro if overridden or not inherited else inherited
    if total % tokens_per_micro:
        raise NanochatError(f"--total-batch-size {total} is not a multiple of device batch x seq len x GPUs = "
                            f"{tokens_per_micro}: pass a --total-batch-size that is")
    return seq_len, device_batch, total, total // tokens_per_micro


def warm_start_optimizer(optimizer, base_meta, world_size, rank, device):
    """Load the base run's moments into the fresh optimizer, keeping the fresh LRs. Optimizer shards are per
    rank, so only with the world size pretraining had (every rank sees the same files and agrees)."""
    base_dir = checkpoint_dir("base", base_meta["model_tag"])
    shards = len(glob.glob(os.path.join(base_dir, f"optim_{base_meta['step']:06d}_rank*.pt")))
    if shards != world_size:
        print0(f"the base checkpoint has {shards} optimizer shard(s) for {world_size} rank(s) here: "
               "starting the optimizer fresh")
        return
    _, optim_state, _ = load_checkpoint(base_dir, base_meta["step"], device, load_optimizer=True, rank=rank)
    fresh_lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(optim_state)  # moments and step counts; it also overwrote the LRs:
    for group, lr in zip(optimizer.param_groups, fresh_lrs):
        group["lr"] = lr


def chat_scores(model, tokenizer, args, batch_size):
    """ChatCORE and the accuracy of each chat task, on the samples the flags set."""
    model.eval()
    accuracies = {}
    for name in CHAT_TASKS:
        limit = args.chatcore_max_sample
        if name in CATEGORICAL_TASKS:
            limit = args.chatcore_max_cat if args.chatcore_max_cat > 0 else None
        accuracies[name] = run_chat_eval(name, model, tokenizer, batch_size=batch_size,
                                         max_new_tokens=args.chatcore_max_new_tokens, max_problems=limit)
    model.train()
    return {"chatcore": chatcore(accuracies), "chatcore_cat": chatcore(accuracies, CATEGORICAL_TASKS), **accuracies}


def main(args):
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    # the parent checkpoint first: nothing is downloaded for a run that cannot start
    model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=args.model_tag,
                                             step=args.model_step)
    model_tag = base_meta["model_tag"]
    train_set, val_set = build_train_mixture(args), build_val_mixture()
    seq_len, device_batch, total_batch, grad_accum = resolve_sizes(args, base_meta, world_size)
    base_flags = base_meta.get("user_config", {})
    lrs = {k: getattr(args, k) if getattr(args, k) is not None else base_flags.get(k, default)
           for k, default in (("embedding_lr", 0.3), ("unembedding_lr", 0.004), ("matrix_lr", 0.02))}
    optimizer = model.setup_optimizer(weight_decay=0.0, **lrs)
    if args.load_optimizer and args.resume_from_step < 0:
        warm_start_optimizer(optimizer, base_meta, world_size, rank, device)
    scale_lrs(optimizer, args.init_lr_frac)

    out_dir, metrics_path = start_run("sft", model_tag, args.resume_from_step)
    packer_state, step, progress = new_packer_state(rank), 0, 0.0
    if args.resume_from_step >= 0:
        meta = resume_run(out_dir, args.resume_from_step, device, model, optimizer, rank)
        saved = tuple(meta.get(k) for k in ("max_seq_len", "device_batch_size", "total_batch_size"))
        if saved + (len(meta.get("packer_states", [])),) != (seq_len, device_batch, total_batch, world_size):
            raise NanochatError(f"step {args.resume_from_step} in {out_dir} was saved with seq len, device batch, "
                                f"total batch = {saved} on {len(meta.get('packer_states', []))} ranks, not "
                                f"{(seq_len, device_batch, total_batch)} on {world_size}: resume with the flags and "
                                "number of GPUs of the run that saved it")
        step, progress, packer_state = meta["step"], meta["loop_state"]["progress"], meta["packer_states"][rank]
    print0(f"SFT {model_tag}: {len(train_set):,} train conversations, seq {seq_len}, device batch {device_batch}, "
           f"total batch {total_batch:,} tokens (grad accum {grad_accum}), LRs {lrs} x {args.init_lr_frac}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    train_batches = sft_batches(train_set, tokenizer, device_batch, seq_len, device, packer_state, rank, world_size)
    token_bytes = get_token_bytes(device)
    eval_steps = max(1, args.eval_tokens // (device_batch * seq_len * world_size))

    # ---- the loop: evals and saves see the model after `step` optimizer steps ----
    last_step, val_bpb, scores = False, None, {}
    t_start, start_step, start_progress = time.time(), step, progress
    while True:
        if args.num_iterations > 0:
            last_step = step >= args.num_iterations
        if due(args.eval_every, step, last_step):
            model.eval()
            val_batches = sft_batches(val_set, tokenizer, device_batch, seq_len, device, new_packer_state(rank),
                                      rank, world_size)
            val_bpb = evaluate_bpb(model, val_batches, eval_steps, token_bytes)
            model.train()
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            log_metrics(metrics_path, step=step, val_bpb=val_bpb)
        if due(args.chatcore_every, step, last_step, after=0):
            scores = chat_scores(model, tokenizer, args, device_batch)
            print0(" | ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
            log_metrics(metrics_path, step=step, **scores)
        if last_step or due(args.save_every, step, last_step, after=start_step):
            meta = run_meta(step, model, args, model_tag, {"progress": progress}, val_bpb=val_bpb,
                            max_seq_len=seq_len, device_batch_size=device_batch, total_batch_size=total_batch,
                            parent_step=base_meta["step"], packer_states=gather_states(packer_state))
            save_checkpoint(out_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank)
            print0(f"saved {out_dir} step {step}")
        if last_step:
            break

        # ---- one optimizer step ----
        t0 = time.time()
        lrm = lr_multiplier(progress, args)
        set_schedule(optimizer, lrm, momentum=muon_momentum(step))
        train_loss, supervised = torch.zeros((), device=device), torch.zeros((), device=device)
        for _ in range(grad_accum):
            inputs, targets, packer_state = next(train_batches)
            loss = sft_loss(train_model, inputs, targets)
            (loss / grad_accum).backward()
            train_loss += loss.detach() / grad_accum
            supervised += (targets >= 0).sum()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        # progress: the requested steps, or the share of the mixture packed so far (one epoch)
        if args.num_iterations > 0:
            progress = step / args.num_iterations
        else:
            progress = max(progress, min(packer_state["consumed"] / len(train_set), 1.0))
            flag = torch.tensor(int(packer_state["consumed"] >= len(train_set)), device=device)
            if ddp:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            last_step = bool(flag.item())
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss = train_loss.item()
        if not math.isfinite(train_loss):
            raise NanochatError(f"train loss is {train_loss} at step {step}: lower the learning rates")
        dt = time.time() - t0
        eta = (time.time() - t_start) * (1 - progress) / max(progress - start_progress, 1e-9)
        print0(f"step {step - 1:05d} | loss {train_loss:.4f} | lrm {lrm:.3f} | {dt * 1000:.0f} ms | progress {progress:.1%}"
               f" | truncated {packer_state['truncated']} skipped {packer_state['skipped']} | eta {format_duration(eta)}")
        log_metrics(metrics_path, step=step - 1, loss=train_loss, lrm=lrm, dt=dt, progress=progress,
                    supervised_tokens=int(supervised.item()), truncated=packer_state["truncated"],
                    skipped=packer_state["skipped"], epoch=packer_state["epoch"])
    print0(f"done: {step} steps, {packer_state['truncated']} conversations truncated to the row, "
           f"{packer_state['skipped']} skipped (nothing to learn after truncation)")
    report_section("Chat SFT", {"steps": step, "train conversations": len(train_set), "max seq len": seq_len,
                                "total batch size": total_batch, "val bpb": val_bpb,
                                **({"ChatCORE": scores.pop("chatcore"), **scores} if scores else {}),
                                "truncated conversations": packer_state["truncated"],
                                "skipped conversations": packer_state["skipped"]}, column="SFT")
    compute_cleanup()


if __name__ == "__main__":
    main(parse_args())
