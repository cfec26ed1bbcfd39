"""lowmem.checkpoint.verify: what damage() reports for each kind of damage, and select_resume's choice."""
import json
import struct

import pytest
import torch
from torch import nn

from lowmem.checkpoint.store import CheckpointError, load_checkpoint, save_checkpoint
from lowmem.checkpoint.verify import damage, select_resume


def save(root, step):
    torch.manual_seed(step)
    model = nn.Linear(8, 4)
    state = {"state": {0: {"m": torch.randn(4, 8)}}, "lowmem": {"global_step": step, "skipped_steps": 0}}
    return save_checkpoint(root, step=step, model=model, runtime_state=state, keep_last=None)


def flip_bytes(path, offset_from_data=0):
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] + offset_from_data
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_checkpoint_has_no_damage(tmp_path):
    assert damage(save(tmp_path, 1)) is None


@pytest.mark.parametrize("kind,words", [
    ("one flipped byte", "does not match its sha256"),
    ("header length", "corrupt safetensors header (header length"),
    ("header json", "corrupt safetensors header (not JSON"),
    ("offset outside", "points outside the file"),
    ("missing", "is missing"),
    ("truncated", "truncated"),
    ("meta not json", "cannot be read as JSON"),
])
def test_each_kind_of_damage_is_named(tmp_path, kind, words):
    ckpt = save(tmp_path, 1)
    model = ckpt / "model.safetensors"
    data = bytearray(model.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    if kind == "one flipped byte":
        flip_bytes(model)
    elif kind == "header length":
        model.write_bytes(struct.pack("<Q", len(data)) + bytes(data[8:]))
    elif kind == "header json":
        data[8] = ord("#")
        model.write_bytes(bytes(data))
    elif kind == "offset outside":   # a valid JSON header, same length, whose offsets point past the end
        header = json.loads(data[8:8 + length])
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        old = json.dumps(header[name]["data_offsets"]).replace(" ", "")
        text = data[8:8 + length].decode()
        end = str(header[name]["data_offsets"][1])
        patched = text.replace(old, old.replace(end, "9" * len(end)), 1)
        assert len(patched) == length and patched != text
        model.write_bytes(bytes(data[:8]) + patched.encode() + bytes(data[8 + length:]))
    elif kind == "missing":
        (ckpt / "optim.safetensors").unlink()
    elif kind == "truncated":
        model.write_bytes(bytes(data[:-10]))
    elif kind == "meta not json":
        (ckpt / "meta.json").write_text("{")
    why = damage(ckpt)
    assert why is not None and words in why, why
    with pytest.raises(CheckpointError, match="damaged|not a complete"):
        load_checkpoint(ckpt)


def test_hashes_false_checks_sizes_and_headers_only(tmp_path):
    ckpt = save(tmp_path, 1)
    flip_bytes(ckpt / "optim.safetensors", 3)
    assert damage(ckpt, hashes=False) is None
    assert "sha256" in damage(ckpt)
    load_checkpoint(ckpt, verify=False)   # the caller's choice: loads the changed bytes


def test_select_resume_auto_walks_back_to_the_newest_intact(tmp_path):
    first, second, third = save(tmp_path, 1), save(tmp_path, 2), save(tmp_path, 10)
    flip_bytes(third / "model.safetensors")
    (second / "optim.safetensors").unlink()
    skipped = []
    assert select_resume(tmp_path, "auto", on_skip=lambda p, why: skipped.append((p, why))) == first
    assert [p for p, _ in skipped] == [third, second]
    assert "sha256" in skipped[0][1] and "missing" in skipped[1][1]
    flip_bytes(first / "model.safetensors")
    assert select_resume(tmp_path, "auto") is None
    assert select_resume(tmp_path, "none") is None and select_resume(tmp_path / "absent", "auto") is None


def test_select_resume_path_refuses_damage_and_accepts_a_name_under_root(tmp_path):
    save(tmp_path, 1)
    bad = save(tmp_path, 2)
    flip_bytes(bad / "model.safetensors")
    assert select_resume(tmp_path, "step-00000001") == tmp_path / "step-00000001"
    with pytest.raises(CheckpointError, match=r"step-00000002 is damaged: .*sha256"):
        select_resume(tmp_path, str(bad))
    with pytest.raises(CheckpointError, match="does not exist"):
        select_resume(tmp_path, "step-00000003")
