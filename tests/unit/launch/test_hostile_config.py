"""Hostile configs through the user's own entry points (`python -m launch.finetune FILE.yaml`, `load_train_config`):
YAML alias bombs are refused before they expand, every echoed value is bounded, merge keys work, absurd integers
are refused with the allowed range. No test here needs the model or the data: each run stops at the config."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError
from launch.config_loader import MAX_YAML_NODES, load_train_config
from lowmem.config import LowMemConfig

REPO = Path(__file__).resolve().parents[3]


def bomb(levels: int, key: str = "model") -> str:
    """The "billion laughs": level 0 is 9 strings, level k a list of 9 aliases of level k-1 (9**(levels+1) leaves),
    written inside one key's value so a loader that expands it would hand it to that key's check."""
    node = "&a0 [" + ",".join(["lol"] * 9) + "]"
    for k in range(1, levels + 1):
        node = f"&a{k} [" + ",".join([node] + [f"*a{k - 1}"] * 8) + "]"
    return f"{key}: {node}\n"


def test_nine_level_alias_bomb_is_refused_quickly_under_a_memory_cap(tmp_path):
    """9 levels expand to 9**10 = 3.5e9 strings (tens of GB as Python objects). Under a 1.5 GiB address-space cap
    the CLI must stop with exit 2 and a one-paragraph message: the size is counted on the composed node graph, where
    an alias is one shared node, before anything is built."""
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9))
    cap = int(1.5 * 2**30)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
            "from launch.finetune import main; sys.exit(main([sys.argv[1]]))" % (cap, cap))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The timeout only guards against a hang: the refusal takes well under a second after the imports.
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert f"expands to more than {MAX_YAML_NODES:,} values through its aliases" in proc.stderr
    assert str(path) in proc.stderr and len(proc.stderr) < 1000


def test_a_bomb_small_enough_to_load_is_echoed_briefly(tmp_path):
    """4 levels (59,049 strings) are under the node limit, so the value reaches the key's check, whose error message
    shows a bounded excerpt with the size instead of the whole expansion (6 levels used to print 4.3 MB)."""
    with pytest.raises(ConfigError) as err:
        load_train_config(_write(tmp_path, bomb(4)))
    text = str(err.value)
    assert "model must be a non-empty string" in text and "(9 items)" in text and len(text) < 400
    with pytest.raises(ConfigError) as err:                 # the same through an override
        load_train_config(None, [bomb(4).replace(": ", "=", 1).strip()])
    assert "model must be a non-empty string" in str(err.value) and len(str(err.value)) < 600
    with pytest.raises(ConfigError, match="expands to more than"):
        load_train_config(None, [bomb(6).replace(": ", "=", 1).strip()])


def test_long_values_and_keys_are_cut_with_their_size(tmp_path):
    long_text = "x" * 1_000_000
    with pytest.raises(ConfigError) as err:
        load_train_config(None, [f"device={long_text}"])
    assert "(1000000 chars)" in str(err.value) and len(str(err.value)) < 600
    with pytest.raises(ConfigError) as err:
        load_train_config(_write(tmp_path, f"{long_text[:1000]}: 1\n"))   # YAML's longest plain key
    assert "unknown key" in str(err.value) and "(1000 chars)" in str(err.value) and len(str(err.value)) < 2000


def test_recursive_and_deeply_nested_yaml_and_huge_ints_are_refused_with_a_message(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: line 1: an alias refers to the node that contains it"):
        load_train_config(_write(tmp_path, "model: &a [1, *a]\n"))
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_train_config(_write(tmp_path, "model: " + "[" * 20_000 + "]" * 20_000 + "\n"))
    with pytest.raises(ConfigError, match="an integer has more than 4300 digits"):
        load_train_config(_write(tmp_path, "seed: " + "9" * 5000 + "\n"))
    with pytest.raises(ConfigError, match=re.escape("seed must be an int in [0, 9223372036854775807], got <an int")):
        load_train_config(_write(tmp_path, "seed: " + "9" * 4000 + "\n"))


def test_merge_keys_work_and_the_documents_own_keys_win(tmp_path):
    cfg = load_train_config(_write(tmp_path, (
        "data:\n  pack: false\n"
        "optim:\n  rank: 32\n  overrides:\n"
        "    '*q_proj': &attn {rank: 16, refresh_interval_steps: 100}\n"
        "    '*k_proj':\n      <<: *attn\n      rank: 8\n")))
    overrides = dict(cfg.optim["overrides"])
    assert dict(overrides["*q_proj"]) == {"rank": 16, "refresh_interval_steps": 100}
    assert dict(overrides["*k_proj"]) == {"rank": 8, "refresh_interval_steps": 100}
    assert cfg.lowmem_config().for_module("model.layers.0.self_attn.k_proj").rank == 8
    # A merge does not hide a real duplicate of an explicit key.
    with pytest.raises(ConfigError, match="duplicate key 'rank'"):
        load_train_config(_write(tmp_path, "optim:\n  overrides:\n    '*q_proj': &a {rank: 16}\n"
                                           "    '*k_proj': {<<: *a, rank: 8, rank: 4}\n"))


@pytest.mark.parametrize("key, value, allowed", [
    ("grad_accum_steps", 10**21, "an int in [1, 65536]"),
    ("micro_batch_size", 10**12, "an int in [1, 65536]"),
    ("seq_len", 2**40, "an int in [2, 1048576]"),
    ("max_steps", 10**21, "an int in [1, 1000000000]"),
    ("save_every", 10**21, "an int in [0, 1000000000]"),
    ("eval_every", 10**21, "an int in [0, 1000000000]"),
    ("log_every", 10**21, "an int in [1, 1000000000]"),
    ("keep_last", 10**21, "an int in [1, 1000000]"),
    ("data.eval_max_sequences", 10**21, "an int in [1, 1000000]"),
    ("optim.rank", 10**21, "an int in [1, 2147483647]"),
    ("optim.refresh_interval_steps", 10**21, "an int in [1, 2147483647]"),
])
def test_absurd_integers_are_refused_with_the_allowed_range(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_train_config(None, [f"{key}={value}"])
    assert f"{key} must be {allowed}, got {value}" in str(err.value)


def test_a_huge_timeout_is_refused_with_its_range():
    with pytest.raises(ConfigError, match=re.escape("dist_timeout_s must be a number in (0, 604800], got 1e+308")):
        load_train_config(None, ["dist_timeout_s=1e308"])


def test_the_python_api_bounds_its_integers_too():
    with pytest.raises(ConfigError, match=re.escape("grad_accum_steps must be an int in [1, 2147483647]")):
        LowMemConfig(grad_accum_steps=10**21)


def test_cli_refuses_the_huge_accumulation_before_loading_anything(capsys):
    from launch.finetune import main
    assert main([f"grad_accum_steps={10**21}", "model=/nonexistent/never-loaded"]) == 2
    assert "grad_accum_steps must be an int in [1, 65536]" in capsys.readouterr().err


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path
