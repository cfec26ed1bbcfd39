"""Where an update lands: an INT8 weight (stochastic rounding, DESIGN §3.1) or a plain float weight.

Both take the update as a function of a row range, `delta_rows(row_start, row_end, w_rows) -> fp32 (rows, n)`, so the
caller never has to build the whole (m, n) update: the low-rank part is back-projected chunk by chunk, and weight decay
reads the current rows `w_rows` (fp32).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from quant.bf16 import sr_to_bf16
from quant.int8 import dequantize_int8, sr_update_int8_

DeltaRows = Callable[[int, int, Tensor], Tensor]

# Elements per chunk when applying an update: bounds the fp32 transient to about chunk * 4 bytes per buffer.
# CPU: 4 MiB chunks. Each chunk costs a back-projection matmul and a compiled kernel call (~0.2-0.5 ms of host time
# outside the kernel's graph in a step, benchmarks/results/step-time-cpu.md); against 1 MiB chunks they cut the SR
# writes of the step_time model from 80 calls to 36 and their time by ~9% (115 -> 105 ms per step, one thread, side
# by side in one run), the chunk's delta now read from the shared cache rather than the core's own.
# Accelerators: 16 MiB, so that a Llama-2-7B step makes ~1.6k chunk updates rather than ~25k, for a few fp32 buffers
# of 16 MiB on the compiled path (lowmem.memory.cost_model.UPDATE_FP32_BUFFERS_COMPILED).
DEFAULT_CHUNK_ELEMENTS = 1 << 20
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22
# A whole-weight update in one compiled call (lowmem.optim.fused_update) may hold as many fp32 elements as this many
# chunks: the compiled split path's chunk buffers (lowmem.memory.cost_model.UPDATE_FP32_BUFFERS_COMPILED), so the
# planner's bound holds for both.
FUSED_UPDATE_CHUNKS = 4


def chunk_elements(device_type: str) -> int:
    return DEFAULT_CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def rows_per_chunk(shape: tuple[int, int], device_type: str = "cpu") -> int:
    """Rows of an (m, n) weight updated per chunk on a device of `device_type` ("cpu", "cuda", ...)."""
    m, n = shape
    return max(1, min(m, chunk_elements(device_type) // max(n, 1)))


class WeightTarget:
    """Interface: a 2-D weight of `shape` (m, n) that can be read as fp32 and updated by row chunks."""

    shape: tuple[int, int]

    def read(self) -> Tensor:  # pragma: no cover - interface
        """fp32 (m, n) copy of the current weight (transient)."""
        raise NotImplementedError

    def apply_(self, delta_rows: DeltaRows, *, step: int,
               keep_old: Tensor | None = None) -> None:  # pragma: no cover - interface
        """Add the update chunk by chunk. keep_old: a 0-dim bool tensor on the weight's device; where True every
        byte of the weight stays as it was (a device-side skip: no host synchronisation to decide it)."""
        raise NotImplementedError


class FloatWeight(WeightTarget):
    """A float weight tensor updated by addition in fp32, written back in its own dtype.

    sr_key = (seed, stream): a bf16 tensor is written with stochastic rounding (quant.bf16.sr_to_bf16), the noise of
    element (i, j) at counter i·n + j under (seed, stream, step), so the bits do not depend on the row chunking
    and are the same on resume and on every rank. None (or an fp32/fp16 tensor): round to nearest, which drops a
    bf16 update below half an ulp (|w|·2⁻⁹) every time.
    """

    def __init__(self, tensor: Tensor, *, sr_key: tuple[int, int] | None = None):
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"FloatWeight needs a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}")
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.sr_key = sr_key if tensor.dtype == torch.bfloat16 else None

    def read(self) -> Tensor:
        return self.tensor.detach().float().clone()

    def apply_(self, delta_rows: DeltaRows, *, step: int, keep_old: Tensor | None = None) -> None:
        chunk = rows_per_chunk(self.shape, self.tensor.device.type)
        with torch.no_grad():
            for row_start in range(0, self.shape[0], chunk):
                row_end = min(row_start + chunk, self.shape[0])
                rows = self.tensor[row_start:row_end]
                updated = rows.float() + delta_rows(row_start, row_end, rows.float())
                if self.sr_key is not None:
                    seed, stream = self.sr_key
                    updated = sr_to_bf16(updated, seed=seed, stream=stream, step=step,
                                         offset=row_start * self.shape[1])
                if keep_old is not None:
                    updated = torch.where(keep_old, rows, updated.to(rows.dtype))
                rows.copy_(updated)


class Int8Weight(WeightTarget):
    """INT8 data + fp32 block scales, updated with counter-based stochastic rounding.

    stream: the parameter's index in the model, so every parameter draws its own noise; the step key makes each
    update's noise fresh while staying reproducible on resume and identical on every data-parallel rank.
    """

    def __init__(self, weight_q: Tensor, weight_scales: Tensor, *, block_size: int, seed: int, stream: int,
                 stochastic: bool = True):
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(f"Int8Weight needs 2-D int8 data, got {tuple(weight_q.shape)} {weight_q.dtype}")
        self.weight_q = weight_q
        self.weight_scales = weight_scales
        self.block_size = block_size
        self.seed = seed
        self.stream = stream
        self.stochastic = stochastic
        self.shape = tuple(weight_q.shape)

    def read(self) -> Tensor:
        return dequantize_int8(self.weight_q, self.weight_scales, block_size=self.block_size)

    def apply_(self, delta_rows: DeltaRows, *, step: int, keep_old: Tensor | None = None) -> None:
        # keep_old is decided inside each chunk's SR write (no copies of the old bytes, no second pass)
        sr_update_int8_(self.weight_q, self.weight_scales, delta_rows, seed=self.seed, stream=self.stream, step=step,
                        block_size=self.block_size,
                        rows_per_chunk=rows_per_chunk(self.shape, self.weight_q.device.type),
                        stochastic=self.stochastic,
                        check_values=False,  # callers verify gradients first (or discard them with keep_old)
                        keep=keep_old)
