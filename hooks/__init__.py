"""The fused-backward runtime: `prepare(model, config) -> Runtime` attaches lowmem's updates to the backward pass."""
from hooks.runtime import Runtime, prepare

__all__ = ["Runtime", "prepare"]
