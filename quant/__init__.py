"""quant: pure tensor kernels for lowmem (torch only; bitsandbytes is imported lazily, on CUDA).

- noise:    counter-based uniform noise, reproducible on every device and rank
- bf16:     stochastic rounding of fp32 values to bfloat16 with that noise (float weights)
- int8:     blockwise INT8 weights, nearest and stochastic rounding, chunked in-place SR update
- int4:     packed 4-bit codes with per-group scales (projectors)
- q8_0:     llama.cpp's Q8_0 blocks, from float rows or from INT8 codes (GGUF export)
- moments8: bitsandbytes' 8-bit dynamic blockwise codec (optimizer moments; second moments on the squared map),
            with a pure-torch twin
"""
from quant.bf16 import sr_to_bf16
from quant.int4 import pack_int4, unpack_int4
from quant.int8 import BLOCK_SIZE, dequantize_int8, quantize_int8, sr_update_int8_
from quant.moments8 import dequantize_moment8, dynamic_map, quantize_moment8
from quant.noise import counter_uniform

__all__ = [
    "BLOCK_SIZE",
    "counter_uniform",
    "dequantize_int8",
    "dequantize_moment8",
    "dynamic_map",
    "pack_int4",
    "quantize_int8",
    "quantize_moment8",
    "sr_to_bf16",
    "sr_update_int8_",
    "unpack_int4",
]
