"""Train the BPE tokenizer on the pretraining text, save it, and show how well it compresses.

    python train_tokenizer.py                                 # vocab 32768 on up to 2B characters
    python train_tokenizer.py --vocab-size 4096 --max-chars 20000000
    python train_tokenizer.py --prefetch-shards 170           # also fetch 170 shards for pretraining meanwhile

Runs on the CPU (rustbpe uses every core); there is no GPU or multi-node variant. Shards are
downloaded as needed from the hub, or from $NANOCHAT_MIRROR (a URL or a directory laid out like
shared/data). Writes <base>/tokenizer/tokenizer.json and token_bytes.pt ($NANOCHAT_BASE_DIR,
default ~/.cache/nanochat).
"""
import inspect
import os
import time

import pyarrow.parquet as pq

from common import (SPECIAL_TOKENS, Tokenizer, argument_parser, download_shard, download_shards, get_base_dir,
                    int_flag, make_dir, num_source_shards, print0, report_section, shard_path)

PROSE = """The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of
habit: one hundred and twelve. From the gallery he could see the fishing boats returning, their lamps
swaying like fireflies over the dark water, and he wondered, not for the first time, who would tend
the light once he was gone."""
MATH = r"""\begin{proof}
We show $\sum_{k=1}^{n} k^3 = \left(\frac{n(n+1)}{2}\right)^2$ by induction. For $n = 1$ both sides equal $1$.
Assume it holds for $n$. Then $\sum_{k=1}^{n+1} k^3 = \frac{n^2(n+1)^2}{4} + (n+1)^3
= \frac{(n+1)^2 (n^2 + 4n + 4)}{4} = \left(\frac{(n+1)(n+2)}{2}\right)^2$, which is the claim for $n+1$.
\end{proof}"""
NON_ENGLISH = """오늘 아침에 시장에 가서 사과와 배를 샀습니다. 날씨가 맑아서 산책하기 좋았어요.
今天下午我们在图书馆里读书，然后一起去喝茶。
Le train pour Lyon partira avec vingt minutes de retard à cause de la neige.
Москва — столица России, и зимой там бывает очень холодно."""
ROUND_TRIP = "Hello world! 👋🏽 你好，世界。 Привет, мир! مرحبا بالعالم 🎉 <|bos|> \t\n   007 3.14159 naïve café"


def iter_training_text(max_chars, doc_cap, num_train_shards):
    """Training documents in order, each cut to doc_cap characters, until max_chars; shards are
    downloaded one by one as the stream reaches them."""
    total = 0
    for index in range(num_train_shards):
        parquet = pq.ParquetFile(download_shard(index))
        for rg in range(parquet.num_row_groups):
            for doc in parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = doc[:doc_cap]
                total += len(doc)
                yield doc
                if total >= max_chars:
                    return


def first_row_group_text(path):
    return "\n".join(pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist())


def compression_table(tokenizer, texts):
    import tiktoken
    encoders = [("ours", tokenizer.encode)]
    try:
        for name, enc_name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
            encoders.append((name, tiktoken.get_encoding(enc_name).encode_ordinary))
    except Exception as e:  # tiktoken downloads these vocabularies from the internet on first use
        print(f"(GPT-2/GPT-4 vocabularies unavailable: {type(e).__name__}; showing ours alone)")
        encoders = encoders[:1]
    print(f"\n{'text':<12}{'bytes':>10}" + "".join(f"{name + ' tok':>12}{'B/tok':>7}" for name, _ in encoders))
    for label, text in texts.items():
        num_bytes = len(text.encode("utf-8"))
        row = f"{label:<12}{num_bytes:>10}"
        for _, encode in encoders:
            n = len(encode(text))
            row += f"{n:>12}{num_bytes / n:>7.2f}"
        print(row)


def main(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--vocab-size", type=int_flag(256 + len(SPECIAL_TOKENS)), default=32768,
                        help="including the 9 special tokens")
    parser.add_argument("--max-chars", type=int_flag(1), default=2_000_000_000, help="characters of text to train on")
    parser.add_argument("--doc-cap", type=int_flag(1), default=10_000, help="cut each document to this many characters")
    parser.add_argument("--prefetch-shards", type=int_flag(0, never=True), default=0,
                        help="download this many training shards in the background while training (-1 = all)")
    args = parser.parse_args(argv)
    tokenizer_dir = make_dir(os.path.join(get_base_dir(), "tokenizer"), writable=True)  # before hours of training

    # the validation shard (the source's last) is fetched first: the table below uses it, and the
    # local "last file = validation" rule then holds while training shards arrive
    total_shards = num_source_shards()
    val_path = download_shard(total_shards - 1)
    prefetch = download_shards(args.prefetch_shards, background=True) if args.prefetch_shards else None

    t0 = time.time()
    tokenizer = Tokenizer.train(iter_training_text(args.max_chars, args.doc_cap, total_shards - 1), args.vocab_size)
    train_time = time.time() - t0
    print(f"trained vocab {tokenizer.get_vocab_size()} in {train_time:.2f}s")
    tokenizer.save(tokenizer_dir)
    print(f"saved {tokenizer_dir}/tokenizer.json and token_bytes.pt")
    assert tokenizer.decode(tokenizer.encode(ROUND_TRIP)) == ROUND_TRIP, "round trip failed"

    code = inspect.getsource(iter_training_text) + inspect.getsource(compression_table)
    compression_table(tokenizer, {"prose": PROSE, "code": code, "math": MATH, "non-english": NON_ENGLISH,
                                  "train-shard": first_row_group_text(shard_path(0)),
                                  "val-shard": first_row_group_text(val_path)})
    if prefetch is not None:
        print0("waiting for the background shard downloads...")
        prefetch.result()
    val_text = first_row_group_text(val_path)
    report_section("Tokenizer training", {
        "vocab size": tokenizer.get_vocab_size(), "max characters": args.max_chars, "document cap": args.doc_cap,
        "training time (s)": train_time, "val bytes per token": len(val_text.encode()) / len(tokenizer.encode(val_text))})


if __name__ == "__main__":
    main()
