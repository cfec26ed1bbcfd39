"""The device-wait auditor (lowmem.diagnostics): each kind of op that waits for a GPU is caught on the CPU with its
lowmem caller, static-shape twins are not, host-resident tensors (and what is computed from them alone) are
excused, and allowed waits are told apart by op and caller."""
import pytest
import torch

from lowmem.diagnostics import AllowedWait, DeviceWaitAuditor

x = torch.randn(6)
mask = x > 0
ids = torch.tensor([3, 1, 3, 0])

WAITS = {
    "nonzero": lambda: mask.nonzero(),
    "where_one_argument": lambda: torch.where(mask),
    "boolean_index": lambda: x[mask],
    "boolean_index_put": lambda: x.clone().__setitem__(mask, 0.0),
    "masked_select": lambda: x.masked_select(mask),
    "unique": lambda: torch.unique(ids, return_inverse=True),
    "unique_consecutive": lambda: torch.unique_consecutive(ids),
    "repeat_interleave": lambda: torch.repeat_interleave(x[:4], ids, dim=0),
    "bincount": lambda: torch.bincount(ids),
    "item": lambda: x[0].item(),
    "float": lambda: float(x.sum()),
    "int": lambda: int(ids[0]),
    "bool": lambda: bool(mask.any()),
    "if": lambda: 1 if mask.any() else 0,
    "tolist": lambda: x.tolist(),
    "numpy": lambda: x.numpy(),
    "equal": lambda: torch.equal(x, x),
    "svd": lambda: torch.linalg.svd(torch.randn(4, 3)),
}
NO_WAITS = {
    "where_three_arguments": lambda: torch.where(mask, x, 0.0),
    "masked_fill": lambda: x.masked_fill(mask, 0.0),
    "index_select": lambda: x.index_select(0, ids),
    "integer_index": lambda: x[ids],
    "scatter_add": lambda: torch.zeros(4).scatter_add_(0, ids, torch.ones(4)),
    "repeat_interleave_with_output_size": lambda: torch.repeat_interleave(x[:4], ids, dim=0, output_size=7),
    "nonzero_static": lambda: torch.nonzero_static(mask, size=6),
    "sort_cumsum_searchsorted": lambda: torch.searchsorted(ids.sort().values, torch.cumsum(ids, 0)),
    "qr": lambda: torch.linalg.qr(torch.randn(4, 3)),
    "assert_async": lambda: torch._assert_async(torch.tensor(True)),
}


@pytest.mark.parametrize("name", list(WAITS))
def test_each_waiting_op_is_caught_with_its_caller(name):
    with DeviceWaitAuditor() as audit:
        WAITS[name]()
    assert len(audit.hits) >= 1, name
    assert all(w.where.endswith("test_diagnostics.py:<lambda>") for w in audit.hits), audit.report()


@pytest.mark.parametrize("name", list(NO_WAITS))
def test_static_shape_ops_are_not_waits(name):
    with DeviceWaitAuditor() as audit:
        NO_WAITS[name]()
    assert audit.hits == [], audit.report()


def test_host_tensors_their_views_and_what_is_computed_from_them_are_excused():
    counter = torch.tensor([4, 5])
    device_value = torch.tensor(3)
    with DeviceWaitAuditor(host_tensors=[counter]) as audit:
        int(counter[0])                       # a view of a host tensor
        derived = counter * 2 + 1             # computed from host tensors only: host too
        derived.tolist()
        mixed = counter + device_value        # touches a device value: not host
        int(mixed[0])
    assert audit.counts() == {"_local_scalar_dense": 1}, audit.report()


def test_allowed_waits_are_listed_apart_by_op_and_caller():
    def reads_once():
        return float(x.sum())

    # outside lowmem's packages the caller is named by the file's own path
    allowed = [AllowedWait("_local_scalar_dense", f"{__file__}:reads_once")]
    with DeviceWaitAuditor(allowed=allowed) as audit:
        reads_once()
        float(x.sum())                         # another function: a hit
        x.tolist()                             # same function, another op: a hit
    assert audit.counts(allowed=True) == {"_local_scalar_dense": 1}
    assert audit.counts() == {"_local_scalar_dense": 1, "tolist": 1}
    assert "allowed waits: 1" in audit.report()


def test_lowmem_code_is_named_as_the_caller():
    from lowmem.optim.linop import _split_flat_index
    with DeviceWaitAuditor() as audit:
        _split_flat_index(torch.tensor([0, 5]), (2, 3), torch.device("cpu"))    # checks the range: two reads
    assert {w.where for w in audit.hits} == {"lowmem/optim/linop.py:_split_flat_index"}
    with DeviceWaitAuditor() as audit:
        _split_flat_index(torch.tensor([0, 5]), (2, 3), torch.device("cpu"), check=False)
    assert audit.hits == []


def test_tolist_and_numpy_are_restored_after_the_audit():
    before = (torch.Tensor.tolist, torch.Tensor.numpy)
    with pytest.raises(ZeroDivisionError):
        with DeviceWaitAuditor():
            1 / 0
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == before
