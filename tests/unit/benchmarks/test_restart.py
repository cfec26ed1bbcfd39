"""Merge-and-restart adapters (benchmarks/compare/restart.py) and the adapter trainers built on them, on a tiny
LLaMA: a merge keeps the function, a restart resets the adapters and their optimizer state, ReLoQRa's init follows
the paper's definition, the re-warm-up and the restart schedule."""
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from benchmarks.compare.api import MethodSettings  # noqa: E402
from benchmarks.compare.peft_methods import PEFT_METHODS, TARGET_MODULES  # noqa: E402
from benchmarks.compare.restart import RestartingAdapter, qr_init_  # noqa: E402

VOCAB, RANK = 48, 4


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def lora_config(**kw):
    return peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGET_MODULES), **kw)


def adam(params):
    return torch.optim.AdamW(params, lr=1e-2)


def train(restarter, steps, seed=0):
    for step in range(steps):
        restarter.model(**batch(seed + step)).loss.backward()
        restarter.optimizer.step()
        restarter.optimizer.zero_grad()


def logits(model, seed=99):
    with torch.no_grad():
        return model(input_ids=batch(seed)["input_ids"]).logits


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}],
                         ids=["relora", "redora", "repissa", "reloqra-olora"])
def test_merge_keeps_the_function_and_restart_resets_adapters_and_optimizer(kw):
    r = RestartingAdapter(tiny_llama(), lora_config(**kw), interval_steps=3, rewarm_steps=1, train_other=False,
                          make_optimizer=adam)
    train(r, 3)
    assert len(r.optimizer.state) > 0
    before = logits(r.model)
    # reference twin of the LoRA merge: W + s B A per layer, computed here from the adapted layers
    twin = {}
    if not kw:
        twin = {name: (m.get_base_layer().weight + m.scaling["default"] * m.lora_B["default"].weight
                       @ m.lora_A["default"].weight).detach().clone() for name, m in lora_layers(r.model).items()}
    old_a = {name: m.lora_A["default"].weight.detach().clone() for name, m in lora_layers(r.model).items()}
    old_params = {id(p) for p in r.adapter_params}
    r.restart(step=3)
    assert torch.allclose(logits(r.model), before, atol=1e-5, rtol=0), "restart changed the model's function"
    layers = lora_layers(r.model)
    assert set(layers) == set(old_a) and len(layers) == 2 * len(TARGET_MODULES)
    for name, m in layers.items():
        if not kw:  # ReLoRA: B = 0, fresh A, merged weight in the base
            assert torch.equal(m.lora_B["default"].weight, torch.zeros_like(m.lora_B["default"].weight))
            assert not torch.equal(m.lora_A["default"].weight, old_a[name])
            torch.testing.assert_close(m.get_base_layer().weight, twin[name], atol=1e-6, rtol=0)
    assert len(r.optimizer.state) == 0 and r.restarts == 1
    assert not old_params & {id(p) for p in r.adapter_params}
    assert {id(p) for g in r.optimizer.param_groups for p in g["params"]} == {id(p) for p in r.adapter_params}
    # only adapters train in fine-tuning mode
    assert all(("lora_" in n) for n, p in r.model.named_parameters() if p.requires_grad)


def test_merged_model_equals_adapted_model():
    r = RestartingAdapter(tiny_llama(), lora_config(use_dora=True), interval_steps=5, rewarm_steps=0,
                          train_other=False, make_optimizer=adam)
    train(r, 2)
    before = logits(r.model)
    merged = r.merged()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    assert torch.allclose(logits(merged), before, atol=1e-5, rtol=0)


def test_reloqra_init_is_the_papers_qr_definition():
    r = RestartingAdapter(tiny_llama(), lora_config(), interval_steps=2, rewarm_steps=0, train_other=False,
                          make_optimizer=adam, reinit=qr_init_)
    train(r, 2)
    merged_w = {name: (m.get_base_layer().weight + m.scaling["default"] * m.lora_B["default"].weight
                       @ m.lora_A["default"].weight).detach().clone() for name, m in lora_layers(r.model).items()}
    r.restart(step=2)
    for name, m in lora_layers(r.model).items():
        w, s = merged_w[name], m.scaling["default"]
        b, a = m.lora_B["default"].weight, s * m.lora_A["default"].weight      # B (m, r), s A (r, n)
        torch.testing.assert_close(m.get_base_layer().weight, w, atol=1e-6, rtol=0)   # base stays W (eq. 5)
        # W = Q R: B holds the first r columns of Q (orthonormal), s A the first r rows of R (upper triangular in its
        # first r columns), so B (s A)[:, :r] reproduces W's first r columns and B (s A) is W projected on span(B).
        torch.testing.assert_close(b.T @ b, torch.eye(RANK), atol=1e-5, rtol=0)
        assert torch.all(torch.tril(a[:, :RANK], diagonal=-1).abs() < 1e-6)
        torch.testing.assert_close(b @ a[:, :RANK], w[:, :RANK], atol=1e-5, rtol=0)
        torch.testing.assert_close(b @ a, b @ (b.T @ w), atol=1e-5, rtol=0)
    # the adapted model computes with W + Q_r R_r (eq. 5): a plain twin model with those weights gives its logits
    twin = tiny_llama()
    plain = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
             for n, p in r.model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(plain[name])
        for name, w in merged_w.items():
            q, rr = torch.linalg.qr(w)
            twin.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(w + q[:, :RANK] @ rr[:RANK])
    assert torch.allclose(logits(twin), logits(r.model), atol=1e-5, rtol=0)


def test_qr_init_needs_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layer"):
        qr_init_(tiny_llama())


def test_schedule_rewarm_and_no_restart_after_the_last_step():
    r = RestartingAdapter(tiny_llama(), lora_config(), interval_steps=2, rewarm_steps=3, train_other=True,
                          make_optimizer=adam)
    assert [r.lr_factor(s) for s in range(3)] == [1.0, 1.0, 1.0]          # nothing to re-warm before a restart
    assert [r.after_step(s, total_steps=6) for s in range(6)] == [False, True, False, True, False, False]
    assert r.restarts == 2 and r.last_restart_step == 4
    assert [r.lr_factor(s) for s in (4, 5, 6, 7)] == [0.25, 0.5, 0.75, 1.0]
    # pre-training mode: embeddings and norms train too, adapted base weights stay frozen
    trainable = {n for n, p in r.model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("norm" in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    with pytest.raises(ValueError, match="interval_steps"):
        RestartingAdapter(tiny_llama(), lora_config(), interval_steps=0, rewarm_steps=0, train_other=False,
                          make_optimizer=adam)


def test_other_parameters_keep_their_optimizer_state_across_restarts():
    spec = next(s for s in PEFT_METHODS if s.name == "relora")
    settings = MethodSettings(steps=5, grad_accum_steps=1, rank=RANK, refresh_interval_steps=2, lr=1e-2,
                              warmup_steps=0, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    trainer = spec.build(tiny_llama(), settings)      # from scratch: embeddings train in full
    losses = [trainer.train_step([batch(s)]) for s in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.extra["restarts"] == 1
    embed = trainer.model.get_input_embeddings().weight
    assert embed.requires_grad and trainer.other_optimizer.state[embed]["step"] == 3
    assert all(v["step"] == 1 for v in trainer.optimizer.state.values())   # adapters: one step since the restart
    assert trainer.eval_model() is trainer.model and trainer.refresh_seconds() is None


def test_vera_trains_other_parameters_at_a_tenth_of_its_lr():
    spec = next(s for s in PEFT_METHODS if s.name == "vera")
    settings = MethodSettings(steps=4, grad_accum_steps=1, rank=RANK, refresh_interval_steps=2, lr=1e-2,
                              warmup_steps=0, seed=0, device=torch.device("cpu"), dtype=torch.float32,
                              extra={"train_non_adapter_params": True})
    trainer = spec.build(tiny_llama(), settings)
    trainer.train_step([batch(0)])
    adapter_lr = trainer.optimizer.param_groups[0]["lr"]
    assert adapter_lr > 0 and trainer.other_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * adapter_lr)


@pytest.mark.parametrize("name", ["lora", "dora", "pissa", "vera", "adalora", "relora", "redora", "repissa",
                                  "reloqra", "reloqra-olora"])
def test_every_cpu_method_trains_its_adapters(name):
    spec = next(s for s in PEFT_METHODS if s.name == name)
    assert spec.group == "adapter" and "peft" in spec.requires and not spec.cuda_only
    settings = MethodSettings(steps=3, grad_accum_steps=2, rank=RANK, refresh_interval_steps=2, lr=1e-2,
                              warmup_steps=1, seed=0, device=torch.device("cpu"), dtype=torch.float32,
                              extra={"train_non_adapter_params": False})
    model = tiny_llama()
    initial = logits(model)
    trainer = spec.build(model, settings)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "embed_tokens" in n}
    losses = [trainer.train_step([batch(2 * s), batch(2 * s + 1)]) for s in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.allclose(logits(trainer.eval_model()), initial, atol=1e-6)
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{name} changed the frozen embedding {n}"
    trainer.close()


def test_qlora_is_cuda_only():
    spec = next(s for s in PEFT_METHODS if s.name == "qlora")
    assert spec.cuda_only and "bitsandbytes" in spec.requires


@pytest.mark.gpu
def test_qlora_trains_on_cuda():
    spec = next(s for s in PEFT_METHODS if s.name == "qlora")
    settings = MethodSettings(steps=2, grad_accum_steps=1, rank=RANK, refresh_interval_steps=2, lr=1e-2,
                              warmup_steps=0, seed=0, device=torch.device("cuda"), dtype=torch.bfloat16)
    trainer = spec.build(tiny_llama(), settings)
    cuda_batch = {k: v.cuda() for k, v in batch(0).items()}
    losses = [trainer.train_step([cuda_batch]) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())


def test_unknown_modules_fail_clearly():
    spec = next(s for s in PEFT_METHODS if s.name == "lora")
    settings = MethodSettings(steps=1, grad_accum_steps=1, rank=2, refresh_interval_steps=1, lr=1e-3,
                              warmup_steps=0, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError):
        spec.build(nn.Sequential(nn.Linear(4, 4)), settings)
