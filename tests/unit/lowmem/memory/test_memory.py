"""Memory planner: predicted peak (lowmem.memory.estimate, CPU, fp32) vs the peak measured with the live-tensor-bytes
counter around one full training step (step 1, so every state exists), model and optimizer state counted as baseline.
The bound is 5% (the brief's acceptance bound), printed with both numbers."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hooks.runtime import prepare
from lowmem.memory import GPUS, MemoryBreakdown, estimate, format_breakdown, measure, preflight
from lowmem.model.fused_loss import causal_lm_loss
from lowmem.model.offload import enable_offloaded_checkpointing
from lowmem.presets import PRESETS, preset

TOLERANCE = 0.05


def tiny_config():
    return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=128)


def smol_config():
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=128)


def llama3_ratio_config(tied=False):
    """Scaled down with Llama-3's vocabulary / hidden ratio (128256 / 4096 ~ 31): vocab 32000, hidden 256."""
    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=tied, max_position_embeddings=256)


def measured_peak(config, method, batch, seq, rank, fused_loss=False, changes=None, checkpointing="off",
                  after_first_step=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.train()
    if checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing == "offload":
        enable_offloaded_checkpointing(model)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    if method == "adamw_fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        states = lambda: (v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))  # noqa: E731
    else:
        # refresh_interval_steps large: step 1 is a steady-state step (no refresh), as most steps are
        runtime = prepare(model, preset(method, rank=rank, refresh_interval_steps=1000,
                                        max_refresh_interval_steps=1000, **(changes or {})))

        def step():
            with runtime.micro_batch():
                runtime.backward(causal_lm_loss(model, ids, ids) if fused_loss else
                                 model(input_ids=ids, labels=ids).loss)
            runtime.step()
        states = lambda: (v for s in runtime.states.values() for v in s.values())  # noqa: E731
    step()   # step 0 creates projectors and moments
    if after_first_step is not None:
        after_first_step(runtime)
    tensors = lambda: (t for group in ([*model.parameters(), *model.buffers()], states()) for t in group)  # noqa
    return measure(step, device=torch.device("cpu"), baseline_tensors=tensors())


def check(config, method, batch, seq, rank, fused_loss=False, changes=None, checkpointing="off",
          after_first_step=None):
    cfg = None if method == "adamw_fp32" else preset(method, rank=rank, **(changes or {}))
    predicted = estimate(config, method="adamw_fp32" if cfg is None else "lowmem", lowmem_config=cfg, seq_len=seq,
                         micro_batch_size=batch, gradient_checkpointing=checkpointing != "off",
                         activation_offload=checkpointing == "offload", dtype=torch.float32,
                         device_type="cpu", fused_loss=fused_loss)
    measured = measured_peak(config, method, batch, seq, rank, fused_loss, changes, checkpointing, after_first_step)
    err = predicted.peak_bytes / measured - 1
    print(f"\n{method} b{batch} s{seq} checkpointing {checkpointing}: predicted {predicted.peak_bytes / 2**20:.2f} MiB, measured "
          f"{measured / 2**20:.2f} MiB, error {err:+.2%}\n{format_breakdown(predicted)}")
    assert abs(err) <= TOLERANCE


@pytest.mark.parametrize("method", sorted(PRESETS) + ["adamw_fp32"])
def test_tiny_llama_prediction_within_5_percent(method):
    check(tiny_config(), method, batch=2, seq=64, rank=32)   # rank below every dim, as in real use


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["lowmem", "q_galore"])
@pytest.mark.parametrize("int8_head", [False, True])
def test_fused_loss_prediction_within_5_percent_at_llama3_vocab_ratio(method, tied, int8_head):
    """The new paths: fused linear + cross-entropy over vocabulary blocks (two blocks here), the INT8 low-rank
    embedding (lowmem, untied) and head (when not excluded), float heads tied or not (q_galore keeps them float)."""
    check(llama3_ratio_config(tied), method, batch=2, seq=128, rank=32, fused_loss=True,
          changes=dict(exclude_modules=()) if int8_head else {})


def _reset_bias_masses(runtime):
    """A `reset` transfer (lowmem.optim.moments.transfer_moments_) on every low-rank state: moments zeroed and
    per-coordinate bias masses at 0, so the measured step runs the bias-mass Adam step (its per-element scales
    included). `reset` reads only the new projector's rank from the bases (the identity of that rank here)."""
    from lowmem.optim.moments import transfer_moments_
    reset = 0
    for state in runtime.states.values():
        if "proj_data" in state:
            basis = torch.eye(min(state["exp_avg_codes"].shape))   # the rank is below every dimension here
            transfer_moments_(state, basis, basis, side="right", mode="reset", bits=8, steps_done=1,
                              betas=(0.9, 0.999))
            reset += 1
    assert reset > 0 and all("bias1" in s for s in runtime.states.values() if "proj_data" in s)


@pytest.mark.parametrize("config, seq, fused_loss", [(tiny_config(), 64, False), (llama3_ratio_config(), 128, True)])
def test_prediction_within_5_percent_after_a_refresh_reset_the_moments(config, seq, fused_loss):
    """Most steps of a run come after a projector refresh: with the default `reset` transfer every low-rank weight's
    Adam step then carries bias masses (a step with per-element scales); the planner's peak still holds."""
    check(config, "lowmem", batch=2, seq=seq, rank=32, fused_loss=fused_loss, after_first_step=_reset_bias_masses)


def test_per_module_overrides_prediction_within_5_percent():
    """Per-module overrides change a module's state (here the MLP at rank 8 with fp32 moments, the head at full
    rank): the planner applies them by name, and the prediction still meets the measured peak."""
    changes = dict(exclude_modules=(), overrides={"*mlp*": {"rank": 8, "optim_bits": 32}, "lm_head": {"rank": 128}})
    check(tiny_config(), "lowmem", batch=2, seq=64, rank=32, changes=changes)
    plain = estimate(tiny_config(), method="lowmem", seq_len=64, micro_batch_size=2, gradient_checkpointing=False,
                     lowmem_config=preset("lowmem", rank=32, exclude_modules=()), device_type="cpu",
                     dtype=torch.float32)
    overridden = estimate(tiny_config(), method="lowmem", seq_len=64, micro_batch_size=2,
                          gradient_checkpointing=False, lowmem_config=preset("lowmem", rank=32, **changes),
                          device_type="cpu", dtype=torch.float32)
    # independent count of the moments that change: the head's (V, r=32) 8-bit moments become (V, h=128) ones
    # (2 bytes per element + 8 bytes of absmax per 256), and the MLP's three (., 32) 8-bit moments per layer become
    # (., 8) fp32 ones (8 bytes per element)
    def m8(numel):
        return 2 * numel + 8 * -(-numel // 256)
    V, h, i, L = 512, 128, 352, 2
    head = m8(V * h) - m8(V * 32)
    mlp = L * sum(8 * max(a, b) * 8 - m8(max(a, b) * 32) for a, b in ((i, h), (i, h), (h, i)))
    assert overridden.components["optimizer_moments"] - plain.components["optimizer_moments"] == head + mlp


def deep_config():
    """Six layers and 1024 tokens a micro-batch: the saved activations are most of the step's peak."""
    return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512)


@pytest.mark.parametrize("checkpointing", ["on", "offload"])
@pytest.mark.parametrize("fused_loss", [False, True])
@pytest.mark.parametrize("method", ["lowmem", "q_galore"])
def test_checkpointed_prediction_within_5_percent(method, fused_loss, checkpointing):
    """Gradient checkpointing, with the layer inputs on the device or offloaded (lowmem.model.offload; the host
    copies are counted apart by the meter): the peak is a layer's backward, one layer rebuilt."""
    check(deep_config(), method, batch=2, seq=512, rank=32, fused_loss=fused_loss, checkpointing=checkpointing)


@pytest.mark.parametrize("int8_head", [False, True])
def test_offload_prediction_within_5_percent_at_llama3_vocab_ratio(int8_head):
    check(llama3_ratio_config(), "lowmem", batch=2, seq=128, rank=32, fused_loss=True, checkpointing="offload",
          changes=dict(exclude_modules=()) if int8_head else {})


def test_offload_lowers_the_prediction_by_the_kept_layer_inputs():
    """Independent count: offload removes L - 1 of the L layer inputs (tokens x hidden in the compute dtype) that
    checkpointing keeps on the device (one stays: the last layer's at the loss and the head, the prefetched
    previous layer's during a layer's backward)."""
    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000)
    kw = dict(method="lowmem", seq_len=2048, micro_batch_size=1, gradient_checkpointing=True, fused_loss=True,
              lowmem_config=preset("lowmem", rank=64, exclude_modules=()), dtype=torch.bfloat16, device_type="cuda")
    kept = estimate(cfg, **kw)
    offloaded = estimate(cfg, activation_offload=True, **kw)
    assert kept.components["activations"] - offloaded.components["activations"] == 39 * 2048 * 5120 * 2
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        estimate(cfg, **{**kw, "gradient_checkpointing": False}, activation_offload=True)


def test_fused_loss_saves_the_logits_and_the_vocab_tables_save_state():
    """Levers on the planner at the Llama-3 ratio: the fused loss lowers the peak; INT8 low-rank tables lower the
    resident state (float params and moments)."""
    config = llama3_ratio_config()
    kw = dict(method="lowmem", seq_len=512, micro_batch_size=2, gradient_checkpointing=False, dtype=torch.float32,
              device_type="cpu")
    float_tables = preset("lowmem", rank=32, exclude_modules=("*lm_head", "*embed*"))
    plain = estimate(config, lowmem_config=float_tables, **kw)
    fused = estimate(config, lowmem_config=float_tables, fused_loss=True, **kw)
    tables = estimate(config, lowmem_config=preset("lowmem", rank=32, exclude_modules=()), fused_loss=True, **kw)
    assert fused.peak_bytes < plain.peak_bytes
    assert fused.components["logits_and_loss"] < plain.components["logits_and_loss"]
    resident = ("weights_int8", "weight_scales", "float_params", "optimizer_moments", "projectors")
    assert sum(tables.components[k] for k in resident) < sum(fused.components[k] for k in resident)
    assert tables.peak_bytes < fused.peak_bytes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lowmem", "q_galore", "galore", "adamw_fp32"])
def test_smollm2_shaped_prediction_within_5_percent(method):
    check(smol_config(), method, batch=1, seq=64, rank=256)


def test_components_sum_and_cpu_has_no_cuda_overheads():
    b = estimate(tiny_config(), method="lowmem", seq_len=32, micro_batch_size=1, gradient_checkpointing=False,
                 device_type="cpu")
    assert isinstance(b, MemoryBreakdown) and b.peak_bytes == sum(b.components.values())
    assert b.components["cuda_context"] == 0 and b.components["allocator_slack"] == 0
    g = estimate(tiny_config(), method="lowmem", seq_len=32, micro_batch_size=1, gradient_checkpointing=False)
    assert g.components["cuda_context"] > 0


def test_int8_weight_bytes_match_a_direct_count():
    cfg = tiny_config()
    b = estimate(cfg, method="lowmem", seq_len=8, micro_batch_size=1, gradient_checkpointing=False)
    h, i, kv = 128, 352, 2 * 32
    vocab = 512
    per_layer = 2 * h * h + 2 * kv * h + 3 * i * h   # reference twin: seven linears per layer
    # + the untied embedding, a (vocab, h) INT8 table by default (the head stays float unless not excluded)
    assert b.components["weights_int8"] == 2 * per_layer + vocab * h
    scales = 2 * 4 * (h + kv + kv + h + i + i + h) * 1   # one fp32 scale per 256 inputs: every in-dim <= 352
    scales += 2 * 4 * h * (2 - 1)                          # down_proj has in = 352 -> 2 blocks per row
    scales += 4 * vocab                                    # the table: h = 128 -> one block per row
    assert b.components["weight_scales"] == scales
    floats = estimate(cfg, method="lowmem", seq_len=8, micro_batch_size=1, gradient_checkpointing=False,
                      lowmem_config=preset("lowmem", exclude_modules=("*lm_head", "*embed*")))
    assert floats.components["weights_int8"] == 2 * per_layer


def test_checkpointing_lowers_activations_and_baselines_order():
    cfg = smol_config()
    kw = dict(seq_len=2048, micro_batch_size=1)
    plain = estimate(cfg, method="lowmem", gradient_checkpointing=False, **kw)
    ckpt = estimate(cfg, method="lowmem", gradient_checkpointing=True, **kw)
    assert ckpt.peak_bytes < plain.peak_bytes
    peaks = {m: estimate(cfg, method=m, gradient_checkpointing=True, **kw).peak_bytes
             for m in ("adamw_fp32", "adamw_bf16", "adamw_8bit", "galore", "lowmem")}
    assert peaks["adamw_fp32"] > peaks["adamw_bf16"] > peaks["adamw_8bit"] > peaks["lowmem"]
    assert peaks["galore"] > peaks["lowmem"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="method"):
        estimate(tiny_config(), method="sgd", seq_len=8, micro_batch_size=1, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="seq_len"):
        estimate(tiny_config(), method="lowmem", seq_len=0, micro_batch_size=1, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="LLaMA-like"):
        estimate({"hidden_size": 8}, method="lowmem", seq_len=8, micro_batch_size=1, gradient_checkpointing=False)


def test_preflight_names_the_first_fix_that_fits(monkeypatch):
    import lowmem.memory.fit as mem
    from launch.config import TrainConfig
    cfg = TrainConfig(seq_len=2048, micro_batch_size=1)
    model_cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            vocab_size=32000)
    full = estimate(model_cfg, method="lowmem", lowmem_config=cfg.lowmem_config(), seq_len=2048,
                    micro_batch_size=1, gradient_checkpointing=False, dtype=torch.float32, device_type="cpu",
                    fused_loss=cfg.fused_loss)
    ckpt = estimate(model_cfg, method="lowmem", lowmem_config=cfg.lowmem_config(), seq_len=2048,
                    micro_batch_size=1, gradient_checkpointing=True, dtype=torch.float32, device_type="cpu",
                    fused_loss=cfg.fused_loss)
    device_bytes = int((full.peak_bytes + ckpt.peak_bytes) / 2 / 0.95)
    monkeypatch.setattr(mem, "_device_bytes", lambda device: device_bytes)
    verdict = preflight(cfg, model_cfg, torch.device("cpu"))
    assert verdict.fits is False and verdict.cheapest_fix.startswith("gradient_checkpointing=true")
    assert verdict.predicted_peak_bytes == full.peak_bytes
    monkeypatch.setattr(mem, "_device_bytes", lambda device: 2 * full.peak_bytes)
    assert preflight(cfg, model_cfg, torch.device("cpu")).fits is True
    assert GPUS["4060ti-16gb"] == 16 * 2**30


# ---- per-rank view (ZeRO stages on several ranks) ----------------------------------------------------------------

PARTITIONED = ("optimizer_moments", "residuals", "error_feedback")
REPLICATED = ("weights_int8", "weight_scales", "float_params", "projectors", "activations", "logits_and_loss",
              "layer_transients", "grad_buffers", "cuda_context")


def dist_cfg():
    # every partitioned component non-zero: low-rank + 8-bit moments, q/k residuals, bf16 error feedback
    return preset("lowmem", rank=32, error_feedback="bf16")


def per_rank(stage, world, **kw):
    return estimate(tiny_config(), method="lowmem", lowmem_config=dist_cfg(), seq_len=32, micro_batch_size=2,
                    gradient_checkpointing=False, zero_stage=stage, world_size=world, **kw)


def tiny_linears():
    """(out, in) of the tiny config's seven linears per layer: h 128, i 352, 4 heads of 32, 2 kv heads."""
    h, i, kv = 128, 352, 64
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}


def test_world_one_is_the_single_process_estimate_for_every_stage():
    today = estimate(tiny_config(), method="lowmem", lowmem_config=dist_cfg(), seq_len=32, micro_batch_size=2,
                     gradient_checkpointing=False)
    for stage in range(4):
        b = per_rank(stage, 1)
        assert (b.components, b.peak_bytes, b.notes) == (today.components, today.peak_bytes, today.notes)
    stage0 = per_rank(0, 4)   # stage 0 replicates everything
    assert (stage0.components, stage0.peak_bytes) == (today.components, today.peak_bytes)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world", [2, 3])
def test_per_rank_components_partition_or_replicate(stage, world):
    single, b = per_rank(0, 1).components, per_rank(stage, world)
    c = b.components
    for key in PARTITIONED:
        assert single[key] > 0 and c[key] == -(-single[key] // world), key
    for key in REPLICATED:
        if stage == 3 and key in ("weights_int8", "weight_scales"):
            assert c[key] == -(-single[key] // world)          # stage 3: the INT8 weights halve at world 2
        else:
            assert c[key] == single[key], key
    # reference twin of the buffers: the largest projected gradient R (fp32) reduced + the update direction of the
    # same size (float gradients are reduced in place: no buffer)
    r = 32
    r_numel = max(m * r if (m >= n or name in ("q", "k")) else r * n for name, (m, n) in tiny_linears().items())
    assert c["comm_buffers"] == 2 * 4 * r_numel
    largest = max(m * n + 4 * m * -(-n // 256) for m, n in tiny_linears().values())
    assert c["gathered_weights"] == (2 * largest if stage == 3 else 0)
    assert b.peak_bytes == sum(c.values())
    assert any(f"ZeRO stage {stage} on {world} ranks" in note for note in b.notes)


def test_stage_one_partition_total_matches_a_count_from_the_shapes():
    """Twin of the optimizer state from DESIGN §3.4-3.6: 8-bit moments (1 byte per element + an fp32 absmax per
    256-block, for each of the two moments), q/k residuals of 1% (int32 index + fp32 dM and dV), bf16 error
    feedback, low-rank 8-bit moments for the untied embedding, 8-bit AdamW for lm_head, fp32 AdamW (8 bytes) for the
    norms."""
    r, layers, h, vocab = 32, 2, 128, 512

    def moments8(numel):
        return 2 * numel + 2 * 4 * -(-numel // 256)

    moments = residuals = feedback = 0
    for name, (m, n) in tiny_linears().items():
        right = m >= n or name in ("q", "k")     # cross-head projection for q/k is a right projection
        moments += layers * moments8(m * r if right else r * n)
        residuals += layers * (math.ceil(0.01 * m * n) * (4 + 4 + 4) if name in ("q", "k") else 0)
        feedback += layers * 2 * m * n
    # the untied embedding is a low-rank table (vocab >= h: right projection) with error feedback; the head keeps
    # 8-bit AdamW
    moments += moments8(vocab * r) + moments8(vocab * h) + (2 * layers + 1) * 8 * h
    feedback += 2 * vocab * h
    single = per_rank(0, 1).components
    assert (single["optimizer_moments"], single["residuals"], single["error_feedback"]) == (moments, residuals,
                                                                                           feedback)
    for world in (2, 4):
        c = per_rank(1, world).components
        assert (c["optimizer_moments"], c["residuals"], c["error_feedback"]) == (
            -(-moments // world), -(-residuals // world), -(-feedback // world))


def test_stage_three_partitions_float_linear_weights_when_int8_is_off():
    cfg = preset("galore", rank=32)                      # float linears (int8_weights off), fp32 compute below
    kw = dict(method="lowmem", lowmem_config=cfg, seq_len=16, micro_batch_size=1, gradient_checkpointing=False,
              dtype=torch.float32, device_type="cpu")
    single = estimate(tiny_config(), **kw).components
    c = estimate(tiny_config(), zero_stage=3, world_size=2, **kw).components
    linear_bytes = 4 * 2 * sum(m * n for m, n in tiny_linears().values())
    assert c["weights_int8"] == 0 and c["float_params"] == single["float_params"] - linear_bytes // 2
    assert c["gathered_weights"] == 2 * 4 * max(m * n for m, n in tiny_linears().values())


def test_per_rank_view_bad_input_is_refused():
    with pytest.raises(ValueError, match="zero_stage"):
        per_rank(4, 2)
    with pytest.raises(ValueError, match="world_size"):
        per_rank(1, 0)
    with pytest.raises(ValueError, match="only for lowmem's runtime"):
        estimate(tiny_config(), method="adamw_bf16", seq_len=8, micro_batch_size=1, gradient_checkpointing=False,
                 zero_stage=2, world_size=2)


def test_preflight_reads_world_size_from_the_environment(monkeypatch):
    import lowmem.memory.fit as mem
    from launch.config import TrainConfig
    cfg = TrainConfig(seq_len=2048, micro_batch_size=1)
    model_cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            vocab_size=32000)

    def peak(stage, world, **kw):
        return estimate(model_cfg, method="lowmem", lowmem_config=cfg.lowmem_config(), seq_len=2048,
                        micro_batch_size=1, gradient_checkpointing=kw.get("ckpt", False), dtype=torch.float32,
                        device_type="cpu", zero_stage=stage, world_size=world, fused_loss=cfg.fused_loss).peak_bytes

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(mem, "_device_bytes", lambda device: 10 * peak(0, 1))
    fits = preflight(cfg, model_cfg, torch.device("cpu"), zero_stage=3)
    assert fits.fits and fits.predicted_peak_bytes == peak(3, 4) and "one of 4 ranks, ZeRO stage 3" in fits.detail
    assert preflight(cfg, model_cfg, torch.device("cpu"), zero_stage=3, world_size=2).predicted_peak_bytes \
        == peak(3, 2)
    # a device between the ZeRO-2 and the stage-0 peak: the cheapest fix is the ZeRO-2 JSON
    monkeypatch.setattr(mem, "_device_bytes", lambda device: int((peak(0, 4) + peak(2, 4)) / 2 / 0.95))
    verdict = preflight(cfg, model_cfg, torch.device("cpu"))
    assert verdict.fits is False and verdict.cheapest_fix.startswith("deepspeed=launch/configs/ds_zero2.json")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        preflight(cfg, model_cfg, torch.device("cpu"))


def test_cuda_update_chunk_follows_the_compiled_write():
    """On CUDA the update chunk is the accelerator's (16 MiB) and the compiled write keeps fewer chunk-sized fp32
    buffers than the eager one (cost_model.UPDATE_FP32_BUFFERS_COMPILED vs UPDATE_FP32_BUFFERS): with compile off
    the estimate's layer transient is larger by exactly the difference for the chunk of the worst linear."""
    from lowmem.memory import cost_model
    config = LlamaConfig(vocab_size=1000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=32)
    kwargs = dict(method="lowmem", seq_len=8, micro_batch_size=1, gradient_checkpointing=False)
    on = estimate(config, lowmem_config=preset("lowmem"), **kwargs)
    off = estimate(config, lowmem_config=preset("lowmem", compile=False), **kwargs)
    assert off.components["layer_transients"] > on.components["layer_transients"]
    chunk = max(cost_model.rows_per_chunk((m, n), "cuda") * n for m, n in ((4096, 4096), (11008, 4096), (4096, 11008)))
    assert chunk == 1 << 22
    extra = (cost_model.UPDATE_FP32_BUFFERS - cost_model.UPDATE_FP32_BUFFERS_COMPILED) * 4 * chunk
    assert off.components["layer_transients"] - on.components["layer_transients"] <= extra
    # on CPU the eager count stays (the CPU estimate is checked against the live-bytes meter, which runs eagerly)
    cpu_on = estimate(config, lowmem_config=preset("lowmem"), device_type="cpu", **kwargs)
    cpu_off = estimate(config, lowmem_config=preset("lowmem", compile=False), device_type="cpu", **kwargs)
    assert cpu_on.components["layer_transients"] == cpu_off.components["layer_transients"]


def test_model_shape_reads_other_decoders_config_names():
    """GPT-2 (n_inner None: 4 x hidden), BLOOM (no MLP size: 4 x hidden), Falcon (multi-query: one key/value head;
    the new decoder architecture: num_kv_heads) and GPT-NeoX configs summarise without a LLaMA-only key; the
    planner estimates them."""
    from transformers import BloomConfig, FalconConfig, GPT2Config, GPTNeoXConfig

    from lowmem.memory.cost_model import ModelShape, estimate

    gpt2 = ModelShape.from_config(GPT2Config(n_embd=128, n_head=4, n_layer=3))
    assert (gpt2.hidden, gpt2.inter, gpt2.layers, gpt2.heads, gpt2.kv_heads, gpt2.head_dim) == (128, 512, 3, 4, 4, 32)
    falcon = ModelShape.from_config(FalconConfig(hidden_size=128, num_attention_heads=4))
    assert (falcon.inter, falcon.kv_heads) == (512, 1)
    falcon40 = ModelShape.from_config(FalconConfig(hidden_size=128, num_attention_heads=8, num_kv_heads=2,
                                                   new_decoder_architecture=True))
    assert (falcon40.kv_heads, falcon40.head_dim) == (2, 16)
    neox = ModelShape.from_config(GPTNeoXConfig(hidden_size=128, intermediate_size=384, num_attention_heads=4))
    assert (neox.inter, neox.kv_heads) == (384, 4)
    bloom = ModelShape.from_config(BloomConfig(hidden_size=128, n_head=4, n_layer=2))
    assert (bloom.inter, bloom.heads, bloom.layers) == (512, 4, 2)
    assert estimate(GPT2Config(n_embd=128, n_head=4, n_layer=3), method="lowmem", seq_len=64, micro_batch_size=1,
                    gradient_checkpointing=False).peak_bytes > 0
