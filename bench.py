"""Benchmarks: the figures quoted in the README and in issue notes come from here.

    python bench.py train --depth 6 --seq-len 512 --device-batch-size 32
    python bench.py decode --depth 6
    python bench.py tokenize
"""
import argparse

# ---- train (owner: model work) ----

# ---- decode (owner: model work, then engine work) ----
import statistics
import time

import torch

import common
from model import build_gpt, config_for_depth


def decode_setup(args):
    """The model to time (random weights: decode speed does not depend on them) and a tokenizer with the
    same special-token ids as a trained one of this vocab size (the engine only needs those)."""
    torch.manual_seed(0)
    config = config_for_depth(args.depth, head_dim=args.head_dim, sequence_len=args.seq_len,
                              vocab_size=args.vocab_size, window_pattern=args.window_pattern)
    device = args.device_type or common.autodetect_device_type()
    model = build_gpt(config, device).eval()
    num_ranks = args.vocab_size - len(common.SPECIAL_TOKENS)
    ranks = {bytes([i]) if i < 256 else b"\xff" + i.to_bytes(2, "big"): i for i in range(num_ranks)}
    tokenizer = common.Tokenizer.from_ranks(ranks, common.SPLIT_PATTERN)
    prompt = torch.randint(0, num_ranks, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    return model, tokenizer, prompt


class StopSometimes(torch.nn.Module):
    """Wraps the model so <|assistant_end|> ties with the most likely token at every step: rows finish at
    random times (after ~top_k steps on average), like a batch of real replies of different lengths."""

    def __init__(self, model, end_token):
        super().__init__()
        self.model, self.config, self.end_token = model, model.config, end_token

    def forward(self, idx, kv_cache=None):
        logits = self.model(idx, kv_cache=kv_cache)
        logits[:, -1, self.end_token] = logits[:, -1].max(dim=-1).values
        return logits


def time_decode(engine, prompt, batch_size, args, seed):
    """Run one generation; returns (tokens of unfinished rows after the first column, seconds since the
    first column): decode only, the prefill is not counted."""
    tokens, start, finished = 0, None, set()
    for column, _ in engine.generate(prompt, num_samples=batch_size, max_tokens=args.decode_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=seed):
        if start is None:
            start = time.perf_counter()
            continue
        tokens += sum(1 for i, token in enumerate(column) if i not in finished)
        finished.update(i for i, token in enumerate(column) if token in engine.stop_tokens)
    return tokens, time.perf_counter() - start


def bench_decode(args):
    """Decode tokens/s of the Engine per batch size (median of --repeats, interleaved A/B when comparing)."""
    model, tokenizer, prompt = decode_setup(args)
    print(f"model: depth {args.depth}, n_embd {model.config.n_embd}, seq {args.seq_len}, vocab {args.vocab_size}, "
          f"window {args.window_pattern}, dtype {next(model.parameters()).dtype}; device {next(model.parameters()).device}, "
          f"{torch.get_num_threads()} threads; prompt {len(prompt)} tokens, {args.decode_tokens} decoded, "
          f"temperature {args.temperature}, top-k {args.top_k}")
    end = tokenizer.encode_special("<|assistant_end|>")
    variants = {"engine": common.Engine(model, tokenizer)}
    if args.stops:  # finished rows leave the batch vs stay in it (the reference)
        variants = {"drop finished": common.Engine(StopSometimes(model, end), tokenizer),
                    "keep finished": common.Engine(StopSometimes(model, end), tokenizer)}
        variants["keep finished"].drop_finished = False
    for batch_size in args.batch_sizes:
        for engine in variants.values():
            time_decode(engine, prompt, batch_size, args, seed=-1)  # warm-up
        rates = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, engine in variants.items():  # interleaved, so load changes hit every variant alike
                tokens, seconds = time_decode(engine, prompt, batch_size, args, seed=repeat)
                rates[name].append((tokens / seconds, seconds))
        for name, runs in rates.items():
            tok_s = sorted(r for r, _ in runs)
            print(f"batch {batch_size:>3} {name:>14}: {statistics.median(tok_s):7.1f} tokens/s median "
                  f"(min {tok_s[0]:.1f}, max {tok_s[-1]:.1f}; {statistics.median(s for _, s in runs):.2f} s per run)")


def add_decode_parser(sub):
    p = sub.add_parser("decode", help="engine decode tokens/s (defaults: the CPU demo model)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stops", action="store_true", help="rows finish at random times: compare dropping finished "
                   "rows from the batch with keeping them (the reference), by useful tokens/s")
    p.add_argument("--device-type", default="")
    p.set_defaults(func=bench_decode)


# ---- tokenize (owner: tokenizer work) ----
import os
import time

import pyarrow.parquet as pq

import common


def shard_docs(path, doc_cap=None):
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [d[:doc_cap] for d in docs] if doc_cap else docs


def bench_tokenize(args):
    """Tokenizer training time per vocab size on the local shards (fetched through NANOCHAT_MIRROR when
    missing), then batch-encoding throughput of the val shard with the last tokenizer trained."""
    common.download_shards(-1)
    train_files, (val_file,) = common.split_files("train"), common.split_files("val")
    docs, chars = [], 0
    for path in train_files:
        for doc in shard_docs(path, args.doc_cap):
            if chars >= args.max_chars:
                break
            docs.append(doc)
            chars += len(doc)
    print(f"training text: {len(docs):,} docs, {chars / 1e6:.1f}M chars from {len(train_files)} shards; {os.cpu_count()} cores")
    for vocab_size in args.vocab_sizes:
        t0 = time.time()
        tokenizer = common.Tokenizer.train(iter(docs), vocab_size)
        print(f"train vocab {vocab_size:>6}: {time.time() - t0:6.2f} s")
    val_docs = shard_docs(val_file)
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    for threads in sorted({1, args.threads}):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.time()
            num_tokens = sum(map(len, tokenizer.encode(val_docs, num_threads=threads)))
            best = min(best, time.time() - t0)
        print(f"encode val shard ({val_bytes / 1e6:.2f} MB, vocab {tokenizer.get_vocab_size()}), {threads} thread(s): "
              f"{num_tokens / best / 1e6:.2f}M tokens/s, {val_bytes / best / 1e6:.1f} MB/s, {val_bytes / num_tokens:.2f} bytes/token")


def add_tokenize_parser(sub):
    p = sub.add_parser("tokenize", help="tokenizer training time and batch-encoding throughput")
    p.add_argument("--vocab-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 32768])
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="training characters (all shards by default)")
    p.add_argument("--doc-cap", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=bench_tokenize)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # each section registers its subcommand here
    add_decode_parser(sub)
    add_tokenize_parser(sub)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
