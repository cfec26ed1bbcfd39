"""Refresh policies (DESIGN §3.3): schedules against plain-Python reference twins, stagger spread, checkpointing."""
import math
import random

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lowmem.optim.refresh import init_refresh_state, make_policy, refresh_summary


def _run(policy, state, num_steps, similarity_fn=lambda step: 0.9):
    """Drive one layer for steps 0..num_steps-1; returns the steps at which it refreshed."""
    refreshed = []
    for step in range(num_steps):
        if policy.due(state, step):
            sim = None if not refreshed else similarity_fn(step)
            policy.record(state, step, sim)
            refreshed.append(step)
    return refreshed


# ---------------------------------------------------------------- reference twins (plain Python, no tensors)

def _ref_fixed_steps(layer, num_layers, base, num_steps):
    offset = layer * base // num_layers
    first_gap = offset if offset > 0 else base
    return [0] + list(range(first_gap, num_steps, base))


def _ref_lazy(similarities, *, base, max_steps, threshold, low, window):
    """Interval after each refresh, given the similarity passed at each refresh (None for the first)."""
    cap = max(base, max_steps // base * base)
    interval, history, out = base, [], []
    for s in similarities:
        if s is not None:
            history = (history + [s])[-window:]
            if s < low:
                interval = max(base, interval // 2 // base * base)
                history = []
            elif len(history) == window and all(h >= threshold for h in history):
                interval = min(cap, 2 * interval)
                history = []
        out.append(interval)
    return out


# ---------------------------------------------------------------- state

def test_init_state_keys_dtypes_and_offsets():
    st = init_refresh_state(5, 32, base_interval_steps=200, window=4)
    assert set(st) == {"next_refresh_step", "interval_steps", "stagger_offset_steps", "refresh_count",
                       "similarity_history", "last_similarity"}
    for k in ("next_refresh_step", "interval_steps", "stagger_offset_steps", "refresh_count"):
        assert st[k].dtype == torch.int64 and st[k].dim() == 0
    assert st["similarity_history"].dtype == torch.float32 and st["similarity_history"].shape == (4,)
    assert torch.isnan(st["similarity_history"]).all() and torch.isnan(st["last_similarity"])
    assert int(st["next_refresh_step"]) == 0 and int(st["interval_steps"]) == 200
    assert int(st["stagger_offset_steps"]) == 5 * 200 // 32
    assert int(init_refresh_state(5, 32, base_interval_steps=200, stagger=False)["stagger_offset_steps"]) == 0
    with pytest.raises(ValueError, match="layer_index"):
        init_refresh_state(32, 32, base_interval_steps=200)
    with pytest.raises(ValueError, match="base_interval_steps"):
        init_refresh_state(0, 2, base_interval_steps=0)


def test_make_policy_rejects_unknown_kind_and_bad_options():
    with pytest.raises(ValueError, match="fixed.*lazy.*geometric"):
        make_policy("sometimes")
    with pytest.raises(ValueError, match="low_threshold"):
        make_policy("lazy", threshold=0.2, low_threshold=0.4)
    with pytest.raises(ValueError, match="max_interval_steps"):
        make_policy("fixed", base_interval_steps=200, max_interval_steps=100)
    with pytest.raises(ValueError, match="geometric_factor"):
        make_policy("geometric", geometric_factor=0.5)


def test_record_rejects_bad_similarity():
    policy = make_policy("lazy")
    st = init_refresh_state(0, 1, base_interval_steps=200)
    policy.record(st, 0, None)
    for bad in (float("nan"), 1.5, -0.2):
        with pytest.raises(ValueError, match="similarity"):
            policy.record(st, 200, bad)


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("layer,num_layers,base", [(0, 4, 10), (1, 4, 10), (3, 4, 10), (2, 7, 4), (0, 1, 5)])
def test_fixed_schedule_exact(layer, num_layers, base):
    policy = make_policy("fixed", base_interval_steps=base)
    st = init_refresh_state(layer, num_layers, base_interval_steps=base)
    got = _run(policy, st, 20 * base)
    assert got == _ref_fixed_steps(layer, num_layers, base, 20 * base)
    assert int(st["interval_steps"]) == base and int(st["refresh_count"]) == len(got)


def test_due_stays_true_when_a_step_is_missed():
    policy = make_policy("fixed", base_interval_steps=10)
    st = init_refresh_state(0, 1, base_interval_steps=10)
    policy.record(st, 0, None)
    assert not policy.due(st, 9) and policy.due(st, 10) and policy.due(st, 13)
    policy.record(st, 13, 0.5)                      # a late refresh: the next one is one interval after it
    assert int(st["next_refresh_step"]) == 23


@pytest.mark.parametrize("max_steps", [2500, 3200])
def test_lazy_stable_similarity_grows_to_cap_and_stays(max_steps):
    base = 200
    policy = make_policy("lazy", base_interval_steps=base, max_interval_steps=max_steps)
    st = init_refresh_state(0, 1, base_interval_steps=base)
    sims = [None] + [0.9] * 30
    intervals = []
    for i, s in enumerate(sims):
        policy.record(st, 10_000 * i, s)
        intervals.append(int(st["interval_steps"]))
    assert intervals == _ref_lazy(sims, base=base, max_steps=max_steps, threshold=0.4, low=0.2, window=3)
    cap = max_steps // base * base                  # 2400 for 2500 (kept a multiple of T0), 3200 for 3200
    # Doubling every `window` agreeing refreshes: 200 x3 refreshes... -> 400 -> 800 -> 1600 -> cap.
    assert intervals[:4] == [200, 200, 200, 400]
    assert intervals[4:7] == [400, 400, 800]
    assert max(intervals) == cap and intervals[-10:] == [cap] * 10
    assert all(b >= a for a, b in zip(intervals, intervals[1:]))


def test_lazy_low_similarity_shrinks_with_floor_and_middle_breaks_streak():
    base = 100
    policy = make_policy("lazy", base_interval_steps=base, max_interval_steps=1600)
    st = init_refresh_state(0, 1, base_interval_steps=base)
    sims = [None] + [0.95] * 12 + [0.1, 0.1, 0.1, 0.1, 0.1] + [0.9, 0.9, 0.3, 0.9, 0.9, 0.9] + [0.15]
    intervals = []
    for i, s in enumerate(sims):
        policy.record(st, 5_000 * i, s)
        intervals.append(int(st["interval_steps"]))
    assert intervals == _ref_lazy(sims, base=base, max_steps=1600, threshold=0.4, low=0.2, window=3)
    assert intervals[12] == 1600                    # grown to the cap
    assert intervals[13:18] == [800, 400, 200, 100, 100]  # halved each low value, floored at base
    assert intervals[18:21] == [100, 100, 100]      # 0.3: neither grows nor shrinks, and breaks the 0.9 streak
    assert intervals[23] == 200                     # three fresh agreeing values double again
    assert intervals[24] == 100
    assert float(st["last_similarity"]) == pytest.approx(0.15)


def test_geometric_growth_and_cap():
    base, start, factor, cap = 200, 200, 1.5, 2500
    policy = make_policy("geometric", base_interval_steps=base, max_interval_steps=cap,
                         geometric_start_step=start, geometric_factor=factor)
    st = init_refresh_state(0, 1, base_interval_steps=base)
    got = _run(policy, st, 20_000)
    ref, step, interval = [0], 0, base          # reference twin: grow after each refresh at step >= start
    while True:
        step += interval
        if step >= 20_000:
            break
        ref.append(step)
        if step >= start:
            interval = min(cap, int(round(interval * factor)))
    assert got == ref
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert gaps[:4] == [200, 300, 450, 675] and gaps[-1] == cap


def _spread(kind, num_layers, base, num_steps, seed, **kw):
    """Max number of layers refreshing in one step (after step 0), and per-layer refresh counts."""
    policy = make_policy(kind, base_interval_steps=base, **kw)
    states = [init_refresh_state(i, num_layers, base_interval_steps=base) for i in range(num_layers)]
    rng = random.Random(seed)
    # Per-layer similarity regimes: stable, unstable, or mixed, so intervals drift apart between layers.
    regimes = [rng.choice(["stable", "unstable", "mixed"]) for _ in range(num_layers)]

    def sim(layer):
        if regimes[layer] == "stable":
            return rng.uniform(0.6, 1.0)
        if regimes[layer] == "unstable":
            return rng.uniform(0.0, 0.5)
        return rng.uniform(0.0, 1.0)

    worst = 0
    for step in range(num_steps):
        count = 0
        for layer, st in enumerate(states):
            if policy.due(st, step):
                first = int(st["refresh_count"]) == 0
                policy.record(st, step, None if first else sim(layer))
                count += 1
        if step == 0:
            assert count == num_layers             # everyone refreshes at step 0
        else:
            worst = max(worst, count)
    return worst, [int(st["refresh_count"]) for st in states]


@pytest.mark.parametrize("kind", ["fixed", "lazy", "geometric"])
@pytest.mark.parametrize("num_layers,base,num_steps,max_steps", [(32, 200, 12_000, 2500), (7, 4, 3_000, 50)])
def test_stagger_spreads_refreshes(kind, num_layers, base, num_steps, max_steps):
    worst, counts = _spread(kind, num_layers, base, num_steps, seed=1234 + num_layers, max_interval_steps=max_steps,
                            geometric_start_step=base)
    assert worst <= math.ceil(num_layers / base) + 1
    assert min(counts) >= 2                         # every layer kept refreshing after step 0
    if kind == "fixed":
        assert worst == math.ceil(num_layers / base)


@pytest.mark.parametrize("kind", ["fixed", "lazy", "geometric"])
def test_state_survives_safetensors_round_trip(kind):
    policy = make_policy(kind, base_interval_steps=20, max_interval_steps=300, geometric_start_step=20)
    st = init_refresh_state(3, 8, base_interval_steps=20)
    rng = random.Random(7)
    sims = [rng.choice([0.9, 0.95, 0.1, 0.5]) for _ in range(2000)]

    def drive(state, steps, log):
        for step in steps:
            if policy.due(state, step):
                policy.record(state, step, None if int(state["refresh_count"]) == 0 else sims[step])
                log.append(step)

    before = []
    drive(st, range(0, 700), before)
    loaded = st_load(st_save(st))
    assert set(loaded) == set(st)
    for k in st:
        assert loaded[k].dtype == st[k].dtype and loaded[k].shape == st[k].shape
        assert torch.equal(torch.nan_to_num(loaded[k], nan=-7.0), torch.nan_to_num(st[k], nan=-7.0))
    after_orig, after_loaded = [], []
    drive(st, range(700, 2000), after_orig)
    drive(loaded, range(700, 2000), after_loaded)
    assert len(after_orig) > 3 and after_orig == after_loaded
    for k in st:
        assert torch.equal(torch.nan_to_num(loaded[k], nan=-7.0), torch.nan_to_num(st[k], nan=-7.0))


def test_refresh_summary_lists_layers():
    policy = make_policy("lazy", base_interval_steps=10, max_interval_steps=80)
    states = [init_refresh_state(i, 3, base_interval_steps=10) for i in range(3)]
    policy.record(states[0], 0, None)
    for i, s in enumerate([0.9, 0.9, 0.9]):
        policy.record(states[0], 10 * (i + 1), s)
    summary = refresh_summary(states)
    assert summary["interval_steps"] == [20, 10, 10]
    assert summary["refresh_count"] == [4, 0, 0]
    assert summary["total_refreshes"] == 4
    assert summary["last_similarity"] == [pytest.approx(0.9), None, None]
    assert summary["max_interval_steps"] == 20 and summary["min_interval_steps"] == 10
    assert refresh_summary([])["mean_interval_steps"] is None
