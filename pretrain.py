"""Pretrain the base GPT on web text: one dial (--depth) sets width, horizon, batch size and learning rates.

CPU (a few minutes, a toy model):
    python pretrain.py --depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 16384 --num-iterations 200
        (add --eval-every 50 --eval-tokens 65536 --core-metric-every -1 --sample-every 100 for quick evaluations)
One GPU (gradient accumulation makes up the batch; `--device-batch-size auto` picks what fits):
    python pretrain.py --depth 20 --device-batch-size auto
8 GPUs:
    torchrun --nproc_per_node=8 pretrain.py --depth 20
Several nodes (run the same line on every node; HOST0 = the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=run1 pretrain.py --depth 26
Resume (exactly: the same losses as an uninterrupted run): add --resume-from-step N.
Checkpoints, and metrics.jsonl with one line per step, go to <base>/base_checkpoints/<model-tag>/.
"""
import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch allocates anything
import argparse
import gc
import math
import time

import torch
import torch.distributed as dist

from model import (COMPUTE_DTYPE, GPT, build_gpt, check_fp8_support, config_for_depth, enable_fp8, fp8_disabled,
                   keep_freed_memory)
from common import (NanochatError, add_stage_flags, argument_parser, bestfit_batches, float_flag, int_flag, compute_cleanup, compute_init, due,
                    evaluate_bpb, evaluate_core, format_duration, gather_states, get_peak_flops, get_token_bytes,
                    get_tokenizer, log_metrics, print0, repair_shards, report_section, resume_run, run_meta, sample_prompts, save_checkpoint,
                    set_schedule, split_files, start_run)

B_REF = 2 ** 19  # tokens per step of the reference model (d12) from which batch size, LR and WD transfer


def parse_args(argv=None):
    p = argument_parser(__doc__)
    add_stage_flags(p, lrs=(0.3, 0.008, 0.02))
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls in the large Linear layers (CUDA >= 8.9)")
    p.add_argument("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"],
                   help="fp8 scaling: one scale per tensor, or one per row")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (None = on for CUDA, off elsewhere, where it does not pay back)")
    g = p.add_argument_group("model shape")
    g.add_argument("--depth", type=int_flag(1), default=20, help="number of layers; width, heads, batch and LRs follow")
    g.add_argument("--aspect-ratio", type=int_flag(1), default=64, help="model width = depth x aspect ratio, rounded up")
    g.add_argument("--head-dim", type=int_flag(1), default=128, help="width of one attention head")
    g.add_argument("--max-seq-len", type=int_flag(1), default=2048, help="context length in tokens")
    g.add_argument("--window-pattern", default="SSSL", help="per layer: S = quarter-context window, L = full")
    g = p.add_argument_group("horizon (the first one set wins)")
    g.add_argument("--num-iterations", type=int_flag(1, never=True), default=-1, help="steps (-1 = unset)")
    g.add_argument("--target-flops", type=float_flag(0, never=True), default=-1.0,
                   help="steps from a compute budget in FLOPs (-1 = unset)")
    g.add_argument("--target-param-data-ratio", type=float_flag(0, never=True), default=12,
                   help="tokens = ratio x scaling params (-1 = unset)")
    g = p.add_argument_group("batch")
    g.add_argument("--device-batch-size", type=int_flag(1, auto=True), default=32,
                   help="sequences per GPU per micro-step, or auto (CUDA: the most that fit)")
    g.add_argument("--total-batch-size", type=int_flag(1, never=True), default=-1,
                   help="tokens per step (-1 = from the depth)")
    g.add_argument("--keep-rest", action="store_true",
                   help="pack what a crop cuts off a long document into later rows instead of dropping it "
                        "(every token used once; for small data budgets: the reference drops it)")
    g = p.add_argument_group("optimization")
    g.add_argument("--scalar-lr", type=float_flag(0), default=0.5, help="AdamW LR of the per-layer scalars")
    g.add_argument("--weight-decay", type=float_flag(0), default=0.28, help="Muon weight decay at d12 (transferred)")
    g.add_argument("--warmup-steps", type=int_flag(0), default=40, help="linear LR warmup steps")
    g.add_argument("--warmdown-ratio", type=float_flag(0, 1), default=0.65, help="share of steps of the LR decay")
    g.add_argument("--final-lr-frac", type=float_flag(0, 1), default=0.05, help="LR at the end, as a share")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int_flag(1, never=True), default=250, help="val bpb every N steps (-1 = never)")
    g.add_argument("--eval-tokens", type=int_flag(1), default=80 * 524288, help="val tokens per evaluation")
    g.add_argument("--core-metric-every", type=int_flag(1, never=True), default=2000,
                   help="CORE every N steps and at the end (-1 = never)")
    g.add_argument("--core-metric-max-per-task", type=int_flag(1, never=True), default=500,
                   help="CORE examples per task (-1 = all)")
    g.add_argument("--sample-every", type=int_flag(1, never=True), default=2000,
                   help="complete the sample prompts every N steps and at the end (-1 = never)")
    g.add_argument("--model-tag", default=None, help="checkpoint folder name (None = d<depth>)")
    return p.parse_args(argv)


# ---- the one-dial derivations: shape, horizon, batch size, LR and weight-decay transfer from d12 ----

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


def auto_total_batch(params, params_ref):
    """Power Lines: the best batch grows as data^0.383; at a fixed tokens:params ratio data ∝ params."""
    return 2 ** round(math.log2(B_REF * (params / params_ref) ** 0.383))


def plan_run(args, config, ref_config, flops_per_token, device_batch_size, world_size):
    """Steps, batch, LR scale, weight decay and gradient accumulation, all derived from the depth."""
    params, params_ref = scaling_params(config), scaling_params(ref_config)
    total_batch = args.total_batch_size if args.total_batch_size > 0 else auto_total_batch(params, params_ref)
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


# ---- schedules, `it` = 0 .. N-1 ----

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


def resolve_device_batch_size(args, config, ref_config, world_size, device):
    """--device-batch-size as a number, or (auto, CUDA) the largest power of two that fits."""
    if args.device_batch_size != "auto":
        return args.device_batch_size
    total = args.total_batch_size
    if total <= 0:
        total = auto_total_batch(scaling_params(config), scaling_params(ref_config))
    batch = find_device_batch_size(config, total // (config.sequence_len * world_size), device)
    print0(f"--device-batch-size auto: {batch} sequences fit on {torch.cuda.get_device_name()}")
    return batch


def print_banner(model, plan, device_batch_size, world_size, args, use_compile):
    config, counts = model.config, model.num_scaling_params()
    steps, batch, tokens = plan["num_iterations"], plan["total_batch"], plan["num_iterations"] * plan["total_batch"]
    flops = model.estimate_flops()
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads of "
           f"{config.n_embd // config.n_head}, seq {config.sequence_len}, vocab {config.vocab_size}, "
           f"windows {model.window_sizes}")
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) +
           f"; scaling {plan['scaling_params']:,}")
    print0(f"FLOPs/token {flops:.4e}; total batch {batch:,} tokens = {device_batch_size} seqs x "
           f"{config.sequence_len} x {world_size} ranks x {plan['grad_accum']} accumulation steps")
    print0(f"horizon: {steps:,} steps, {tokens:,} tokens (ratio {tokens / plan['scaling_params']:.2f} "
           f"tokens/param), {flops * tokens:.4e} FLOPs")
    print0(f"LR scale sqrt(B/B_ref) {plan['batch_lr_scale']:.4f}; Muon weight decay {plan['weight_decay']:.4f}; "
           f"schedule: warmup {args.warmup_steps}, warmdown {round(args.warmdown_ratio * steps)} steps to "
           f"x{args.final_lr_frac}; compile {use_compile}, dtype {COMPUTE_DTYPE}")


def print_step(step, steps, loss, lrm, dt, tok_per_sec, mfu, position, total_time, eta):
    epoch, pq_idx, rg_idx, _ = position
    print0(f"step {step:05d}/{steps:05d} ({100 * (step + 1) / steps:.2f}%) | loss {loss:.6f} | lrm {lrm:.2f} | "
           f"dt {dt * 1000:.2f}ms | tok/sec {tok_per_sec:,.0f}" + (f" | mfu {mfu:.2f}" if mfu > 0 else "") +
           f" | epoch {epoch} pq {pq_idx} rg {rg_idx} | total time {total_time / 60:.2f}m | "
           f"eta {format_duration(eta)}")


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        keep_freed_memory()  # a steady allocation pattern: reusing freed blocks saves page faults every step
    if args.device_batch_size == "auto" and not cuda:
        raise NanochatError("--device-batch-size auto probes GPU memory and needs CUDA: give a number instead")
    if args.fp8:
        try:
            check_fp8_support(device)
        except ValueError as e:
            raise NanochatError(str(e)) from None
    tokenizer = get_tokenizer()
    for split in ("train", "val"):  # fail now, not after building the model, if data is missing or corrupt
        repair_shards(split_files(split))
    token_bytes = get_token_bytes(device)
    config = model_config(args, args.depth, tokenizer.get_vocab_size())
    ref_config = model_config(args, 12, tokenizer.get_vocab_size())
    T = config.sequence_len
    device_batch_size = resolve_device_batch_size(args, config, ref_config, world_size, device)
    torch.manual_seed(42)  # the same weights whether or not the auto probe drew from the RNG
    model = build_gpt(config, device)
    flops_per_token = model.estimate_flops()
    plan = plan_run(args, config, ref_config, flops_per_token, device_batch_size, world_size)
    steps, grad_accum, total_batch, scale = (plan[k] for k in ("num_iterations", "grad_accum", "total_batch",
                                                                "batch_lr_scale"))
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale,
                                      matrix_lr=args.matrix_lr * scale, weight_decay=plan["weight_decay"],
                                      scalar_lr=args.scalar_lr * scale)
    orig_model = model  # uncompiled: checkpoints, sampling, CORE
    if args.fp8:  # before compiling; evaluation and sampling run without it (fp8_disabled), as in the reference
        print0(f"fp8 {args.fp8_recipe}: {enable_fp8(model, args.fp8_recipe)} layers")
    use_compile = cuda if args.compile is None else args.compile
    if use_compile:
        model = torch.compile(model, dynamic=False)
    print_banner(orig_model, plan, device_batch_size, world_size, args, use_compile)

    eval_steps = args.eval_tokens // (device_batch_size * T * world_size)
    if args.eval_every > 0 and eval_steps == 0:
        raise NanochatError(f"--eval-tokens {args.eval_tokens} is less than one batch ({device_batch_size} x {T} x "
                            f"{world_size} tokens): raise it, or turn val evaluation off with --eval-every -1")
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir, metrics_path = start_run("base", model_tag, args.resume_from_step)
    step, val_bpb, loader_state = 0, None, None
    loop = dict(min_val_bpb=float("inf"), smooth_train_loss=0.0, total_training_time=0.0)
    if args.resume_from_step >= 0:
        meta = resume_run(ckpt_dir, args.resume_from_step, device, orig_model, optimizer, rank)
        states = meta.get("loader_states")
        if states is not None and len(states) != world_size:
            raise NanochatError(f"the checkpoint has data positions for {len(states)} ranks, this run has "
                                f"{world_size}: resume with the number of processes that saved it")
        loader_state = states[rank] if states else None
        if states is None:
            print0("warning: the checkpoint has no data loader state; the data order restarts from the beginning")
        step, val_bpb, loop = args.resume_from_step, meta.get("val_bpb"), meta["loop_state"]

    loader = bestfit_batches(tokenizer, device_batch_size, T, "train", device, rank=rank, world_size=world_size,
                             state=loader_state, keep_rest=args.keep_rest)
    batch = next(loader)  # (inputs, targets, state that rebuilds this batch)
    peak_flops = get_peak_flops(torch.cuda.get_device_name(device)) if cuda else float("inf")
    resume_step, timed_dts = step, []
    while True:
        last_step = step == steps
        record = {"step": step}
        with fp8_disabled(orig_model):  # evaluation and sampling in full precision (a no-op without --fp8)
            if due(args.eval_every, step, last_step):
                val_loader = bestfit_batches(tokenizer, device_batch_size, T, "val", device, rank=rank,
                                             world_size=world_size)
                val_bpb = record["val_bpb"] = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
                val_loader.close()
                loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
                print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
            if due(args.core_metric_every, step, last_step, after=0):
                core = evaluate_core(orig_model, tokenizer, args.core_metric_max_per_task, rank=rank,
                                     world_size=world_size)
                record["core_metric"] = core["core_metric"]
                print0(f"step {step:05d} | CORE {core['core_metric']:.4f}" + (" (partial)" if core["partial"] else ""))
            if rank == 0 and due(args.sample_every, step, last_step, after=0):
                sample_prompts(orig_model, tokenizer)
        if last_step or due(args.save_every, step, last_step, after=resume_step):
            states = gather_states(batch[2])
            meta = run_meta(step, orig_model, args, model_tag, loop, val_bpb=val_bpb,
                            device_batch_size=device_batch_size, max_seq_len=T, total_batch_size=total_batch,
                            dataloader_state_dict=dict(zip(("epoch", "pq_idx", "rg_idx"), states[0]["next"][:3])),
                            loader_states=states)
            save_checkpoint(ckpt_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta, rank=rank)
        if last_step:
            if len(record) > 1:
                log_metrics(metrics_path, **record)
            break

        # ---- one optimization step: grad_accum consecutive batches of this rank's loader ----
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            loss = model(batch[0], batch[1])
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
            batch = next(loader)  # the thread has it ready: this only copies to the device
        lrm = lr_multiplier(step, steps, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(optimizer, lrm, momentum=muon_momentum(step, steps, args.warmdown_ratio),
                     weight_decay=muon_weight_decay(step, steps, plan["weight_decay"]))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (grad_accum * world_size)  # .item() waits for the step to finish
        dt = time.time() - t0

        if step == resume_step:  # the first step allocates and warms up; then stop the collector's pauses
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()
        loop["smooth_train_loss"] = 0.9 * loop["smooth_train_loss"] + 0.1 * train_loss
        debiased = loop["smooth_train_loss"] / (1 - 0.9 ** (step + 1))
        if step > 10:
            loop["total_training_time"] += dt
        timed_dts.append(dt)
        recent = timed_dts[1:][-50:] or timed_dts  # skip the warm-up step
        eta = sum(recent) / len(recent) * (steps - step - 1)
        tok_per_sec = total_batch / dt
        mfu = 100 * flops_per_token * total_batch / dt / (peak_flops * world_size)
        print_step(step, steps, debiased, lrm, dt, tok_per_sec, mfu, batch[2]["next"], loop["total_training_time"], eta)
        record.update(loss=train_loss, smooth_loss=debiased, lrm=lrm, dt=dt, tok_per_sec=tok_per_sec,
                      mfu=mfu if mfu > 0 else None, epoch=batch[2]["next"][0])
        log_metrics(metrics_path, **record)
        step += 1

    loader.close()
    # the loader's read position (ahead of the rows by its buffer) still in the first pass over the data:
    # no document was repeated; with --keep-rest no token either
    epochs = batch[2]["next"][0]
    tokens = steps * total_batch
    distinct = tokens if epochs == 1 and args.keep_rest else None
    print0(f"data: {tokens:,} tokens in {epochs} pass(es) over the training shards" +
           (", every one distinct (none repeated)" if distinct else
            ("; the loader read into a second pass, documents may repeat: fetch more shards" if epochs > 1
             else "; crops of long documents dropped")))
    peak_memory = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    print0(f"total training time {format_duration(loop['total_training_time'])}; min val bpb "
           f"{loop['min_val_bpb']:.6f}" + (f"; peak memory {peak_memory:,.0f} MiB" if cuda else ""))
    trained = steps > resume_step
    report_section("Base model training", {
        "depth": config.n_layer, "parameters": orig_model.num_scaling_params()["total"],
        "scaling parameters": plan["scaling_params"], "FLOPs per token": flops_per_token,
        "total batch size": total_batch, "steps": steps, "tokens": steps * total_batch,
        "passes over the data": epochs, "distinct tokens": distinct,
        "tokens per scaling parameter": steps * total_batch / plan["scaling_params"], "world size": world_size,
        "device batch size": device_batch_size, "gradient accumulation": grad_accum,
        "val bpb": loop["min_val_bpb"], "training time (s, steps after 10)": loop["total_training_time"],
        "tokens/s (last step)": tok_per_sec if trained else None,
        "MFU % (last step)": mfu if trained and mfu > 0 else None, "peak memory MiB": peak_memory,
    }, column="BASE")
    compute_cleanup()


if __name__ == "__main__":
    main()
