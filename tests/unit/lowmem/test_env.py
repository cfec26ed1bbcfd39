"""`python -m lowmem.env`: data collection, formatting, missing packages, NVML failure paths, the JSON CLI."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

from lowmem import env

REPO_ROOT = Path(__file__).resolve().parents[3]
TOP_KEYS = {"python", "os", "cpu", "ram", "torch", "nvml", "gpus", "packages", "lowmem_version", "demo_model",
            "env", "missing"}


def test_collect_returns_expected_keys_and_is_json_serialisable():
    info = env.collect()
    assert set(info) == TOP_KEYS
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    assert set(info["packages"]) == {label for label, _, _ in env.PACKAGES}
    assert info["cpu"]["logical_cores"] >= 1
    assert isinstance(info["python"]["version"], str)
    assert json.loads(json.dumps(info)) == info


def test_format_report_mentions_torch_version_and_cuda_state():
    info = env.collect()
    text = env.format_report(info)
    assert torch.__version__ in text
    cuda_line = next(line for line in text.splitlines() if line.startswith("CUDA:"))
    if torch.cuda.is_available():
        assert f"available, {torch.cuda.device_count()} device(s)" in cuda_line
    else:  # this CPU machine: the report must say so plainly
        assert "not available" in cuda_line
        assert all(g["source"] == "nvml" for g in info["gpus"])


def test_missing_package_listed_with_pip_command(monkeypatch):
    real_version = importlib.metadata.version

    def fake_version(name):
        if name == "safetensors":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    info = env.collect()
    assert info["packages"]["safetensors"] is None
    assert {"name": "safetensors", "pip": "pip install safetensors"} in info["missing"]
    text = env.format_report(info)
    missing_block = text.split("Missing:", 1)[1]
    assert "safetensors" in missing_block and "pip install safetensors" in missing_block


def test_missing_demo_model_listed(monkeypatch):
    real_find_spec = env.importlib.util.find_spec
    monkeypatch.setattr(env.importlib.util, "find_spec",
                        lambda name, *a: None if name == env.DEMO_MODULE else real_find_spec(name, *a))
    info = env.collect()
    assert info["demo_model"]["installed"] is False
    assert {"name": env.DEMO_PACKAGE, "pip": env.DEMO_PIP} in info["missing"]
    assert env.DEMO_PIP in env.format_report(info).split("Missing:", 1)[1]


def test_demo_model_gguf_found_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "model.Q4.gguf").write_bytes(b"GGUF" + bytes(100))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(env, "DEMO_MODULE", "fake_demo")
    demo = env._demo_model()
    assert demo["installed"] is True
    assert demo["gguf_path"] == str(pkg / "model.Q4.gguf")
    assert demo["size_bytes"] == 104
    assert "fake_demo" not in sys.modules


def _fake_nvml(init_error: Exception | None = None) -> types.ModuleType:
    """A pynvml stand-in: either nvmlInit raises `init_error`, or one 24 GiB GPU is present."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
        pass

    mod.NVMLError, mod.NVMLError_LibraryNotFound = NVMLError, NVMLError_LibraryNotFound
    mod.shutdown_calls = 0

    def nvml_init():
        if init_error is not None:
            raise init_error

    def shutdown():
        mod.shutdown_calls += 1

    mod.nvmlInit = nvml_init
    mod.nvmlShutdown = shutdown
    mod.nvmlSystemGetDriverVersion = lambda: b"550.54"
    mod.nvmlDeviceGetCount = lambda: 1
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetName = lambda h: "NVIDIA Fake 4090"
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=24 * 2**30, free=20 * 2**30, used=4 * 2**30)
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 9)
    mod.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(domain=0, bus=1, device=0)
    return mod


def test_nvml_library_not_found_is_reported_plainly(monkeypatch):
    import pynvml  # the real module: its error class is generated at runtime from the error code

    def raise_not_found():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", raise_not_found)
    info = env.collect()
    assert info["nvml"]["status"] == env.NVML_NO_DRIVER
    assert info["gpus"] == [] or info["torch"]["cuda_available"]
    assert "NVML:         not available (no NVIDIA driver)" in env.format_report(info).splitlines()


def test_nvml_other_error_and_absent_module(monkeypatch):
    fake = _fake_nvml(init_error=RuntimeError("driver/library version mismatch"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    status = env._nvml_info()["status"]
    assert status.startswith("error") and "version mismatch" in status

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert env._nvml_info()["status"] == "pynvml not installed"


def test_nvml_gpu_reported_when_torch_cannot_see_it(monkeypatch):
    fake = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(env, "_torch_info", lambda: ({"installed": True, "version": "x", "build": "CPU build",
                                                      "cuda_version": None, "cuda_available": False,
                                                      "device_count": 0, "threads": 1}, []))
    info = env.collect()
    assert fake.shutdown_calls == 1
    assert info["nvml"] == {"status": "ok", "driver_version": "550.54"}
    (gpu,) = info["gpus"]
    assert gpu["name"] == "NVIDIA Fake 4090" and gpu["free_bytes"] == 20 * 2**30 and gpu["source"] == "nvml"
    text = env.format_report(info)
    assert "GPU 0:" in text and "20.0 GiB free" in text and "compute capability 8.9" in text
    assert "driver 550.54" in text


def test_merge_matches_by_pci_not_index():
    torch_gpus = [{"index": 0, "name": "B", "total_bytes": 2, "free_bytes": None, "compute_capability": "9.0",
                   "pci": [0, 2, 0]}]
    nvml = [{"index": 0, "name": "A", "total_bytes": 1, "free_bytes": 10, "pci": [0, 1, 0]},
            {"index": 1, "name": "B", "total_bytes": 2, "free_bytes": 20, "pci": [0, 2, 0]}]
    (gpu,) = env._merge_gpus(torch_gpus, nvml)
    assert gpu["free_bytes"] == 20 and gpu["source"] == "torch+nvml"


def test_cli_json_subprocess():
    proc = subprocess.run([sys.executable, "-m", "lowmem.env", "--json"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)   # a hang guard: the report takes seconds
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == TOP_KEYS
    assert data["torch"]["version"] == torch.__version__


def test_main_text_returns_zero(capsys):
    assert env.main([]) == 0
    assert "lowmem environment report" in capsys.readouterr().out
