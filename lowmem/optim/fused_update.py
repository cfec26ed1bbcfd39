"""One compiled call per weight update (DESIGN §3.9): the 8-bit low-rank Adam step, the back-projection, weight
decay and the INT8 stochastic-rounding write of a whole weight as one torch.compile graph.

Why: every compiled call costs host time outside its graph (dynamo's frame entry and guards, the AOT wrapper,
quant.compiled's dispatch: 0.1-0.5 ms, benchmarks/results/step-time-cpu.md), and on a GPU, where the kernels are
short, that host time is the step's time. The split path makes 1 + (row chunks) calls per weight (the Adam step,
then one SR write per chunk); this path makes one.

It computes what the split path computes, op for op, so its bits are those of the eager twin (lowmem.optim.lowrank's
adam_direction_ then _apply_update with compilation off; tests/unit/hooks/test_update_calls.py):

    N, M', V' = the 8-bit Adam step on R           (lowmem.optim.moments._lowrank_adam8_kernel)
    delta     = (N Pᵀ or P N) · fp32(-lr·scale)  [+ W · fp32(-lr·λ)]
    W'        = requantize(W + delta) with the counter noise of sr_update_int8_, kept where `keep` holds

The split path back-projects row chunk by row chunk (left[rows] @ rightᵀ), this path the whole weight in one matrix
product: the same bits as long as a row block of a product equals those rows of the whole product, which holds for
CPU BLAS at one and two threads (the test cuts the weights into four chunks) and is asserted on CUDA (cuBLAS) by the
same test's `gpu` variant, not yet run on a GPU.

Memory: the back-projection is formed for the whole weight (one fp32 (m, n) transient), so a weight takes this path
only when m·n <= fused_elements(device type): as many elements as the compiled split path's chunk buffers hold
(lowmem.memory counts 4 update chunks for it): 4 Mi elements (16 MiB) on CPU, 16 Mi (64 MiB) on accelerators, which
covers a 7B's 4096 x 4096 attention weights but not its 4096 x 11008 MLP weights (split path: 1 + 3 calls).
Also on the split path: weights with sparse residuals or error feedback (they need N itself), data-parallel updates
(N is shared between ranks), rows whose last block is short (the SR write then copies them into
two pieces), 16/32-bit moments, float weights, and compilation off (or under the live-bytes meter).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowmem.optim.moments import _lowrank_adam8_kernel, adam8_step_inputs, moment_codes, store_moment_codes_
from lowmem.optim.weights import FUSED_UPDATE_CHUNKS, Int8Weight, chunk_elements
from quant import compiled
from quant.int8 import sr_write_inputs
from quant.moments8 import codec_tables


def fused_elements(device_type: str) -> int:
    """The largest weight (m·n elements) whose update is one compiled call on a device of `device_type`."""
    return FUSED_UPDATE_CHUNKS * chunk_elements(device_type)


def applies(weight, *, optim_bits: int, plain: bool) -> bool:
    """Whether this weight's update can be one call: plain = no residual, no error feedback, not data-parallel; an
    INT8 weight with contiguous codes, rows of whole blocks, small enough; 8-bit
    moments; compiled kernels in use."""
    if not (plain and optim_bits == 8 and isinstance(weight, Int8Weight) and compiled.use_kernels()):
        return False
    q = weight.weight_q
    m, n = q.shape
    return (0 < m * n <= fused_elements(q.device.type) and n % weight.block_size == 0 and q.is_contiguous()
            and weight.weight_scales.is_contiguous())


def _update_kernel(q: Tensor, scales: Tensor, g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor,
                   v_absmax: Tensor, m_tables: tuple[Tensor, Tensor, Tensor], v_tables: tuple[Tensor, Tensor, Tensor],
                   h: Tensor, element_scales: Tensor | None, proj: Tensor, lr_terms: Tensor, qmax: Tensor,
                   keys: Tensor, keep: Tensor | None, *, moment_block: int, tail: bool, side: str, stochastic: bool,
                   decay: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole update (module docstring) on q int8 (m, n) and scales fp32 (m, nb) in place; g fp32 R (m, r) for
    side "right" (P (n, r)) or (r, n) for "left" (P (m, r)), (m, n) for "full" (proj None); lr_terms fp32 (2,)
    [-lr·scale, -lr·λ]. Returns the new moment codes and absmax (M' codes, M' absmax, V' codes, V' absmax), flat."""
    scales3 = None if element_scales is None else (element_scales[0], element_scales[1], element_scales[2])
    direction, _, *codes = _lowrank_adam8_kernel(g.reshape(-1), m_codes, m_absmax, v_codes, v_absmax, m_tables,
                                                 v_tables, h, block_size=moment_block, tail=tail, scales=scales3)
    n_lowrank = direction.view(g.shape)
    if side == "full":        # the rank covers the matrix: no projector, N is the update's direction itself
        delta = n_lowrank * lr_terms[0]
    else:
        delta = (n_lowrank @ proj.T if side == "right" else proj @ n_lowrank) * lr_terms[0]
    if decay:
        rows, cols = q.shape
        num_blocks = scales.shape[1]
        w = (q.view(rows, num_blocks, cols // num_blocks).to(torch.float32) * scales[:, :, None]).view(rows, cols)
        delta = delta + w * lr_terms[1]
    compiled.sr_write_traceable_(q, scales, delta, qmax, keys, keep, stochastic=stochastic)
    return tuple(codes)


def _update_plain(*args, **static):
    """The kernel's own ops run eagerly: the fallback of a call that could not be compiled (same ops, same bits)."""
    with torch.no_grad():
        return _update_kernel(*args, **static)


def lowrank_update_(state: dict[str, Tensor], grad_lowrank: Tensor, proj: Tensor | None, weight: Int8Weight, *,
                    side: str,
                    step: int, global_step: int, beta1: float, beta2: float, eps: float, moment_block: int,
                    low_rank_lr: float, decay: float, keep: Tensor | None) -> None:
    """One call: Adam on R (the state's 8-bit moments, bias masses advanced), and W += the update (back-projected
    through proj, or R's own shape when proj is None: full rank, side "full"), written with
    stochastic rounding (noise keyed by global_step, as Int8Weight.apply_). keep: None or a 0-dim bool tensor on the
    weight's device (where True the weight keeps its bytes; the caller restores the state)."""
    device = grad_lowrank.device
    h, element_scales = adam8_step_inputs(state, grad_lowrank, step=step, beta1=beta1, beta2=beta2, eps=eps,
                                          coord_dim=1 if side == "right" else 0)
    q, scales = weight.weight_q, weight.weight_scales
    qmax, keys = sr_write_inputs(q, seed=weight.seed, stream=weight.stream, step=global_step)
    # shared by every weight of a step with this learning rate (read only): one host-to-device copy, no new graph
    lr_terms = compiled.cached_constants((-low_rank_lr, -decay), dtype=torch.float32, device=device)
    tables = (codec_tables(True, device), codec_tables(False, device, squared=True))
    codes = compiled.call(
        "lowrank_update", _update_kernel, _update_plain, q, scales, grad_lowrank, *moment_codes(state), *tables, h,
        element_scales, proj, lr_terms, qmax, keys, None if keep is None else keep.reshape(1),
        moment_block=moment_block, tail=grad_lowrank.numel() % moment_block != 0,
        side="full" if proj is None else side,
        stochastic=weight.stochastic, decay=decay != 0.0)
    store_moment_codes_(state, grad_lowrank.shape, *codes)
