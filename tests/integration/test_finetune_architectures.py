"""`python -m launch.finetune` from scratch on decoders other than LLaMA (fused projections, Conv1D, MoE, a model the
fused loss refuses): a short run trains, exports, and the export loads with every key matched. Tiny configs from
tests/unit/lowmem/model/architecture_matrix.py."""
import json

import pytest

from launch.finetune import main
from tests.unit.lowmem.model.architecture_matrix import tiny_config


def _config_file(model_type, tmp_path, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    path = tmp_path / f"{model_type}.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


def _args(tiny_args, config_path):
    return [a for a in tiny_args if not a.startswith(("model=", "max_steps=", "eval_every="))] + \
        [f"model={config_path}", "max_steps=3", "eval_every=0"]


@pytest.mark.parametrize("model_type,extra", [("gpt2", []), ("gpt_neox", []), ("falcon", []), ("phi3", []),
                                              ("mixtral", []), ("gemma2", ["fused_loss=false"])])
def test_finetune_trains_and_exports(model_type, extra, tiny_args, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(_args(tiny_args, _config_file(model_type, tmp_path)) + extra) == 0
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", output_loading_info=True)
    assert model.config.model_type == model_type
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_fused_loss_refusal_names_the_setting(tiny_args, tmp_path, capsys):
    assert main(_args(tiny_args, _config_file("gemma2", tmp_path))) != 0
    err = capsys.readouterr().err
    assert "'gemma2'" in err and "final_logit_softcapping" in err and "fused_loss=false" in err
