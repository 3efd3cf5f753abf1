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


# =============================================================================================
# Chat model evaluation: categorical and generative tasks, ChatCORE (owner: SFTRL)
# =============================================================================================


# =============================================================================================
# Command line (owner: PRETRAIN creates it; SFTRL adds the chat flags and dispatch)
# =============================================================================================
