"""Model adapters: roles, counts and head shapes of tiny random models; fused projections split exactly (GPT-2's
Conv1D c_attn, phi3's qkv_proj and gate_up_proj, GPT-NeoX's and BLOOM's per-head query_key_value, Falcon's three
layouts, GPTBigCode's two), the
checkpoint mapping both ways on every type of the architecture matrix, the warning when no head layout fits."""
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

from lowmem.checkpoint.export import LazyTensor
from lowmem.model.adapters import (FalconAdapter, FusedLayout, GPT2Adapter, GPTNeoXAdapter, LinearSpec, ModelAdapter,
                                   Phi3Adapter, find_adapter)
from lowmem.model.fused_split import split_linear
from tests.unit.lowmem.model.architecture_matrix import MATRIX, tiny_config, tiny_model

HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2


def _llama(tied=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def _qwen2():
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
    )
    return Qwen2ForCausalLM(config).eval()


def _gpt2():
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=97, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _check_llama_specs(model, specs):
    head_dim = HIDDEN // HEADS
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {s.name for s in specs} == linears - {"lm_head"}
    assert len(specs) == 7 * LAYERS
    roles = [s.role for s in specs]
    assert roles.count("q") == roles.count("k") == roles.count("v") == roles.count("o") == LAYERS
    assert roles.count("mlp") == 3 * LAYERS and "other" not in roles
    for s in specs:
        assert isinstance(s, LinearSpec)
        assert s.layer_index == int(s.name.split(".")[2])
        if s.role == "q":
            assert (s.head_dim, s.num_heads) == (head_dim, HEADS)
        elif s.role == "k":
            assert (s.head_dim, s.num_heads) == (head_dim, KV_HEADS)  # GQA: key/value heads
        else:
            assert (s.head_dim, s.num_heads) == (None, None)
        module = model.get_submodule(s.name)
        if s.role in ("q", "k"):
            assert module.out_features == s.head_dim * s.num_heads


@pytest.mark.parametrize("tied", [False, True])
def test_llama_specs(tied):
    model = _llama(tied)
    adapter = find_adapter(model)
    assert type(adapter) is ModelAdapter  # the generic adapter: names match the checkpoint
    assert adapter.num_layers(model) == LAYERS
    adapter.split_fused(model)  # no-op for LLaMA
    _check_llama_specs(model, adapter.linear_specs(model))
    names = [s.name for s in adapter.linear_specs(model)]
    assert names[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]


def test_qwen2_specs():
    model = _qwen2()
    adapter = find_adapter(model)
    assert adapter.num_layers(model) == LAYERS
    _check_llama_specs(model, adapter.linear_specs(model))
    assert model.get_submodule("model.layers.0.self_attn.q_proj").bias is not None


def test_qwen3_and_mistral_are_supported():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    _check_llama_specs(mistral, find_adapter(mistral).linear_specs(mistral))

    import transformers

    assert hasattr(transformers, "Qwen3Config"), "qwen3 is listed as supported; this transformers must have it"
    # Qwen3 sets head_dim explicitly; use one different from hidden/heads to check it is read from the config.
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=8))
    specs = find_adapter(qwen3).linear_specs(qwen3)
    q = [s for s in specs if s.role == "q"]
    k = [s for s in specs if s.role == "k"]
    assert len(q) == len(k) == LAYERS
    assert all((s.head_dim, s.num_heads) == (8, HEADS) for s in q)
    assert all((s.head_dim, s.num_heads) == (8, KV_HEADS) for s in k)


def test_any_other_model_type_gets_the_generic_adapter():
    model = _llama()
    model.config.model_type = "my_decoder"   # not a type lowmem knows: names and head layout still work
    adapter = find_adapter(model)
    assert type(adapter) is ModelAdapter
    _check_llama_specs(model, adapter.linear_specs(model))
    assert "smollm" not in {t for a in (Phi3Adapter, GPT2Adapter, FalconAdapter, GPTNeoXAdapter) for t in a.model_types}


def test_model_without_config_is_rejected():
    with pytest.raises(TypeError, match="model_type"):
        find_adapter(nn.Linear(2, 2))


def test_conv1d_split_equals_original_output():
    torch.manual_seed(4)
    conv = Conv1D(3 * HIDDEN, HIDDEN)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 5, HIDDEN)
    from lowmem.model.adapters import _conv1d_to_linear

    # Reference twin: y = x W + b with W (in, 3·hidden), split column-wise.
    reference = x @ conv.weight + conv.bias
    whole = _conv1d_to_linear(conv)
    assert (whole.out_features, whole.in_features) == (3 * HIDDEN, HIDDEN)
    torch.testing.assert_close(whole(x), reference, rtol=0, atol=1e-6)
    split = split_linear(whole, FusedLayout((("q", HIDDEN), ("k", HIDDEN), ("v", HIDDEN))))
    torch.testing.assert_close(split(x), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(split(x), conv(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(split.k.weight, conv.weight[:, HIDDEN:2 * HIDDEN].T, rtol=0, atol=0)


def test_gpt2_split_preserves_logits_and_specs():
    model = _gpt2()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    adapter = find_adapter(model)
    assert isinstance(adapter, GPT2Adapter)
    with pytest.raises(ValueError, match="split_fused"):
        adapter.linear_specs(model)  # Conv1D still present

    adapter.split_fused(model)
    adapter.split_fused(model)  # idempotent
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    # The split linears are parameters of the model and train: backward reaches them.
    model(ids).logits.sum().backward()
    q = model.get_submodule("transformer.h.0.attn.c_attn.q_proj")
    assert q.weight.grad is not None and q.weight.shape == (HIDDEN, HIDDEN)

    specs = adapter.linear_specs(model)
    assert adapter.num_layers(model) == LAYERS
    assert len(specs) == 6 * LAYERS  # q, k, v, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert "lm_head" not in {s.name for s in specs}
    by_name = {s.name: s for s in specs}
    for layer in range(LAYERS):
        p = f"transformer.h.{layer}."
        assert by_name[p + "attn.c_attn.q_proj"] == LinearSpec(p + "attn.c_attn.q_proj", "q", layer, 16, HEADS)
        assert by_name[p + "attn.c_attn.k_proj"] == LinearSpec(p + "attn.c_attn.k_proj", "k", layer, 16, HEADS)
        assert by_name[p + "attn.c_attn.v_proj"].role == "v"
        assert by_name[p + "attn.c_proj"].role == "o"
        assert by_name[p + "mlp.c_fc"].role == "mlp"
        assert by_name[p + "mlp.c_proj"].role == "mlp"
        assert all(by_name[p + n].layer_index == layer for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


def test_config_that_does_not_fit_warns_once_and_trains_k_as_an_ordinary_linear():
    model = _llama()
    model.config.num_key_value_heads = HEADS  # k_proj really has KV_HEADS heads
    with pytest.warns(UserWarning, match="cross-head projection is off for model_type 'llama'.*k_proj") as seen:
        specs = find_adapter(model).linear_specs(model)
    assert len(seen) == 1
    assert all(s.num_heads is None and s.head_dim is None for s in specs if s.role == "k")
    assert all((s.head_dim, s.num_heads) == (HIDDEN // HEADS, HEADS) for s in specs if s.role == "q")


def test_model_without_q_and_k_warns_once():
    model = _llama()
    for layer in model.model.layers:   # rename q/k to names no adapter knows
        layer.self_attn.add_module("wq_a", layer.self_attn.q_proj)
        layer.self_attn.add_module("wk_a", layer.self_attn.k_proj)
        del layer.self_attn.q_proj, layer.self_attn.k_proj
    with pytest.warns(UserWarning, match="no k and no q projection found") as seen:
        specs = find_adapter(model).linear_specs(model)
    assert len(seen) == 1 and not any(s.num_heads for s in specs)


def test_head_layout_read_from_other_config_names():
    from transformers import FalconConfig, GPT2Config as G2

    model = _gpt2()
    # n_head and no key/value head count: every head is a key/value head
    assert find_adapter(model).attention_shape(model) == (HIDDEN // HEADS, HEADS, HEADS)
    assert G2(n_embd=HIDDEN, n_head=HEADS).num_attention_heads == HEADS
    holder = nn.Module()
    holder.config = FalconConfig(hidden_size=HIDDEN, num_attention_heads=HEADS)   # multi_query by default
    assert FalconAdapter().attention_shape(holder) == (HIDDEN // HEADS, HEADS, 1)
    holder.config = FalconConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, new_decoder_architecture=True,
                                 num_kv_heads=2)
    assert FalconAdapter().attention_shape(holder) == (HIDDEN // HEADS, HEADS, 2)
    holder.config = FalconConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, multi_query=False)
    assert FalconAdapter().attention_shape(holder) == (HIDDEN // HEADS, HEADS, HEADS)
    holder.config = type("Cfg", (), {"model_type": "x", "n_head": 8, "n_head_kv": 2, "d_model": 64})()
    assert ModelAdapter().attention_shape(holder) == (8, 8, 2)
    holder.config = type("Cfg", (), {"model_type": "x", "n_heads": 4, "multi_query": True, "hidden_size": 64})()
    assert ModelAdapter().attention_shape(holder) == (16, 4, 1)


_VARIANTS = {"falcon_multi_query": ("falcon", {}), "falcon_classic": ("falcon", {"multi_query": False}),
             "falcon_new_decoder": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
             "gpt_bigcode_multi_head": ("gpt_bigcode", {"multi_query": False})}


def _variant(name, meta=False):
    """A tiny model of a MATRIX type or a layout variant (_VARIANTS); on the meta device when `meta`."""
    from transformers import AutoModelForCausalLM

    model_type, overrides = _VARIANTS.get(name, (name, {}))
    if not meta:
        return tiny_model(model_type, **overrides).eval()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))


@pytest.mark.parametrize("name", ["gpt_neox", "bloom", "phi3", "glm4", "gpt_bigcode", *_VARIANTS])
def test_fused_split_preserves_logits_and_gives_cross_head_layouts(name):
    model = _variant(name)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    adapter = find_adapter(model)
    with pytest.raises(ValueError, match="split_fused"):
        adapter.linear_specs(model)
    adapter.split_fused(model)
    adapter.split_fused(model)  # idempotent
    with torch.no_grad():
        after = model(ids).logits
    # The same products, separately: equal up to the summation order of one matmul.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    head_dim, heads, kv_heads = adapter.attention_shape(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = adapter.linear_specs(model)
    q = [s for s in specs if s.role == "q"]
    k = [s for s in specs if s.role == "k"]
    assert len(q) == len(k) == 2
    assert all((s.head_dim, s.num_heads) == (head_dim, heads) for s in q)
    assert all((s.head_dim, s.num_heads) == (head_dim, kv_heads) for s in k)
    assert model.get_submodule(q[0].name).out_features == heads * head_dim
    assert model.get_submodule(k[0].name).out_features == kv_heads * head_dim


@pytest.mark.parametrize("name", [*MATRIX, *_VARIANTS])
def test_checkpoint_mapping_round_trips_on_a_meta_skeleton(name):
    """split_fused on meta, then model_tensors_from_hf of every original tensor == the split model's state dict,
    and to_hf_state_dict of that == the original state dict (identity)."""
    original = _variant(name)
    hf_sd = {key: value.clone() for key, value in original.state_dict().items()}
    adapter = find_adapter(original)
    adapter.split_fused(original)
    split_sd = original.state_dict()

    skeleton = _variant(name, meta=True)
    adapter.split_fused(skeleton)
    assert all(p.device.type == "meta" for p in skeleton.parameters())

    mapped = {}
    for key, tensor in hf_sd.items():
        for new_key, new_tensor in adapter.model_tensors_from_hf(skeleton, key, tensor):
            assert new_key not in mapped, new_key
            mapped[new_key] = new_tensor
    assert mapped.keys() == split_sd.keys()
    for key, tensor in split_sd.items():
        assert mapped[key].shape == tensor.shape and torch.equal(mapped[key], tensor), key

    lazy = {key: LazyTensor(tuple(t.shape), t.dtype, (lambda t=t: t)) for key, t in mapped.items()}
    back = adapter.to_hf_state_dict(skeleton, lazy)
    assert set(back) == set(hf_sd)
    for key, entry in back.items():
        value = entry.load()
        assert tuple(entry.shape) == tuple(value.shape) == tuple(hf_sd[key].shape), key
        assert torch.equal(value, hf_sd[key]), key
