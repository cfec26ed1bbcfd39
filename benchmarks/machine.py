"""One line describing the machine a benchmark ran on (printed first by every benchmark and written into reports)."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"


def device_tag(device: str | torch.device = "cpu") -> str:
    """Short file-name-safe tag: 'cpu' or the GPU name, e.g. 'nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")
