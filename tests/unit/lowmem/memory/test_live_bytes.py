"""Tests for lowmem.memory.live_bytes: every expected byte count is computed by hand in the test from shapes and dtypes."""
import gc
import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowmem.memory.live_bytes import LiveTensorBytes, baseline_bytes, module_bytes

F32 = 4  # bytes per float32 element


def nbytes(*shape, elem=F32):
    n = 1
    for s in shape:
        n *= s
    return n * elem


def mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -- allocation, free, views, in-place ------------------------------------------------------------------------------
def test_allocate_and_free_1000x1000_fp32():
    meter = LiveTensorBytes()
    with meter:
        assert meter.live_bytes == 0
        x = torch.ones(1000, 1000)
        assert meter.live_bytes == 4_000_000
        del x
        assert meter.live_bytes == 0
    assert meter.peak_bytes == 4_000_000


def test_views_and_inplace_add_nothing():
    outside = torch.zeros(300, 200)
    meter = LiveTensorBytes()
    with meter:
        x = torch.zeros(100, 50)
        after_alloc = meter.live_bytes
        assert after_alloc == nbytes(100, 50)
        views = [x.view(-1), x.t(), x[::2], x.reshape(50, 100), x.unsqueeze(0), x.detach(), x.narrow(1, 3, 7)]
        x.add_(1.0)
        x.mul_(2.0)
        x[3:7].zero_()
        torch.add(x, 1.0, out=x)
        torch.mul(x, 3.0, out=x)
        assert meter.live_bytes == after_alloc
        # Views and in-place ops on a tensor made before entering are not counted either.
        more = [outside.view(-1), outside.t(), outside[1:]]
        outside.add_(1.0)
        torch.sub(outside, 1.0, out=outside)
        assert meter.live_bytes == after_alloc
        # The storage outlives x as long as a view holds it.
        del x
        assert meter.live_bytes == after_alloc
        del views
        assert meter.live_bytes == 0
    del more


def test_tensors_built_from_data_are_counted():
    meter = LiveTensorBytes()
    with meter:
        a = torch.tensor([[1.0, 2.0, 3.0]] * 10)
        b = torch.as_tensor([1, 2, 3, 4], dtype=torch.int64)
        assert meter.live_bytes == nbytes(10, 3) + 4 * 8
        del a, b
        assert meter.live_bytes == 0


def test_out_argument_that_grows_is_charged():
    meter = LiveTensorBytes()
    with meter:
        a, b = torch.ones(64, 32), torch.ones(64, 32)
        out = torch.empty(0)
        assert meter.live_bytes == 2 * nbytes(64, 32)
        torch.add(a, b, out=out)
        assert meter.live_bytes == 3 * nbytes(64, 32)
        del out
        assert meter.live_bytes == 2 * nbytes(64, 32)


def test_peak_of_allocate_free_sequence_is_exact():
    # (action, name, elements of fp32); the expected curve is written out by hand below.
    script = [
        ("alloc", "a", 1000),  # live 4000
        ("alloc", "b", 3000),  # live 16000
        ("free", "a", 0),  # live 12000
        ("alloc", "c", 2500),  # live 22000  <- peak
        ("free", "b", 0),  # live 10000
        ("alloc", "d", 2000),  # live 18000
        ("free", "c", 0),  # live 8000
        ("alloc", "e", 1000),  # live 12000
    ]
    expected_live = [4000, 16000, 12000, 22000, 10000, 18000, 8000, 12000]
    expected_peak = 22000
    meter = LiveTensorBytes()
    held = {}
    with meter:
        for (action, name, elems), want in zip(script, expected_live):
            if action == "alloc":
                held[name] = torch.empty(elems)
            else:
                del held[name]
            assert meter.live_bytes == want, (action, name)
    assert meter.peak_bytes == expected_peak
    held.clear()
    assert meter.live_bytes == 0
    # reset_peak: the peak restarts from what is live now.
    with meter:
        keep = torch.empty(100)
        tmp = torch.empty(500)
        del tmp
        assert meter.peak_bytes == nbytes(600)
        meter.reset_peak()
        assert meter.peak_bytes == nbytes(100)
    del keep


def test_freed_after_exit_is_refunded_and_reentry_resets_peak():
    meter = LiveTensorBytes()
    with meter:
        x = torch.empty(256)
    assert meter.live_bytes == nbytes(256)
    del x
    assert meter.live_bytes == 0
    with meter:
        assert meter.peak_bytes == 0


def test_matmul_chain_peak_is_sum_of_live_intermediates():
    torch.manual_seed(0)
    t = 64
    x = torch.randn(t, 128)
    w1, w2, w3 = torch.randn(128, 512), torch.randn(512, 256), torch.randn(256, 32)
    meter = LiveTensorBytes()
    with meter:
        y = ((x @ w1) @ w2) @ w3
    # Each product's output is alive together with its input, then the input intermediate dies:
    # h1 alone, h1 + h2 while computing h2, h2 + y while computing y; y stays.
    h1, h2, out = nbytes(t, 512), nbytes(t, 256), nbytes(t, 32)
    expected_peak = max(h1, h1 + h2, h2 + out)
    assert meter.peak_bytes == expected_peak
    assert meter.live_bytes == out
    assert torch.allclose(y, x @ w1 @ w2 @ w3)


# -- autograd ------------------------------------------------------------------------------------------------------
def test_mlp_forward_backward_sees_activations_and_backward_allocations():
    batch, widths = 32, [64, 128, 128, 10]
    model = mlp(widths)
    x = torch.randn(batch, 64)
    meter = LiveTensorBytes(track_tags=True)
    with meter:
        with meter.tag("forward"):
            loss = model(x).square().mean()
        after_forward = meter.live_bytes
        with meter.tag("backward"):
            loss.backward()
    # Saved for backward by hand: two ReLU outputs (batch, 128) and the output (batch, 10) that square() saves.
    activations = 2 * nbytes(batch, 128) + nbytes(batch, 10)
    assert after_forward >= activations
    assert meter.peak_bytes >= activations
    snap = meter.snapshot()
    grads_bytes = sum(nbytes(*p.shape) for p in model.parameters())
    # Backward ran its ops through dispatch: the gradients (at least) were allocated there.
    assert snap["tags"]["backward"]["peak_bytes"] >= grads_bytes
    assert snap["tags"]["backward"]["live_bytes"] == grads_bytes
    del loss
    gc.collect()
    # Graph freed: only the gradients are left, and they are exactly the parameter-sized tensors.
    assert meter.live_bytes == grads_bytes
    assert meter.snapshot()["tags"]["forward"]["live_bytes"] == 0
    for p in model.parameters():
        p.grad = None
    assert meter.live_bytes == 0
    print(f"\nMLP: activations by hand {activations} B, measured after forward {after_forward} B, "
          f"peak {meter.peak_bytes} B, grads {grads_bytes} B")


def _forward_peak_and_backward_alloc(use_checkpoint):
    batch, width, n_layers = 64, 256, 8
    torch.manual_seed(1)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(n_layers))
    x = torch.randn(batch, width, requires_grad=True)
    meter = LiveTensorBytes(track_tags=True)
    with meter:
        with meter.tag("forward"):
            h = x
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
            loss = h.square().mean()
        forward_peak = meter.peak_bytes
        with meter.tag("backward"):
            loss.backward()
    backward_allocated = meter.allocated_bytes
    return forward_peak, backward_allocated, x.grad.clone()


def test_checkpointing_reduces_measured_forward_peak():
    plain_peak, plain_alloc, plain_grad = _forward_peak_and_backward_alloc(use_checkpoint=False)
    ckpt_peak, ckpt_alloc, ckpt_grad = _forward_peak_and_backward_alloc(use_checkpoint=True)
    print(f"\n8-layer MLP forward peak: plain {plain_peak} B, checkpointed {ckpt_peak} B, "
          f"ratio {ckpt_peak / plain_peak:.3f}")
    assert ckpt_peak < plain_peak
    # The recompute in backward runs through dispatch too, so more bytes are allocated in total.
    assert ckpt_alloc > plain_alloc
    torch.testing.assert_close(ckpt_grad, plain_grad)


# -- tags ----------------------------------------------------------------------------------------------------------
def test_tags_attribute_bytes_and_track_per_tag_peak():
    meter = LiveTensorBytes(track_tags=True)
    with meter:
        with meter.tag("a"):
            a1 = torch.empty(100)
            with meter.tag("b"):
                b1 = torch.empty(300)
            a2 = torch.empty(50)
        untagged = torch.empty(7)
        del a2
        del b1
    tags = meter.snapshot()["tags"]
    assert tags["a"] == {"live_bytes": nbytes(100), "peak_bytes": nbytes(150)}
    assert tags["b"] == {"live_bytes": 0, "peak_bytes": nbytes(300)}
    assert tags["untagged"]["live_bytes"] == nbytes(7)
    assert meter.live_bytes == nbytes(107)
    assert meter.live_bytes_on("cpu") == nbytes(107)
    snap = json.loads(json.dumps(meter.snapshot()))
    assert snap["live_bytes_by_device"] == {"cpu": nbytes(107)}
    assert snap["tracked_storages"] == 2
    assert snap["allocated_bytes"] == nbytes(100 + 300 + 50 + 7)
    del a1, untagged


def test_tag_errors():
    with pytest.raises(RuntimeError, match="track_tags=True"):
        with LiveTensorBytes().tag("x"):
            pass
    with pytest.raises(ValueError, match="non-empty str"):
        with LiveTensorBytes(track_tags=True).tag(""):
            pass
    with pytest.raises(TypeError, match="track_tags"):
        LiveTensorBytes(track_tags=1)


# -- baselines -----------------------------------------------------------------------------------------------------
def test_baseline_bytes_dedupes_views_and_shared_storage():
    a = torch.empty(10, 20)
    b = torch.empty(5, dtype=torch.float64)
    c = torch.empty(3, dtype=torch.int8)
    tensors = [a, a.t(), a[2:], b, b.view(5, 1), c, a]
    assert baseline_bytes(tensors) == nbytes(10, 20) + 5 * 8 + 3 * 1
    # A view alone is charged its whole storage: that is what stays allocated.
    assert baseline_bytes([a[:1]]) == nbytes(10, 20)
    assert baseline_bytes([]) == 0
    with pytest.raises(TypeError, match="item 1"):
        baseline_bytes([a, 3.0])


def test_module_bytes_counts_params_and_buffers_once():
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied
    norm = nn.BatchNorm1d(16)  # weight, bias, running_mean, running_var (fp32), num_batches_tracked (int64)
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": norm})
    expected = nbytes(50, 16) + 4 * nbytes(16) + 8
    assert module_bytes(model) == expected
    with pytest.raises(TypeError, match="nn.Module"):
        module_bytes([emb.weight])


# -- CUDA ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_agrees_with_memory_allocated():
    device = torch.device("cuda")
    model = mlp([1024, 2048, 2048, 1024]).to(device)
    x = torch.randn(512, 1024, device=device)

    def step():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    step()  # warm-up: cuBLAS workspaces and the like are created here, before the baseline
    for p in model.parameters():
        p.grad = None
    # Start from an empty cache: a cached block larger than a request by <= 1 MiB is handed out whole and
    # memory_allocated() counts all of it. With every large tensor here a multiple of 2 MiB, fresh segments and
    # their splits match the requested sizes, so the remaining differences are kernel workspaces.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_allocated = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    meter = LiveTensorBytes()
    with meter:
        big = torch.empty(1024, 1024, device=device)  # 4 MiB
        torch.cuda.synchronize()
        big_delta = torch.cuda.memory_allocated() - base_allocated
        assert abs(meter.live_bytes_on("cuda") - big_delta) <= 0.05 * big_delta
        loss = model(x).square().mean()
        torch.cuda.synchronize()
        fwd_delta = torch.cuda.memory_allocated() - base_allocated
        assert abs(meter.live_bytes - fwd_delta) <= 0.05 * fwd_delta
        loss.backward()
        torch.cuda.synchronize()
        del loss, big
    torch.cuda.synchronize()
    live_delta = torch.cuda.memory_allocated() - base_allocated
    peak_delta = torch.cuda.max_memory_allocated() - base_allocated
    print(f"\nCUDA: counter live {meter.live_bytes} vs allocated delta {live_delta}; "
          f"counter peak {meter.peak_bytes} vs max_allocated delta {peak_delta}")
    assert abs(meter.live_bytes - live_delta) <= 0.05 * live_delta
    assert abs(meter.peak_bytes - peak_delta) <= 0.05 * peak_delta
