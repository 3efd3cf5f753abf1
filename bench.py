"""Benchmarks: the figures quoted in the README and in issue notes come from here.

    python bench.py train --depth 6 --seq-len 512 --device-batch-size 32
    python bench.py decode --depth 6
    python bench.py tokenize
"""
import argparse

# ---- train (owner: model work) ----

# ---- decode (owner: model work, then engine work) ----

# ---- tokenize (owner: tokenizer work) ----


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # each section registers its subcommand here
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
