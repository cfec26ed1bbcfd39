"""Bridges from other training front ends to the lowmem runtime.

`lowmem.integrations.transformers`: `LowMemTrainer` (a `transformers.Trainer`), `lowmem_trainer(base)` for
Trainer subclasses such as TRL's `SFTTrainer`. Nothing here is imported by `import lowmem`; the names below resolve
lazily, so transformers is only loaded when one is used.
"""
__all__ = ["LowMemTrainer", "lowmem_trainer", "runtime_config"]


def __getattr__(name):
    if name in __all__:
        from lowmem.integrations import transformers as _hf
        return getattr(_hf, name)
    raise AttributeError(f"module 'lowmem.integrations' has no attribute {name!r}")
