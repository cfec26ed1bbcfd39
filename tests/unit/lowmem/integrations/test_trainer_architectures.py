"""LowMemTrainer.save_model on models whose fused projections lowmem splits to train: the export is in the original
layout. Helpers from test_transformers_trainer."""
import pytest
import torch

from lowmem.integrations.transformers import LowMemTrainer
from tests.unit.lowmem.integrations.test_transformers_trainer import args, rows


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "falcon"])
def test_save_model_re_fuses_split_projections(model_type, tmp_path):
    """A model whose fused q/k/v (and gate/up) lowmem splits to train is saved in its original layout: every key
    loads, and the logits equal the trained model's within bf16 rounding (8 u of max|logits|, as the coverage test
    tests/unit/lowmem/model/test_architectures.py states)."""
    from transformers import AutoModelForCausalLM

    from tests.unit.lowmem.model.architecture_matrix import tiny_model

    trainer = LowMemTrainer(model=tiny_model(model_type), args=args(tmp_path, max_steps=2, save_strategy="no"),
                            train_dataset=rows())
    trainer.train()
    trainer.save_model()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "model", output_loading_info=True,
                                                        dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.arange(3, 11).unsqueeze(0)
    trainer.model.eval()
    with torch.no_grad():
        theirs = loaded.eval()(ids).logits
        ours = trainer.model(ids).logits.float()
    assert float((theirs - ours).abs().max() / ours.abs().max()) <= 8 * 2.0**-9
