"""What several stages share: run setup, the tokenizer and conversation rendering, data download
and reading, checkpoints, task datasets, the code sandbox and the inference engine.

Stage scripts import only `model` and `common` from the project; this file imports only `model`.
Sections, top to bottom:
  1. run setup (base dir, device, dtype, distributed, logging)
  2. tokenizer and conversation rendering
  3. downloads (NANOCHAT_MIRROR) and pretraining data
  4. checkpoints
  5. pretraining dataloader (BOS-aligned best fit)
  6. tasks (chat datasets) and the code sandbox
  7. inference engine and calculator tool
"""

# =============================================================================================
# 1. Run setup
# =============================================================================================

# (owner: tokenizer/data/checkpoints work; API used by every stage)
#   get_base_dir() -> str                      $NANOCHAT_BASE_DIR or ~/.cache/nanochat, created
#   autodetect_device_type() -> str            "cuda" > "mps" > "cpu"
#   compute_init(device_type="") -> (ddp, rank, local_rank, world_size, device)
#   compute_cleanup()
#   print0(*args, **kwargs)                    print on rank 0 only
#   get_peak_flops(device_name) -> float       bf16 peak, inf when unknown


# =============================================================================================
# 2. Tokenizer and conversation rendering
# =============================================================================================

# (owner: tokenizer/data/checkpoints work)
#   SPECIAL_TOKENS, SPLIT_PATTERN
#   class Tokenizer: train(text_iter, vocab_size) [classmethod], save(dir), load(dir) [classmethod],
#       encode(text|list, prepend=None, append=None, num_threads=8), decode(ids),
#       encode_special(name), get_bos_token_id(), get_vocab_size(), id_to_token(id),
#       render_conversation(conversation, max_tokens=2048) -> (ids, mask),
#       render_for_completion(conversation) -> ids
#   get_tokenizer() -> Tokenizer               from <base>/tokenizer
#   get_token_bytes(device) -> LongTensor      bytes per token id, 0 for specials


# =============================================================================================
# 3. Downloads and pretraining data
# =============================================================================================

# (owner: tokenizer/data/checkpoints work)
#   source_for(default_url, mirror_relpath) -> str   URL or local path; NANOCHAT_MIRROR switches it
#   download_file(source, dest_path, desc=None) -> str   retries, temp+rename, lock, progress
#   pretrain_data_dir() -> str
#   download_shards(num_train_shards, num_workers=4)      always includes the validation shard
#   list_parquet_files() -> list[str]                     train = all but last, val = last
#   iter_row_groups(split, rank=0, world_size=1, start=(0, 0)) -> yields (pq_idx, rg_idx, texts)


# =============================================================================================
# 4. Checkpoints
# =============================================================================================

# (owner: tokenizer/data/checkpoints work)
#   checkpoint_dir(stage, model_tag) -> str    stage in {"base", "sft", "rl"}
#   save_checkpoint(ckpt_dir, step, model_state, optimizer_state, meta, rank=0)
#   load_checkpoint(ckpt_dir, step, device, load_optimizer=False, rank=0) -> (model_state, optim_state, meta)
#   load_model(stage, device, phase="eval", model_tag=None, step=None) -> (model, tokenizer, meta)


# =============================================================================================
# 5. Pretraining dataloader
# =============================================================================================

# (owner: pretraining work)


# =============================================================================================
# 6. Tasks and the code sandbox
# =============================================================================================

# (owner: tasks work)


# =============================================================================================
# 7. Inference engine and calculator tool
# =============================================================================================

# (owner: engine work)
