"""Evaluate a checkpoint.

Base model (after pretrain.py): bits per byte on train/val, the CORE benchmark, samples.
    python evaluate.py --stage base --eval bpb,core,sample
Chat model (after sft.py / rl.py): ARC, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE.
    python evaluate.py --stage sft
Any of these also runs under torchrun, e.g. torchrun --nproc_per_node=8 evaluate.py --stage base
"""

import os

from common import (CHAT_TASKS, SANDBOX_LAYERS, NanochatError, add_sampling_flags, argument_parser, atomic_write, bestfit_batches, chatcore,
                    compute_cleanup, compute_init, evaluate_bpb, evaluate_core, float_flag, get_base_dir,
                    get_token_bytes, int_flag, load_model, make_dir, parse_chat_tasks, print0, repair_shards,
                    report_section, run_chat_eval, sample_prompts, sandbox_layers, split_files, write_core_csv)


# =============================================================================================
# Base model evaluation: bits per byte, CORE (the scoring lives in common.py), samples
# =============================================================================================

def sample_base_model(model, tokenizer, num_unconditional=8):
    """The fixed prompts greedily, then unconditional samples at temperature 1 (128 tokens)."""
    sample_prompts(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    for seed in range(num_unconditional):
        print0("-" * 40 + "\n" + tokenizer.decode(list(model.generate([bos], 128, temperature=1.0, seed=seed))))


def core_table(core):
    """CORE per task for the report card, saying what the centered score is."""
    rows = [f"| {label} | {acc:.4f} | {core['centered_results'][label]:+.4f} |"
            for label, acc in core["results"].items()]
    return "\n".join(["CORE per task; centered = (accuracy - random baseline) / (1 - random baseline): "
                      "0 is chance, 1 is perfect, and CORE is the mean of the centered scores.", "",
                      "| task | accuracy | centered |", "|---|---|---|", *rows])


def run_base_eval(args):
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    step = meta["step"]
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = set(evals) - {"bpb", "core", "sample"}
    if unknown:
        raise NanochatError(f"--eval {args.eval}: unknown {', '.join(sorted(unknown))}; choose from bpb,core,sample")
    out_dir = make_dir(os.path.join(get_base_dir(), "base_eval"), writable=True)
    figures = {"step": step}
    if "bpb" in evals:
        B, T = args.device_batch_size, model.config.sequence_len
        steps = args.split_tokens // (B * T * world_size)
        if steps == 0:
            raise NanochatError(f"--split-tokens {args.split_tokens} is below one batch ({B}x{T}x{world_size} "
                                "tokens): raise it or lower --device-batch-size")
        token_bytes = get_token_bytes(device)
        repair_shards(split_files("train") + split_files("val"))
        for split in ("train", "val"):
            batches = bestfit_batches(tokenizer, B, T, split, device, rank=rank, world_size=world_size)
            figures[f"{split} bpb"] = evaluate_bpb(model, batches, steps, token_bytes)
            print0(f"{split} bpb: {figures[split + ' bpb']:.6f}")
            batches.close()
    if "core" in evals:
        core = evaluate_core(model, tokenizer, args.max_per_task, rank=rank, world_size=world_size)
        note = f" (partial: {len(core['results'])} of {len(core['results']) + len(core['missing'])} tasks, " \
               f"missing {', '.join(core['missing'])})" if core["partial"] else ""
        print0(f"CORE metric: {core['core_metric']:.4f}{note}")
        if rank == 0:
            csv_path = os.path.join(out_dir, f"base_model_{step:06d}.csv")
            write_core_csv(csv_path, core)
            print0(f"wrote {csv_path}")
        figures.update({"CORE": core["core_metric"], "CORE tasks": f"{len(core['results'])}{note}"})
    if "sample" in evals and rank == 0:
        sample_base_model(model, tokenizer)
    report_section("Base model evaluation", [figures] + ([core_table(core)] if "core" in evals else []), column="BASE")
    compute_cleanup()


# =============================================================================================
# Chat model evaluation: categorical and generative tasks, ChatCORE (the scoring lives in common.py)
# =============================================================================================

def chat_eval_main(args):
    """`evaluate.py --stage sft|rl`: per-task accuracy table, ChatCORE, CSV in <base>/chat_eval/."""
    names = parse_chat_tasks(args.tasks)
    _, rank, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.stage, device, phase="eval", model_tag=args.model_tag, step=args.step)
    if "HumanEval" in names:  # say plainly how isolated the model's code runs on this machine
        print0("code sandbox layers: " + ", ".join(f"{n} ({SANDBOX_LAYERS[n]})" for n in sandbox_layers()))
    accuracies = {}
    for name in names:
        accuracies[name] = run_chat_eval(name, model, tokenizer, args.batch_size, args.num_samples,
                                         args.max_new_tokens, args.temperature, args.top_k, args.max_problems)
    rows = [(name, f"{acc:.4f}") for name, acc in accuracies.items()]
    score = chatcore(accuracies)
    if score is not None:
        rows.append(("ChatCORE", f"{score:.4f}"))
    print0(f"\n{args.stage} model, step {meta.get('step')}:")
    for name, value in rows:
        print0(f"  {name:<14} {value}")
    if rank == 0:
        out_dir = make_dir(os.path.join(get_base_dir(), "chat_eval"), writable=True)
        path = os.path.join(out_dir, f"{args.stage}_model_{meta.get('step', 0):06d}.csv")
        with atomic_write(path, "w") as f:
            f.write("Task,Accuracy\n" + "".join(f"{name},{value}\n" for name, value in rows))
        print0(f"wrote {path}")
    report_section(f"Chat evaluation {args.stage}", {"step": meta.get("step"), **accuracies,
                                                     **({"ChatCORE": score} if score is not None else {})},
                   column=args.stage.upper())
    compute_cleanup()


# =============================================================================================
# Command line
# =============================================================================================

def parse_args(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--stage", choices=["base", "sft", "rl"], default="base", help="which checkpoint to evaluate")
    parser.add_argument("--model-tag", default=None, help="checkpoint tag (None = the most recent)")
    parser.add_argument("--step", type=int_flag(0), default=None, help="checkpoint step (None = the last)")
    parser.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    base = parser.add_argument_group("base model (--stage base)")
    base.add_argument("--eval", default="core,bpb,sample", help="comma-separated: bpb, core, sample")
    base.add_argument("--max-per-task", type=int_flag(1, never=True), default=-1, help="CORE examples per task (-1 = all)")
    base.add_argument("--device-batch-size", type=int_flag(1), default=32, help="sequences per forward for bpb")
    base.add_argument("--split-tokens", type=int_flag(1), default=40 * 524288, help="tokens per split for bpb")
    chat = parser.add_argument_group("chat model (--stage sft|rl)")
    chat.add_argument("--tasks", default="", help=f"comma-separated ('' = all): {','.join(CHAT_TASKS)}")
    chat.add_argument("--max-problems", type=int_flag(1), default=None, help="problems per task (None = all)")
    chat.add_argument("--num-samples", type=int_flag(1), default=1, help="samples per generative problem (pass@k)")
    add_sampling_flags(chat, temperature=0.0)
    chat.add_argument("--max-new-tokens", type=int_flag(1), default=512, help="longest answer")
    chat.add_argument("--batch-size", type=int_flag(1), default=8, help="problems per forward for categorical tasks")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_base_eval(args) if args.stage == "base" else chat_eval_main(args)


if __name__ == "__main__":
    main()
