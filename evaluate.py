"""Evaluate a checkpoint.

Base model (after pretrain.py): bits per byte on train/val, the CORE benchmark, samples.
    python evaluate.py --stage base --eval bpb,core,sample
Chat model (after sft.py / rl.py): ARC, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE.
    python evaluate.py --stage sft
Any of these also runs under torchrun, e.g. torchrun --nproc_per_node=8 evaluate.py --stage base
"""

# =============================================================================================
# Base model evaluation: bits per byte, CORE, samples (owner: PRETRAIN)
# =============================================================================================

import argparse
import csv
import glob
import json
import os
import random
import shutil
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (SAMPLE_PROMPTS, NanochatError, atomic_write, bestfit_batches, compute_cleanup, compute_init,
                    download_file, evaluate_bpb, get_base_dir, get_token_bytes, load_model, print0, report_section,
                    source_for)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def parse_core_yaml(text):
    """The few YAML forms core.yaml uses: a top-level key, "-" list items, `key: value` with a scalar,
    a double-quoted string or a [list]. (PyYAML is not a dependency for one small file.)"""
    def scalar(v):
        v = v.strip()
        if v.startswith('"'):
            return json.loads(v)  # YAML double-quoted escapes (\n) read like JSON's
        if v.startswith("["):
            return [scalar(x) for x in v[1:-1].split(",") if x.strip()]
        if v in ("true", "false"):
            return v == "true"
        return int(v) if v.lstrip("-").isdigit() else v.strip("'")
    tasks = []
    for line in text.splitlines():
        line = line.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#") or not line.startswith((" ", "-")):
            continue  # blank, comment, or a top-level header such as "icl_tasks:"
        if line.startswith("-"):  # a new task, maybe with its first key on the same line
            tasks.append({})
            line = line[1:]
            if not line.strip():
                continue
        key, _, value = line.strip().partition(":")
        tasks[-1][key.strip()] = scalar(value)
    return tasks


def ensure_eval_bundle():
    """<base>/eval_bundle, fetched on first use: the zip from the reference's URL, or with NANOCHAT_MIRROR
    the unpacked files (core.yaml, eval_meta_data.csv, each task file the mirror has)."""
    bundle = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.exists(os.path.join(bundle, "core.yaml")):
        return bundle
    tmp = tempfile.mkdtemp(dir=get_base_dir(), prefix="eval_bundle.tmp")
    try:
        if os.environ.get("NANOCHAT_MIRROR"):
            for name in ("core.yaml", "eval_meta_data.csv"):
                download_file(source_for(EVAL_BUNDLE_URL, f"eval_bundle/{name}"), os.path.join(tmp, name))
            with open(os.path.join(tmp, "core.yaml")) as f:
                uris = [task["dataset_uri"] for task in parse_core_yaml(f.read())]
            for uri in dict.fromkeys(uris):
                try:
                    download_file(source_for(EVAL_BUNDLE_URL, f"eval_bundle/eval_data/{uri}"),
                                  os.path.join(tmp, "eval_data", uri))
                except NanochatError as e:  # a mirror may hold only some tasks: CORE is then marked partial
                    print0(f"eval bundle: {uri} not on the mirror ({e})")
            for lock in glob.glob(os.path.join(tmp, "**", "*.lock"), recursive=True):
                os.remove(lock)  # download_file's lock files: not part of the bundle
            unpacked = tmp
        else:
            zip_path = download_file(EVAL_BUNDLE_URL, os.path.join(tmp, "eval_bundle.zip"), desc="eval_bundle.zip")
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmp)
            unpacked = os.path.join(tmp, "eval_bundle")
        os.replace(unpacked, bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle


# ---- CORE (§8.2): prompts as plain strings, few-shot blocks separated by a blank line ----

def render_mc(item, delim, shots):
    """One prompt per choice; the choice is the scored continuation."""
    head = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_schema(item, delim, shots):
    """One prompt per context option; the shared continuation is scored."""
    head = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
    return [f"{head}{context}{delim}{item['continuation']}" for context in item["context_options"]]


def render_lm(item, delim, shots):
    """[prompt without the continuation (stripped), prompt with it]."""
    head = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{delim}"
    return [prompt.strip(), prompt + item["continuation"]]


def continuation_spans(task_type, token_lists):
    """(start, end) of the scored tokens in each prompt: after the common prefix (MC), the common
    suffix (schema), or after the prompt without continuation (LM, which is one scored sequence)."""
    if task_type == "language_modeling":
        without, with_ = token_lists
        if with_[:len(without)] != without:
            raise ValueError("LM prompt without the continuation does not tokenize as a prefix of the full one")
        return [(len(without), len(with_))]
    if task_type == "multiple_choice":
        n = 0
        while all(len(t) > n for t in token_lists) and len({t[n] for t in token_lists}) == 1:
            n += 1
        return [(n, len(t)) for t in token_lists]
    n = 0
    while all(len(t) > n for t in token_lists) and len({t[-1 - n] for t in token_lists}) == 1:
        n += 1
    return [(len(t) - n, len(t)) for t in token_lists]


@torch.no_grad()
def score_example(model, token_lists, spans, task_type, gold, pad_id):
    """One forward over all prompts (right-padded). MC/schema: is the gold option the one with the lowest
    mean loss over its span? LM: does greedy prediction reproduce the continuation exactly?"""
    width = max(len(t) for t in token_lists)
    rows = [t + [pad_id] * (width - len(t)) for t in token_lists]
    ids = torch.tensor(rows, dtype=torch.long, device=model.get_device())
    logits = model(ids)
    if task_type == "language_modeling":
        start, end = spans[0]
        return bool((logits[0, start - 1:end - 1].argmax(-1) == ids[0, start:end]).all())
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # loss of token t+1
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(spans)]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == gold


def evaluate_core_task(model, tokenizer, data, task, rank=0, world_size=1):
    """Accuracy on one task; examples strided over ranks, counts summed. Prompts longer than the model's
    rotary table are cut from the left (the reference never needs to: its table is 10x the context)."""
    task_type, delim, num_shots = task["icl_task_type"], task.get("continuation_delimiter", " "), task["num_fewshot"][0]
    render = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}[task_type]
    bos = tokenizer.get_bos_token_id()
    max_len = model.rotary_len
    correct = torch.zeros(len(data), dtype=torch.float32, device=model.get_device())
    for idx in range(rank, len(data), world_size):
        others = [i for i in range(len(data)) if i != idx]
        shots = [data[i] for i in random.Random(1234 + idx).sample(others, min(num_shots, len(others)))]
        token_lists = tokenizer.encode(render(data[idx], delim, shots), prepend=bos)
        spans = continuation_spans(task_type, token_lists)
        if task_type == "language_modeling":
            token_lists = token_lists[1:]  # only the full prompt is scored
        cut = [max(0, len(t) - max_len) for t in token_lists]
        token_lists = [t[c:] for t, c in zip(token_lists, cut)]
        spans = [(s - c, e - c) for (s, e), c in zip(spans, cut)]
        correct[idx] = float(score_example(model, token_lists, spans, task_type, data[idx].get("gold"), bos))
    if world_size > 1:
        dist.all_reduce(correct)
    return correct.mean().item()


def evaluate_core(model, tokenizer, max_per_task=-1, bundle=None, rank=0, world_size=1):
    """CORE: mean over tasks of accuracy centered on the random baseline. Tasks whose data file is missing
    are skipped and named; the result is then marked partial. Returns a dict (results, centered, core...)."""
    if bundle is None:
        if rank == 0:  # one download; the other ranks wait for it
            ensure_eval_bundle()
        if world_size > 1:
            dist.barrier()
        bundle = ensure_eval_bundle()
    with open(os.path.join(bundle, "core.yaml")) as f:
        tasks = parse_core_yaml(f.read())
    with open(os.path.join(bundle, "eval_meta_data.csv")) as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    results, centered, missing = {}, {}, []
    for task in tasks:
        label, path = task["label"], os.path.join(bundle, "eval_data", task["dataset_uri"])
        if not os.path.exists(path):
            print0(f"CORE: skipping {label}, data file missing: {path}")
            missing.append(label)
            continue
        with open(path) as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(data)
        data = data[:max_per_task] if max_per_task > 0 else data
        t0 = time.time()
        results[label] = evaluate_core_task(model, tokenizer, data, task, rank, world_size)
        baseline = 0.01 * baselines[label]
        centered[label] = (results[label] - baseline) / (1.0 - baseline)
        print0(f"{label:<35} accuracy {results[label]:.4f}  centered {centered[label]:+.4f}  "
               f"({len(data)} examples, {time.time() - t0:.1f}s)")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core,
            "missing": missing, "partial": bool(missing)}


def write_core_csv(path, core):
    with atomic_write(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["Task", "Accuracy", "Centered"])
        for label, acc in core["results"].items():
            writer.writerow([label, f"{acc:.6f}", f"{core['centered_results'][label]:.6f}"])
        writer.writerow(["CORE", "", f"{core['core_metric']:.6f}"])
        if core["partial"]:
            writer.writerow(["partial: missing " + " ".join(core["missing"]), "", ""])


def sample_base_model(model, tokenizer, num_unconditional=8):
    """The fixed prompts greedily (16 tokens), then unconditional samples at temperature 1 (128 tokens)."""
    bos = tokenizer.get_bos_token_id()
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=bos)
        print0(repr(prompt + tokenizer.decode(list(model.generate(ids, 16, temperature=0)))))
    for seed in range(num_unconditional):
        print0("-" * 40 + "\n" + tokenizer.decode(list(model.generate([bos], 128, temperature=1.0, seed=seed))))


def run_base_eval(args):
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    step = meta["step"]
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = set(evals) - {"bpb", "core", "sample"}
    if unknown:
        raise NanochatError(f"--eval {args.eval}: unknown {', '.join(sorted(unknown))}; choose from bpb,core,sample")
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    figures = {"step": step}
    if "bpb" in evals:
        B, T = args.device_batch_size, model.config.sequence_len
        steps = args.split_tokens // (B * T * world_size)
        if steps == 0:
            raise NanochatError(f"--split-tokens {args.split_tokens} is below one batch ({B}x{T}x{world_size} "
                                "tokens): raise it or lower --device-batch-size")
        token_bytes = get_token_bytes(device)
        for split in ("train", "val"):
            batches = bestfit_batches(tokenizer, B, T, split, device, stream=rank, num_streams=world_size)
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
        figures.update({"CORE": core["core_metric"], "CORE tasks": f"{len(core['results'])}{note}"},
                       **core["centered_results"])
    if "sample" in evals and rank == 0:
        sample_base_model(model, tokenizer)
    report_section("Base model evaluation", figures, column="BASE")
    compute_cleanup()


# =============================================================================================
# Chat model evaluation: categorical and generative tasks, ChatCORE (owner: SFTRL)
# =============================================================================================

from common import CHAT_TASKS, chatcore, parse_chat_tasks, run_chat_eval

def chat_eval_main(args):
    """`evaluate.py --stage sft|rl`: per-task accuracy table, ChatCORE, CSV in <base>/chat_eval/."""
    names = parse_chat_tasks(args.tasks)
    _, rank, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.stage, device, phase="eval", model_tag=args.model_tag, step=args.step)
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
        out_dir = os.path.join(get_base_dir(), "chat_eval")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{args.stage}_model_{meta.get('step', 0):06d}.csv")
        with atomic_write(path, "w") as f:
            f.write("Task,Accuracy\n" + "".join(f"{name},{value}\n" for name, value in rows))
        print0(f"wrote {path}")
    report_section(f"Chat evaluation {args.stage}", {"step": meta.get("step"), **accuracies,
                                                     **({"ChatCORE": score} if score is not None else {})},
                   column=args.stage.upper())
    compute_cleanup()


# =============================================================================================
# Command line (owner: PRETRAIN creates it; SFTRL adds the chat flags and dispatch)
# =============================================================================================

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["base", "sft", "rl"], default="base", help="which checkpoint to evaluate")
    parser.add_argument("--model-tag", default=None, help="checkpoint subdirectory (default: the largest d<N>)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    base = parser.add_argument_group("base model (--stage base)")
    base.add_argument("--eval", default="core,bpb,sample", help="comma-separated: bpb, core, sample")
    base.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1 = all)")
    base.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward for bpb")
    base.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    chat = parser.add_argument_group("chat model (--stage sft|rl)")
    chat.add_argument("--tasks", default="", help=f"comma-separated, default all: {','.join(CHAT_TASKS)}")
    chat.add_argument("--max-problems", type=int, default=None, help="problems per task (default: all)")
    chat.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--top-k", type=int, default=50)
    chat.add_argument("--batch-size", type=int, default=8, help="problems per forward for categorical tasks")
    return parser.parse_args(argv)


RUNNERS = {"base": run_base_eval, "sft": chat_eval_main, "rl": chat_eval_main}


def main(argv=None):
    args = parse_args(argv)
    if args.stage not in RUNNERS:
        raise NanochatError(f"--stage {args.stage} evaluation is not available in this version")
    RUNNERS[args.stage](args)


if __name__ == "__main__":
    main()
