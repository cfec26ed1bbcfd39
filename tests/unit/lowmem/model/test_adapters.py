"""Model adapters: roles, counts and head shapes of tiny random models; GPT-2 fused-qkv split is exact."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

from lowmem.model.adapters import GPT2Adapter, LinearSpec, LlamaAdapter, SplitLinear, find_adapter

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
    assert isinstance(adapter, LlamaAdapter)
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


def test_smollm_is_llama():
    model = _llama()
    model.config.model_type = "smollm"
    assert isinstance(find_adapter(model), LlamaAdapter)


def test_unsupported_model_type_names_supported_ones():
    model = _llama()
    model.config.model_type = "falcon"
    with pytest.raises(ValueError) as err:
        find_adapter(model)
    message = str(err.value)
    assert "falcon" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3", "smollm", "gpt2"):
        assert supported in message


def test_model_without_config_is_rejected():
    with pytest.raises(TypeError, match="model_type"):
        find_adapter(nn.Linear(2, 2))


def test_conv1d_split_equals_original_output():
    torch.manual_seed(4)
    conv = Conv1D(3 * HIDDEN, HIDDEN)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 5, HIDDEN)
    holder = nn.Module()
    holder.c_attn = conv
    from lowmem.model.adapters import _conv1d_to_linear

    # Reference twin: y = x W + b with W (in, 3·hidden), split column-wise.
    reference = x @ conv.weight + conv.bias
    parts = [(p, _conv1d_to_linear(conv, slice(k * HIDDEN, (k + 1) * HIDDEN))) for k, p in enumerate("qkv")]
    split = SplitLinear(parts)
    torch.testing.assert_close(split(x), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(split(x), conv(x), rtol=0, atol=1e-6)
    whole = _conv1d_to_linear(conv)
    assert (whole.out_features, whole.in_features) == (3 * HIDDEN, HIDDEN)
    torch.testing.assert_close(whole(x), reference, rtol=0, atol=1e-6)


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


def test_config_that_does_not_fit_is_rejected():
    model = _llama()
    model.config.num_key_value_heads = HEADS  # k_proj really has KV_HEADS heads
    with pytest.raises(ValueError, match="k_proj"):
        find_adapter(model).linear_specs(model)
