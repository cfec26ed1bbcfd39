"""lowmem: full-parameter LLM training on one consumer GPU.

Public names: `LowMemConfig`, `preset`, `LowMemOptimizer`, `prepare` (the fused-backward runtime) and
`load_pretrained` (a model streamed from disk into INT8 on its device, with its runtime).
"""
from lowmem.config import ConfigError, LowMemConfig
from lowmem.presets import PRESETS, preset

__all__ = ["ConfigError", "LowMemConfig", "PRESETS", "preset", "LowMemOptimizer", "prepare", "load_pretrained"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily: the optimizer pulls in bitsandbytes-backed code paths that `import lowmem` should not pay for.
    if name == "LowMemOptimizer":
        from lowmem.optimizer import LowMemOptimizer
        return LowMemOptimizer
    if name == "prepare":
        # DESIGN §2's facade `from lowmem import prepare`: the runtime lives in hooks/ (which imports lowmem), so
        # this one name is resolved lazily, never at import time.
        from hooks.runtime import prepare
        return prepare
    if name == "load_pretrained":
        from hooks.load import load_pretrained   # lazily, like prepare
        return load_pretrained
    raise AttributeError(f"module 'lowmem' has no attribute {name!r}")
