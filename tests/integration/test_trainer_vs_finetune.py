"""LowMemTrainer with gradient_accumulation_steps=4 gives the same weights as `python -m launch.finetune`, when the
Trainer's data set is the CLI's own pipeline (build_data) laid out in the CLI's batch order (BatchSampler)."""
import torch
from transformers import TrainingArguments

from launch.config_loader import load_train_config
from launch.data import BatchSampler, build_data
from launch.finetune import main
from launch.models import load_int8_model
from lowmem.checkpoint.store import list_checkpoints, load_checkpoint
from lowmem.integrations.transformers import LowMemTrainer

STEPS, ACCUM = 3, 4


def test_trainer_equals_finetune_cli(tiny_args, tmp_path):
    # fused_loss=false: the Trainer computes the model's own loss (logits + cross-entropy); the CLI's default fused
    # linear + cross-entropy gives the same loss up to rounding, which bit-identical weights cannot absorb.
    overrides = tiny_args + [f"max_steps={STEPS}", f"grad_accum_steps={ACCUM}", "eval_every=0", "export=false",
                             "fused_loss=false"]
    assert main(overrides) == 0
    cli_state, cli_runtime, _ = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert cli_runtime["lowmem"]["global_step"] == STEPS

    cfg = load_train_config(None, overrides)
    lowmem = cfg.lowmem_config()
    # The CLI's own loader (INT8 layers on the device, initialised module by module under the run seed): the
    # Trainer takes the INT8 model as it is.
    loaded = load_int8_model(cfg.model, lowmem, dtype=torch.float32, device=torch.device("cpu"),
                             tokenizer=cfg.tokenizer, seed=cfg.seed)
    data = build_data(cfg.data, loaded.tokenizer, seq_len=cfg.seq_len, seed=cfg.seed, cache_dir=cfg.data.cache_dir)
    sampler = BatchSampler(data.train.shape[0], cfg.micro_batch_size, cfg.seed)
    order = torch.cat([sampler.next_batch() for _ in range(STEPS * ACCUM)])
    rows = [{"input_ids": data.train[i], "labels": data.train_labels[i]} for i in order.tolist()]

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": lowmem.min_lr_ratio},
        max_grad_norm=lowmem.grad_clip, seed=cfg.seed, train_sampling_strategy="sequential", save_strategy="no",
        report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = LowMemTrainer(model=loaded.model, args=args, train_dataset=rows, lowmem_config=lowmem)
    trainer.train()
    assert trainer.runtime.config == lowmem   # the Trainer's arguments mapped onto the CLI's config exactly

    mine = trainer.model.state_dict()
    assert mine.keys() == cli_state.keys()
    differ = [k for k in mine if not torch.equal(mine[k], cli_state[k])]
    assert differ == []
    initial = load_int8_model(cfg.model, lowmem, dtype=torch.float32, device=torch.device("cpu"),
                              tokenizer=cfg.tokenizer, seed=cfg.seed).model
    assert not torch.equal(initial.state_dict()["model.embed_tokens.weight"], mine["model.embed_tokens.weight"])
    ours = trainer.runtime.state_dict()["state"]
    for index, tensors in cli_runtime["state"].items():
        for key, value in tensors.items():   # NaN marks an empty slot (similarity history): equal to NaN here
            theirs = ours[index][key]
            assert value.dtype == theirs.dtype and torch.equal(value.isnan(), theirs.isnan()) if \
                value.is_floating_point() else True, (index, key)
            assert torch.equal(value.nan_to_num(0) if value.is_floating_point() else value,
                               theirs.nan_to_num(0) if theirs.is_floating_point() else theirs), (index, key)
