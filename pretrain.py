"""Pretrain the base GPT on web text: one dial (--depth) sets width, horizon, batch size and learning rates.

CPU (a few minutes, a toy model):
    python pretrain.py --depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 16384 \
        --num-iterations 200 --eval-every 50 --eval-tokens 65536 --core-metric-every -1 --sample-every 100
One GPU (gradient accumulation makes up the batch; `--device-batch-size auto` picks what fits):
    python pretrain.py --depth 20 --device-batch-size auto
8 GPUs:
    torchrun --nproc_per_node=8 pretrain.py --depth 20
Several nodes (run the same line on every node; HOST0 = the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=run1 \
        pretrain.py --depth 26
Resume (exactly: the same losses as an uninterrupted run): add --resume-from-step N.
Checkpoints, and metrics.jsonl with one line per step, go to <base>/base_checkpoints/<model-tag>/.
"""
import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch allocates anything
import argparse
import dataclasses
import gc
import json
import math
import time

import torch
import torch.distributed as dist

from model import COMPUTE_DTYPE, GPT, build_gpt, config_for_depth
from common import (SAMPLE_PROMPTS, NanochatError, atomic_write, bestfit_batches, checkpoint_dir, compute_cleanup,
                    compute_init, evaluate_bpb, evaluate_core, get_peak_flops, get_token_bytes, get_tokenizer, load_checkpoint,
                    log_metrics, print0, report_section, save_checkpoint, split_files)

B_REF = 2 ** 19  # tokens per step of the reference model (d12) from which batch size, LR and WD transfer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="run name (wandb is not used: metrics go to metrics.jsonl)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls (not implemented here: ignored with a warning)")
    p.add_argument("--fp8-recipe", default="tensorwise", choices=["rowwise", "tensorwise"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere, where it does not pay back)")
    # model shape
    p.add_argument("--depth", type=int, default=20, help="number of layers; width and heads follow")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio (rounded up)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL", help="per layer: S = quarter-context window, L = full")
    # horizon (first one set wins)
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps")
    p.add_argument("--target-flops", type=float, default=-1.0, help="steps from a compute budget")
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens = ratio x scaling params")
    # batch
    p.add_argument("--device-batch-size", default="32", help="sequences per GPU per micro-step, or auto (CUDA)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (-1 = auto from depth)")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--weight-decay", type=float, default=0.28)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--resume-from-step", type=int, default=-1)
    # evaluation and output
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = never)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288)
    p.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps and at the end (-1 = never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=-1, help="-1 = only at the end")
    p.add_argument("--model-tag", default=None, help="checkpoint subdirectory (default d<depth>)")
    return p.parse_args(argv)


# ---- the one-dial derivations (§3.1, §6.2, §6.3) ----

def model_config(args, depth, vocab_size):
    try:
        return config_for_depth(depth, args.aspect_ratio, args.head_dim, sequence_len=args.max_seq_len,
                                vocab_size=vocab_size, window_pattern=args.window_pattern)
    except ValueError as e:
        raise NanochatError(f"bad model shape: {e}") from e


def scaling_params(config):
    """transformer matrices + lm_head: the count the horizon and the transfer rules are written in."""
    with torch.device("meta"):
        counts = GPT(config).num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def auto_total_batch(config, ref_config):
    """Power Lines: the best batch grows as data^0.383; at a fixed tokens:params ratio data ∝ params."""
    return 2 ** round(math.log2(B_REF * (scaling_params(config) / scaling_params(ref_config)) ** 0.383))


def plan_run(args, config, ref_config, flops_per_token, device_batch_size, world_size):
    """Steps, batch, LR scale, weight decay and gradient accumulation, all derived from the depth."""
    params, params_ref = scaling_params(config), scaling_params(ref_config)
    total_batch = args.total_batch_size if args.total_batch_size > 0 else auto_total_batch(config, ref_config)
    if args.num_iterations > 0:
        steps = args.num_iterations
    elif args.target_flops > 0:
        steps = round(args.target_flops / (flops_per_token * total_batch))
    elif args.target_param_data_ratio > 0:
        steps = int(args.target_param_data_ratio * params) // total_batch
    else:
        raise NanochatError("no horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
    if steps < 1:
        raise NanochatError(f"the horizon is {steps} steps of {total_batch:,} tokens: raise --num-iterations, "
                            "--target-flops or --target-param-data-ratio, or lower --total-batch-size")
    tokens_per_micro = device_batch_size * config.sequence_len * world_size
    if total_batch % tokens_per_micro:
        raise NanochatError(f"--total-batch-size {total_batch} is not a multiple of device batch x seq len x world "
                            f"= {device_batch_size} x {config.sequence_len} x {world_size} = {tokens_per_micro}: "
                            "change --total-batch-size or --device-batch-size")
    batch_lr_scale = (total_batch / B_REF) ** 0.5
    return dict(scaling_params=params, total_batch=total_batch, num_iterations=steps,
                grad_accum=total_batch // tokens_per_micro, batch_lr_scale=batch_lr_scale,
                # T_epoch rule: decay per token seen stays constant across batch size and horizon
                weight_decay=args.weight_decay * batch_lr_scale * (params_ref / params))


# ---- schedules (§6.4), `it` = 0 .. N-1 ----

def lr_multiplier(it, N, warmup_steps, warmdown_ratio, final_lr_frac):
    warmdown = round(warmdown_ratio * N)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= N - warmdown:
        return 1.0
    progress = (N - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it, N, warmdown_ratio):
    warmdown = round(warmdown_ratio * N)
    if it < 400:  # checked first, as in the reference (matters for runs shorter than 400 steps)
        return 0.85 + 0.12 * it / 400
    if it >= N - warmdown:
        return 0.97 - 0.07 * (it - (N - warmdown)) / warmdown
    return 0.97


def muon_weight_decay(it, N, weight_decay):
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / N))


def duration(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.0f}s"


def find_device_batch_size(config, max_batch, device):
    """Largest power of two whose forward+backward, with optimizer-sized state allocated, fits in GPU memory."""
    batch = 2 ** int(math.log2(max(max_batch, 1)))
    while batch >= 1:
        try:
            model = build_gpt(config, device)
            reserve = torch.empty(2 * sum(p.numel() for p in model.parameters()), device=device)  # ~Adam moments
            x = torch.randint(0, config.vocab_size, (batch, config.sequence_len), device=device)
            model(x, x).backward()
            torch.cuda.synchronize()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        model = reserve = x = None  # free everything before the next try
        gc.collect()
        torch.cuda.empty_cache()
        fits = torch.tensor(int(fits), device=device)
        if dist.is_initialized():
            dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank must agree
        if fits.item():
            return batch
        batch //= 2
    raise NanochatError("even --device-batch-size 1 runs out of GPU memory: lower --depth or --max-seq-len")


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    cuda = device.type == "cuda"
    if args.depth < 1:
        raise NanochatError(f"--depth {args.depth}: the model needs at least one layer, use --depth 1 or more")
    if args.fp8:
        print0("warning: --fp8 is not implemented in this version; training in", COMPUTE_DTYPE)
    if args.device_batch_size == "auto" and not cuda:
        raise NanochatError("--device-batch-size auto probes GPU memory and needs CUDA: give a number instead")
    if args.device_batch_size != "auto" and (not args.device_batch_size.isdigit() or int(args.device_batch_size) < 1):
        raise NanochatError(f"--device-batch-size {args.device_batch_size}: use a positive integer or auto")
    tokenizer = get_tokenizer()
    for split in ("train", "val"):  # fail now, not after building the model, if data is missing
        split_files(split)
    token_bytes = get_token_bytes(device)
    config = model_config(args, args.depth, tokenizer.get_vocab_size())
    ref_config = model_config(args, 12, tokenizer.get_vocab_size())
    T = config.sequence_len

    model = build_gpt(config, device)
    flops_per_token = model.estimate_flops()
    if args.device_batch_size == "auto":
        total = args.total_batch_size if args.total_batch_size > 0 else auto_total_batch(config, ref_config)
        model = None  # free it while probing
        device_batch_size = find_device_batch_size(config, total // (T * world_size), device)
        print0(f"--device-batch-size auto: {device_batch_size} sequences fit on {torch.cuda.get_device_name()}")
        torch.manual_seed(42)  # the probes drew from the RNG: initialize exactly as with a given batch size
        model = build_gpt(config, device)
    else:
        device_batch_size = int(args.device_batch_size)
    plan = plan_run(args, config, ref_config, flops_per_token, device_batch_size, world_size)
    N, A, total_batch, s = plan["num_iterations"], plan["grad_accum"], plan["total_batch"], plan["batch_lr_scale"]
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * s, embedding_lr=args.embedding_lr * s,
                                      matrix_lr=args.matrix_lr * s, weight_decay=plan["weight_decay"],
                                      scalar_lr=args.scalar_lr * s)
    orig_model = model  # uncompiled: checkpoints, sampling, CORE
    use_compile = cuda if args.compile is None else args.compile
    if use_compile:
        model = torch.compile(model, dynamic=False)

    counts = orig_model.num_scaling_params()
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads of "
           f"{config.n_embd // config.n_head}, seq {T}, vocab {config.vocab_size}, windows {orig_model.window_sizes}")
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) +
           f"; scaling {plan['scaling_params']:,}")
    print0(f"FLOPs/token {flops_per_token:.4e}; total batch {total_batch:,} tokens = {device_batch_size} seqs x {T} x "
           f"{world_size} ranks x {A} accumulation steps")
    print0(f"horizon: {N:,} steps, {N * total_batch:,} tokens (ratio {N * total_batch / plan['scaling_params']:.2f} "
           f"tokens/param), {flops_per_token * N * total_batch:.4e} FLOPs")
    print0(f"LR scale sqrt(B/B_ref) {s:.4f}; Muon weight decay {plan['weight_decay']:.4f}; schedule: warmup "
           f"{args.warmup_steps}, warmdown {round(args.warmdown_ratio * N)} steps to x{args.final_lr_frac}; "
           f"compile {use_compile}, dtype {COMPUTE_DTYPE}")

    eval_steps = args.eval_tokens // (device_batch_size * T * world_size)
    if args.eval_every > 0 and eval_steps == 0:
        raise NanochatError(f"--eval-tokens {args.eval_tokens} is less than one batch ({device_batch_size} x {T} x "
                            f"{world_size} tokens): raise it, or turn val evaluation off with --eval-every -1")
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_dir("base", model_tag)
    metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
    # A data streams per rank, one per micro-step: the batch of a step does not depend on how it is split
    num_streams = world_size * A
    streams = range(rank * A, (rank + 1) * A)
    loader_states = [None] * num_streams
    step, val_bpb, min_val_bpb, smooth_loss, total_time = 0, None, float("inf"), 0.0, 0.0
    if args.resume_from_step >= 0:
        step = args.resume_from_step
        model_state, optim_state, meta = load_checkpoint(ckpt_dir, step, device, load_optimizer=True, rank=rank)
        orig_model.load_state_dict(model_state)
        if optim_state is None:
            raise NanochatError(f"no optimizer state for rank {rank} at step {step} in {ckpt_dir}: resume with "
                                "the same number of processes as the run that saved it")
        optimizer.load_state_dict(optim_state)
        loader_states = meta.get("loader_states") or [None] * num_streams
        if not meta.get("loader_states"):
            print0("warning: the checkpoint has no data loader state; the data order restarts from the beginning")
        if len(loader_states) != num_streams:
            raise NanochatError(f"the checkpoint has {len(loader_states)} data streams, this run {num_streams} "
                                "(world size x accumulation steps): keep --device-batch-size and the total batch")
        val_bpb = meta["val_bpb"]
        min_val_bpb, smooth_loss, total_time = (meta["loop_state"][k] for k in
                                                ("min_val_bpb", "smooth_train_loss", "total_training_time"))
        del model_state, optim_state
        print0(f"resumed from step {step} of {ckpt_dir}")
    if master:  # rows from beyond the resume point (or a line cut by a kill) would mislead: drop them
        os.makedirs(ckpt_dir, exist_ok=True)
        kept = []
        if step > 0 and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] < step]
        with atomic_write(metrics_path, "w") as f:
            f.writelines(kept)

    tok_threads = max(1, 4 // A)
    loaders = [bestfit_batches(tokenizer, device_batch_size, T, "train", device, stream=i, num_streams=num_streams,
                               state=loader_states[i], tokenizer_threads=tok_threads) for i in streams]
    batches = [next(loader) for loader in loaders]  # (inputs, targets, state that rebuilds this batch)
    peak_flops = get_peak_flops(torch.cuda.get_device_name(device)) if cuda else float("inf")
    resume_step, timed_dts = step, []
    while True:
        last_step = step == N
        record = {"step": step}
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            val_loader = bestfit_batches(tokenizer, device_batch_size, T, "val", device, stream=rank,
                                         num_streams=world_size)
            val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            val_loader.close()
            min_val_bpb = min(min_val_bpb, val_bpb)
            record["val_bpb"] = val_bpb
            print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            core = evaluate_core(orig_model, tokenizer, args.core_metric_max_per_task, rank=rank,
                                          world_size=world_size)
            record["core_metric"] = core["core_metric"]
            print0(f"step {step:05d} | CORE {core['core_metric']:.4f}" + (" (partial)" if core["partial"] else ""))
        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            for prompt in SAMPLE_PROMPTS:
                prompt_ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                print0(repr(prompt + tokenizer.decode(list(orig_model.generate(prompt_ids, 16, temperature=0)))))
        if last_step or (step > resume_step and args.save_every > 0 and step % args.save_every == 0):
            states = [b[2] for b in batches]
            if ddp:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, states)
                states = [s for rank_states in gathered for s in rank_states]
            meta = dict(step=step, val_bpb=val_bpb, model_config=dataclasses.asdict(config), user_config=vars(args),
                        device_batch_size=device_batch_size, max_seq_len=T, total_batch_size=total_batch,
                        dataloader_state_dict=dict(zip(("epoch", "pq_idx", "rg_idx"), states[0]["next"][:3])),
                        loader_states=states,
                        loop_state=dict(min_val_bpb=min_val_bpb, smooth_train_loss=smooth_loss,
                                        total_training_time=total_time))
            save_checkpoint(ckpt_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta, rank=rank)
        if last_step:
            if len(record) > 1:
                log_metrics(metrics_path, **record)
            break

        # ---- one optimization step ----
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for micro in range(A):
            x, y, _ = batches[micro]
            loss = model(x, y)
            loss_sum += loss.detach()
            (loss / A).backward()
            batches[micro] = next(loaders[micro])  # the thread has it ready: this only copies to the device
        lrm = lr_multiplier(step, N, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, N, args.warmdown_ratio)
                group["weight_decay"] = muon_weight_decay(step, N, plan["weight_decay"])
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (A * world_size)  # .item() waits for the step to finish
        dt = time.time() - t0

        if step == resume_step:  # the first step allocates and warms up; then stop the collector's pauses
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()
        beta = 0.9
        smooth_loss = beta * smooth_loss + (1 - beta) * train_loss
        debiased = smooth_loss / (1 - beta ** (step + 1))
        if step > 10:
            total_time += dt
        timed_dts.append(dt)
        recent = timed_dts[1:][-50:] or timed_dts  # skip the warm-up step
        eta = sum(recent) / len(recent) * (N - step - 1)
        tok_per_sec = total_batch / dt
        mfu = 100 * flops_per_token * total_batch / dt / (peak_flops * world_size)
        epoch, pq_idx, rg_idx, _ = batches[0][2]["next"]
        print0(f"step {step:05d}/{N:05d} ({100 * (step + 1) / N:.2f}%) | loss {debiased:.6f} | lrm {lrm:.2f} | "
               f"dt {dt * 1000:.2f}ms | tok/sec {tok_per_sec:,.0f}" + (f" | mfu {mfu:.2f}" if mfu > 0 else "") +
               f" | epoch {epoch} pq {pq_idx} rg {rg_idx} | total time {total_time / 60:.2f}m | eta {duration(eta)}")
        record.update(loss=train_loss, smooth_loss=debiased, lrm=lrm, dt=dt, tok_per_sec=tok_per_sec,
                      mfu=mfu if mfu > 0 else None, epoch=epoch)
        log_metrics(metrics_path, **record)
        step += 1

    for loader in loaders:
        loader.close()
    peak_memory = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    print0(f"total training time {duration(total_time)}; min val bpb {min_val_bpb:.6f}" +
           (f"; peak memory {peak_memory:,.0f} MiB" if cuda else ""))
    report_section("Base model training", {
        "depth": config.n_layer, "parameters": counts["total"], "scaling parameters": plan["scaling_params"],
        "FLOPs per token": flops_per_token, "total batch size": total_batch, "steps": N,
        "tokens": N * total_batch, "tokens per scaling parameter": N * total_batch / plan["scaling_params"],
        "world size": world_size, "device batch size": device_batch_size, "gradient accumulation": A,
        "val bpb": min_val_bpb, "training time (s, steps after 10)": total_time,
        "tokens/s (last step)": tok_per_sec if N > resume_step else None,
        "MFU % (last step)": mfu if N > resume_step and mfu > 0 else None, "peak memory MiB": peak_memory,
    }, column="BASE")
    compute_cleanup()


if __name__ == "__main__":
    main()
