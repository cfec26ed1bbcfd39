"""The model card (README.md) written next to an exported bf16 model, so the export directory is a Hub repository.

    write_model_card(out_dir, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", datasets=["train.jsonl"],
                     steps=500, method=LowMemConfig(...), eval_loss=1.93)

The directory `export_hf` + this card make is what `huggingface_hub.upload_folder` / `push_to_hub` publish as a model
repository: config.json (+ generation_config.json), model.safetensors (or shards + index), the tokenizer's files and
README.md whose YAML front matter `huggingface_hub.ModelCard` parses. Nothing here touches the network.

Front matter: library_name transformers, tags, and base_model / datasets only when they are Hub ids ("org/name", not
a local path: the Hub validates those keys as repository ids). The body records base model, data, optimizer steps,
the method (the LowMemConfig settings that define the update) and the final held-out loss.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import yaml

__all__ = ["README_NAME", "model_card_text", "write_model_card"]

README_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# The LowMemConfig fields that say what the update was (the rest are tuning of the same method).
_METHOD_FIELDS = ("rank", "scale", "lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_accum_steps",
                  "grad_clip", "clip_mode", "projection", "refresh", "refresh_interval_steps", "cross_head",
                  "residual_ratio", "optim_bits", "projector_bits", "int8_weights", "stochastic_rounding", "seed")


def _hub_id(name: str | None) -> str | None:
    """name when it looks like a Hub repository id and is not an existing local path, else None."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _method_rows(method) -> list[tuple[str, str]]:
    if method is None:
        return []
    values = method.to_dict() if hasattr(method, "to_dict") else dict(method)
    return [(key, str(values[key])) for key in _METHOD_FIELDS if key in values]


def model_card_text(*, base_model: str | None, datasets: list[str] | tuple[str, ...] = (), steps: int,
                    method=None, eval_loss: float | None = None, title: str | None = None,
                    extra: dict | None = None) -> str:
    """README.md text: YAML front matter, then a description and a table of the run.

    base_model: Hub id or local description of the starting weights; datasets: the training data (ids or paths);
    method: a LowMemConfig (or its to_dict()); eval_loss: final held-out mean token loss (None: not evaluated);
    extra: more {label: value} rows for the run table."""
    hub_datasets = [d for d in (_hub_id(str(d)) for d in datasets) if d]
    meta = {"library_name": "transformers", "tags": ["lowmem", "full-parameter-fine-tuning", "low-rank-adam",
                                                     "int8-weights"]}
    if _hub_id(base_model):
        meta["base_model"] = base_model
    if hub_datasets:
        meta["datasets"] = hub_datasets
    loss = "not evaluated" if eval_loss is None or not math.isfinite(eval_loss) else \
        f"{eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})"
    rows = [("base model", base_model or "unknown"), ("training data", ", ".join(map(str, datasets)) or "unknown"),
            ("optimizer steps", str(steps)), ("final eval loss", loss),
            *((k, str(v)) for k, v in (extra or {}).items())]
    method_rows = _method_rows(method)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {title or 'Fine-tuned with lowmem'}", "",
             "Full-parameter fine-tune trained with lowmem: INT8 linear weights updated with stochastic rounding, "
             "low-rank (GaLore-style) 8-bit Adam moments with randomized-SVD projectors, every layer updated inside "
             "the backward pass. The weights here are the bf16 export; they load with "
             "`AutoModelForCausalLM.from_pretrained` like any other model of this architecture.", "",
             "## Training run", "", "| | |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    if method_rows:
        lines += ["", "## Method (lowmem settings)", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in method_rows]
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: str | os.PathLike, **info) -> Path:
    """Write out_dir/README.md (model_card_text(**info)) atomically: a temporary file renamed onto the name."""
    path = Path(out_dir) / README_NAME
    tmp = path.with_name(f".{README_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(model_card_text(**info), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
