"""The streaming loader (lowmem.model.loader, lowmem.load_pretrained) against transformers' own loader followed by
prepare(): the same codes, scales, float parameters, buffers and optimizer state; bad weight files stopped with the
tensor and file named; a from-scratch model initialised module by module with the model's own distribution."""
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig

from hooks.runtime import prepare
from lowmem import LowMemConfig, load_pretrained
from lowmem.checkpoint.hf_files import WeightFileError
from lowmem.model.int8_embedding import Int8Embedding
from lowmem.model.int8_linear import Int8Linear
from lowmem.model.loader import LoadError, load_int8_model


def llama_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied, max_position_embeddings=64)


def saved(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def reference(folder, cfg, dtype):
    """Today's path: transformers loads the float model whole, prepare() converts it."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, prepare(model, cfg)


def assert_same_state(a: dict, b: dict):
    """Equal names, dtypes and values; NaN (an empty slot of a similarity history) equals NaN."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        if a[name].is_floating_point():
            assert torch.equal(a[name].isnan(), b[name].isnan()), name
            assert torch.equal(a[name].nan_to_num(0), b[name].nan_to_num(0)), name
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_model_equals_from_pretrained_then_prepare(tmp_path, tied, dtype):
    torch.manual_seed(0)
    folder = saved(AutoModelForCausalLM.from_config(llama_config(tied)), tmp_path / "m", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()   # sharded
    cfg = LowMemConfig(rank=8, weight_block_size=32)
    ref_model, ref_runtime = reference(folder, cfg, dtype)
    model, runtime = load_pretrained(folder, cfg, device="cpu", dtype=dtype)
    assert_same_state(ref_model.state_dict(), model.state_dict())
    assert_same_state(dict(ref_model.named_buffers()), dict(model.named_buffers()))
    ref_state, state = ref_runtime.state_dict()["state"], runtime.state_dict()["state"]
    assert ref_state.keys() == state.keys()
    for index in ref_state:
        assert_same_state(ref_state[index], state[index])
    assert [item.name for item in runtime.trainables] == [item.name for item in ref_runtime.trainables]
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding if tied else Int8Embedding)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 300, (2, 12))
    assert torch.equal(ref_model(ids).logits, model(ids).logits)
    assert model.training


def test_pytorch_bin_checkpoint_streams_the_same(tmp_path):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(llama_config(False))
    folder = tmp_path / "m"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")   # what older models ship
    cfg = LowMemConfig(weight_block_size=32)
    ref_model, _ = reference(folder, cfg, torch.bfloat16)
    model = load_int8_model(llama_config(False), cfg, device="cpu", dtype=torch.bfloat16, weights=folder)
    assert_same_state(ref_model.state_dict(), model.state_dict())


@pytest.fixture
def untied_dir(tmp_path):
    torch.manual_seed(2)
    return saved(AutoModelForCausalLM.from_config(llama_config(False)), tmp_path / "m")


def rewrite(folder, change):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_missing_tensor_is_named_before_anything_is_read(untied_dir):
    rewrite(untied_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(LoadError, match=r"lack 1 tensor.*model\.layers\.1\.mlp\.down_proj\.weight.*model\.safetensors"):
        load_int8_model(llama_config(False), LowMemConfig(), device="cpu", dtype=torch.bfloat16, weights=untied_dir)


def test_a_wrong_shape_is_named_with_its_file(untied_dir):
    rewrite(untied_dir, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(LoadError, match=r"q_proj\.weight in .*model\.safetensors: shape \(64, 32\).*\(64, 64\)"):
        load_int8_model(llama_config(False), LowMemConfig(), device="cpu", dtype=torch.bfloat16, weights=untied_dir)


def test_an_integer_tensor_where_a_float_belongs_is_refused(untied_dir):
    rewrite(untied_dir, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(LoadError, match=r"model\.norm\.weight in .*: dtype torch\.int32.*float"):
        load_int8_model(llama_config(False), LowMemConfig(), device="cpu", dtype=torch.bfloat16, weights=untied_dir)


def test_a_truncated_file_is_named(untied_dir):
    path = untied_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"model\.safetensors.*corrupt or truncated"):
        load_int8_model(llama_config(False), LowMemConfig(), device="cpu", dtype=torch.bfloat16, weights=untied_dir)


def test_an_index_naming_a_missing_shard_is_named(tmp_path):
    torch.manual_seed(3)
    folder = saved(AutoModelForCausalLM.from_config(llama_config(False)), tmp_path / "m", max_shard_size="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(WeightFileError, match=f"shards that do not exist.*{shard}"):
        load_int8_model(llama_config(False), LowMemConfig(), device="cpu", dtype=torch.bfloat16, weights=folder)


def test_checkpoint_names_that_need_transformers_conversion_load_on_the_host(tmp_path):
    """Mixtral's per-expert tensors are fused by transformers while loading: that checkpoint goes through
    from_pretrained on the host (a warning says so), with the same result as prepare(from_pretrained(...))."""
    config = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(4)
    folder = saved(AutoModelForCausalLM.from_config(config), tmp_path / "m")
    cfg = LowMemConfig(weight_block_size=32)
    ref_model, _ = reference(folder, cfg, torch.bfloat16)
    with pytest.warns(UserWarning, match="cannot stream this checkpoint.*do not match"):
        model = load_int8_model(config, cfg, device="cpu", dtype=torch.bfloat16, weights=folder)
    assert_same_state(ref_model.state_dict(), model.state_dict())


def test_gpt2_conv1d_checkpoint_streams_equal(tmp_path):
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(5)
    folder = saved(AutoModelForCausalLM.from_config(config), tmp_path / "m")
    cfg = LowMemConfig(weight_block_size=32)
    ref_model, _ = reference(folder, cfg, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_int8_model(config, cfg, device="cpu", dtype=torch.float32, weights=folder)
    # streamed (the adapter splits c_attn and transposes Conv1D tensor by tensor), not loaded on the host
    assert not [w for w in caught if "cannot stream" in str(w.message)]
    assert_same_state(ref_model.state_dict(), model.state_dict())


def test_from_scratch_follows_the_models_initialisation(tmp_path):
    """Each linear's weight ~ N(0, initializer_range) (checked on its dequantised INT8 codes: bounds of >= 6
    standard errors of the sample statistics; INT8 rounding moves the std by ~0.6%); norms are ones; the tied embedding stays float and tied; a seed reproduces the codes."""
    config = llama_config(True)
    config.initializer_range = 0.03
    cfg = LowMemConfig(weight_block_size=32)
    torch.manual_seed(7)
    model = load_int8_model(config, cfg, device="cpu", dtype=torch.bfloat16, weights="scratch")
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 14
    weights = [layer.dequantized_weight(torch.float32).flatten() for layer in linears]
    for weight in weights:   # >= 2048 values each: the std's relative standard error is <= 1.6%; 10% is > 6 sigma
        assert abs(weight.std().item() / 0.03 - 1) < 0.10
        assert abs(weight.mean().item()) < 0.03 * 6 / math.sqrt(weight.numel())
    pooled = torch.cat(weights)   # ~70k values: standard error 0.3%
    assert abs(pooled.std().item() / 0.03 - 1) < 0.02
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert abs(model.model.embed_tokens.weight.float().std().item() / 0.03 - 1) < 0.05
    torch.manual_seed(7)
    again = load_int8_model(config, cfg, device="cpu", dtype=torch.bfloat16, weights="scratch")
    assert_same_state(model.state_dict(), again.state_dict())
    torch.manual_seed(8)
    other = load_int8_model(config, cfg, device="cpu", dtype=torch.bfloat16, weights="scratch")
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight_q, model.model.layers[0].mlp.up_proj.weight_q)
    ids = torch.randint(0, 300, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_empty_model_has_every_tensor_on_the_device_and_takes_a_checkpoint_state(untied_dir):
    cfg = LowMemConfig(weight_block_size=32)
    full = load_int8_model(llama_config(False), cfg, device="cpu", dtype=torch.bfloat16, weights=untied_dir)
    empty = load_int8_model(llama_config(False), cfg, device="cpu", dtype=torch.bfloat16, weights="empty")
    assert not any(t.is_meta for t in list(empty.parameters()) + list(empty.buffers()))
    runtime = prepare(empty, cfg)
    runtime.load_model_state(full.state_dict())
    assert_same_state(full.state_dict(), empty.state_dict())


def test_load_pretrained_refuses_what_is_not_a_model_directory(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LoadError, match="no config.json"):
        load_pretrained(tmp_path / "plain")


class PairComm:
    """Rank `rank` of a pretend pair: enough of lowmem.distributed.Comm for prepare() to assign owners and partition
    (no collective runs while loading)."""

    world_size, bytes_total = 2, 0

    def __init__(self, rank):
        self.rank = rank


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_rank_reads_and_quantises_only_the_weights_it_owns(untied_dir, monkeypatch, rank):
    """Each rank of a ZeRO-3 pair quantises exactly the INT8 weights it owns (the same owners prepare() picks on the
    whole model), with the codes the whole model has; the others hold nothing; nothing else differs."""
    import lowmem.model.loader as loader
    from lowmem.distributed import DataParallel

    cfg = LowMemConfig(rank=8, weight_block_size=32)
    whole = reference(untied_dir, cfg, torch.bfloat16)[0].state_dict()           # one process: every weight
    ref_model = AutoModelForCausalLM.from_pretrained(untied_dir, dtype=torch.bfloat16)
    ref_runtime = prepare(ref_model, cfg, data_parallel=DataParallel(PairComm(rank), 3))   # today's ZeRO-3 rank
    quantised = []
    real = loader._quantise_into
    monkeypatch.setattr(loader, "_quantise_into", lambda module, *a, **k: quantised.append(module) or
                        real(module, *a, **k))
    model, runtime = load_pretrained(untied_dir, cfg, device="cpu", dtype=torch.bfloat16,
                                     data_parallel=DataParallel(PairComm(rank), 3))
    assert runtime.dp.owners == ref_runtime.dp.owners
    owned = [item for item in runtime.trainables if item.kind == "lowrank_int8" and runtime.partition.owns(item.module)]
    assert 0 < len(owned) < len([i for i in runtime.trainables if i.kind == "lowrank_int8"])
    assert sorted(map(id, quantised)) == sorted(id(item.module) for item in owned)
    assert_same_state(ref_model.state_dict(), model.state_dict())   # owned codes equal, the rest empty alike
    for item in owned:
        name = item.name[: -len(".weight")]
        assert torch.equal(item.module.weight_q, whole[f"{name}.weight_q"])
        assert item.tensor is item.module.weight_q and item.tensor.is_contiguous()
