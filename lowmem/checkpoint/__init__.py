"""Files on disk: atomic single-process checkpoints (store), per-rank data-parallel checkpoints (distributed),
and the bf16 Hugging Face export."""
