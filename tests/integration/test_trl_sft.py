"""TRL's SFTTrainer with lowmem underneath (`lowmem_trainer(SFTTrainer)`) on a 4-example chat data set."""
import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is in the test extra (pip install -e .[test])")
datasets = pytest.importorskip("datasets", reason="datasets is in the test extra (pip install -e .[test])")

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402

from lowmem.config import LowMemConfig  # noqa: E402
from lowmem.integrations.transformers import lowmem_trainer  # noqa: E402

CHATS = [
    [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}],
    [{"role": "user", "content": "name a color"}, {"role": "assistant", "content": "the sky is blue"}],
    [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "user", "content": "finish: to be or"}, {"role": "assistant", "content": "not to be"}],
]


class Grads(TrainerCallback):
    def __init__(self):
        self.held = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.held += [n for n, p in model.named_parameters() if p.grad is not None]


def test_sft_trainer_trains_through_lowmem(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    LowMemSFTTrainer = lowmem_trainer(trl.SFTTrainer)
    assert issubclass(LowMemSFTTrainer, trl.SFTTrainer)
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, max_steps=4, learning_rate=3e-3, warmup_steps=1,
                           max_grad_norm=1.0, max_length=48, logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=True, seed=0, assistant_only_loss=True, disable_tqdm=True)
    grads = Grads()
    trainer = LowMemSFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[grads],
                               train_dataset=datasets.Dataset.from_list([{"messages": m} for m in CHATS]),
                               lowmem_config=LowMemConfig(rank=8, weight_block_size=32))
    def embedding_state():   # the input embedding is an INT8 weight (weight_q, weight_scales) by default
        return {k: v.clone() for k, v in trainer.model.get_input_embeddings().state_dict().items()}
    embed = embedding_state()
    trainer.train()
    assert trainer.runtime.global_step == 4 and grads.held == []
    assert any(not torch.equal(v, embedding_state()[k]) for k, v in embed.items())   # it trained
    logs = [r for r in trainer.state.log_history if "grad_norm" in r]
    assert len(logs) == 4 and all(r["grad_norm"] > 0 and r["loss"] > 0 for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    trainer.save_model(str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "model.safetensors").is_file()
