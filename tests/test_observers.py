"""Tests for tfq.observers: hand-computed ranges, streaming, robustness, serialization."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

from tfq import observers, ops
from tfq.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    SoftmaxInputObserver,
    create_observer,
)

# Every observer configuration worth exercising generically.
ALL_CONFIGS = [
    ("minmax", {}),
    ("minmax", {"symmetric": True}),
    ("minmax", {"per_channel": True}),
    ("minmax", {"per_channel": True, "axis": 0, "symmetric": True}),
    ("moving_average", {"decay": 0.8}),
    ("moving_average", {"per_channel": True}),
    ("percentile", {}),
    ("percentile", {"symmetric": True, "percentile": 99.0}),
    ("kl", {}),
    ("kl", {"symmetric": True}),
    ("mse", {}),
    ("mse", {"symmetric": True, "bits": 4}),
]
CONFIG_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for m, p in ALL_CONFIGS]
HIST_METHODS = ["percentile", "kl", "mse"]


def _gaussian(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _batches(seed: int = 0, n: int = 5, shape=(64, 8)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (1 + i) + 0.3 * i).astype(np.float32) for i in range(n)]


def _json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))


def _assert_ranges_equal(a, b):
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_docstring_examples():
    assert doctest.testmod(observers, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# ----------------------------------------------------------------------------------- MinMax
@pytest.mark.parametrize(
    "data, symmetric, expected",
    [
        ([[1.0, -2.0], [3.0, 0.5]], False, (-2.0, 3.0)),
        ([[1.0, -2.0], [3.0, 0.5]], True, (-3.0, 3.0)),
        ([0.5, 2.0], False, (0.0, 2.0)),  # extended to contain 0.0
        ([-3.0, -1.0], False, (-3.0, 0.0)),
        ([-3.0, -1.0], True, (-3.0, 3.0)),
    ],
)
def test_minmax_hand_computed(data, symmetric, expected):
    obs = MinMaxObserver(symmetric=symmetric)
    obs.update(np.asarray(data, dtype=np.float32))
    got = obs.compute_range()
    assert got == expected
    assert all(type(v) is float for v in got)


def test_minmax_per_channel_hand_computed():
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]], dtype=np.float32)
    last = MinMaxObserver(per_channel=True)  # axis=-1: three channels, min/max down the columns
    last.update(x)
    lo, hi = last.compute_range()
    assert lo.dtype == hi.dtype == np.float32
    np.testing.assert_array_equal(lo, [-4.0, -2.0, 0.0])  # column 3 is all positive: min → 0.0
    np.testing.assert_array_equal(hi, [1.0, 5.0, 3.0])

    first = MinMaxObserver(per_channel=True, axis=0, symmetric=True)  # two channels (rows)
    first.update(x)
    lo, hi = first.compute_range()
    np.testing.assert_array_equal(hi, [3.0, 5.0])  # max(|-2|, 3), max(|-4|, 5)
    np.testing.assert_array_equal(lo, [-3.0, -5.0])


@pytest.mark.parametrize("per_channel, axis", [(False, -1), (True, -1), (True, 0), (True, 1)])
def test_minmax_multi_batch_equals_one_batch(per_channel, axis):
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((40, 6, 5)) * rng.uniform(0.1, 3.0, size=(1, 6, 5))).astype(np.float32)
    whole = MinMaxObserver(per_channel=per_channel, axis=axis)
    whole.update(data)
    split = MinMaxObserver(per_channel=per_channel, axis=axis)
    batch_axis = 1 if axis == 0 else 0  # batches split along a non-channel axis
    for chunk in np.array_split(data, 7, axis=batch_axis):
        split.update(chunk)
    _assert_ranges_equal(whole.compute_range(), split.compute_range())
    # The independent path: numpy reductions over every axis but the channel axis.
    if per_channel:
        other = tuple(a for a in range(3) if a != axis % 3)
        np.testing.assert_array_equal(whole.compute_range()[0], np.minimum(data.min(axis=other), 0))
        np.testing.assert_array_equal(whole.compute_range()[1], np.maximum(data.max(axis=other), 0))


def test_per_channel_errors():
    obs = MinMaxObserver(per_channel=True, axis=2)
    with pytest.raises(ValueError, match="axis=2 does not fit an input of shape"):
        obs.update(np.ones((3, 4), dtype=np.float32))
    obs = MinMaxObserver(per_channel=True)
    obs.update(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="number of channels changed from 4 to 5"):
        obs.update(np.ones((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="axis must be an int"):
        MinMaxObserver(axis=1.0)
    with pytest.raises(ValueError, match="symmetric must be a bool"):
        MinMaxObserver(symmetric="yes")


# --------------------------------------------------------------------------- moving average
def test_moving_average_formula_three_batches():
    obs = MovingAverageMinMaxObserver(decay=0.9)
    obs.update(np.array([-1.0, 0.0, 2.0], dtype=np.float32))  # initializes: min -1, max 2
    assert obs.compute_range() == (-1.0, 2.0)
    obs.update(np.array([-3.0, 4.0], dtype=np.float32))
    # min = 0.9·(-1) + 0.1·(-3) = -1.2,   max = 0.9·2 + 0.1·4 = 2.2
    assert obs.compute_range() == pytest.approx((-1.2, 2.2), rel=1e-12)
    obs.update(np.array([1.0, 1.5], dtype=np.float32))
    # min = 0.9·(-1.2) + 0.1·1 = -0.98,  max = 0.9·2.2 + 0.1·1.5 = 2.13
    assert obs.compute_range() == pytest.approx((-0.98, 2.13), rel=1e-12)
    obs.update(np.zeros((0,), dtype=np.float32))  # empty: not a batch
    assert obs.compute_range() == pytest.approx((-0.98, 2.13), rel=1e-12)


def test_moving_average_per_channel():
    obs = MovingAverageMinMaxObserver(decay=0.5, per_channel=True)
    obs.update(np.array([[0.0, -2.0], [4.0, 2.0]], dtype=np.float32))  # min [0, -2], max [4, 2]
    obs.update(np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32))  # min [-2, 0], max [2, 6]
    lo, hi = obs.compute_range()
    np.testing.assert_allclose(lo, [-1.0, -1.0])  # 0.5·0 + 0.5·(-2), 0.5·(-2) + 0.5·0
    np.testing.assert_allclose(hi, [3.0, 4.0])


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1, True, "0.9", None])
def test_moving_average_bad_decay(decay):
    with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\)"):
        MovingAverageMinMaxObserver(decay=decay)


# ----------------------------------------------------------------- robustness to outliers
@pytest.fixture(scope="module")
def gaussian_with_outliers() -> np.ndarray:
    """10^6 samples of N(0, 1) with one outlier at +20 and one at -20."""
    x = _gaussian(1_000_000, seed=2)
    x[:2] = [20.0, -20.0]
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_outliers_minmax_follows_them(gaussian_with_outliers, symmetric):
    obs = MinMaxObserver(symmetric=symmetric)
    obs.update(gaussian_with_outliers)
    assert obs.compute_range() == (-20.0, 20.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_outliers_percentile(gaussian_with_outliers, symmetric):
    x = gaussian_with_outliers
    obs = HistogramObserver("percentile", percentile=99.99, symmetric=symmetric)
    obs.update(x)
    lo, hi = obs.compute_range()
    if symmetric:  # P99.99 of |x|: 3.89 for N(0, 1)
        assert hi == -lo
        assert hi == pytest.approx(3.89, abs=0.1)
        assert hi == pytest.approx(np.quantile(np.abs(x), 0.9999), abs=0.02)
    else:  # P0.01 and P99.99 of x: ∓3.72
        assert (lo, hi) == pytest.approx(tuple(np.quantile(x, [0.0001, 0.9999])), abs=0.02)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_with_huge_outliers(symmetric):
    # 5 values of 1000 among 10^6: bins are ~0.49 wide, yet the percentile stays within 0.1.
    x = _gaussian(1_000_000, seed=3)
    x[:5] = 1000.0
    obs = HistogramObserver("percentile", symmetric=symmetric)
    obs.update(x)
    lo, hi = obs.compute_range()
    if symmetric:
        assert hi == pytest.approx(3.89, abs=0.1)
        assert hi == pytest.approx(np.quantile(np.abs(x), 0.9999), abs=0.1)
    else:
        assert (lo, hi) == pytest.approx(tuple(np.quantile(x, [0.0001, 0.9999])), abs=0.1)


@pytest.mark.parametrize("method", ["kl", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_outliers_kl_and_mse_clip(gaussian_with_outliers, method, symmetric):
    obs = create_observer(method, symmetric=symmetric)
    obs.update(gaussian_with_outliers)
    lo, hi = obs.compute_range()
    assert 2.5 <= hi < 10.0
    assert -10.0 < lo <= -2.5
    if symmetric:
        assert lo == -hi


def _raw_mse(x: np.ndarray, lo: float, hi: float, symmetric: bool, bits: int = 8) -> float:
    """Mean squared error of TF-exact fake-quant on the raw samples: an independent path."""
    a, b = ops.prepare_range(lo, hi, symmetric=symmetric, bits=bits)
    y = ops.fake_quant_numpy(x, a, b, bits=bits)
    return float(np.mean((y.astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_matches_brute_force_on_raw_data(bits):
    # With n outliers at X among N samples the int8 optimum is near n·X / (n + N/195075):
    # here 2·20 / (2 + 1.03) ≈ 13; the histogram must find it as well as a brute-force search.
    x = _gaussian(200_000, seed=4)
    x[:2] = [20.0, -20.0]
    obs = HistogramObserver("mse", symmetric=True, bits=bits)
    obs.update(x)
    lo, hi = obs.compute_range()
    grid = np.linspace(0.5, 20.0, 391)
    best = min(_raw_mse(x, -t, t, True, bits) for t in grid)
    assert _raw_mse(x, lo, hi, True, bits) <= best * 1.01
    assert _raw_mse(x, lo, hi, True, bits) < _raw_mse(x, -20.0, 20.0, True, bits)


def test_mse_one_sided_matches_brute_force():
    x = np.maximum(_gaussian(200_000, seed=5), 0.0) ** 1.5  # skewed, non-negative
    obs = HistogramObserver("mse")
    obs.update(x)
    lo, hi = obs.compute_range()
    assert lo == 0.0
    grid = np.linspace(0.5, float(x.max()), 301)
    best = min(_raw_mse(x, 0.0, t, False) for t in grid)
    assert _raw_mse(x, lo, hi, False) <= best * 1.01


def test_mse_keeps_no_clipping_when_outliers_dominate():
    # 5 values of 1000 among 10^6: clipping them costs 5·1000² ≈ 5e6 of squared error, more than
    # the ≈ 1e6 lost by quantizing N(0, 1) with steps of 1000/127, so MSE keeps the full range.
    x = _gaussian(1_000_000, seed=3)
    x[:5] = 1000.0
    obs = HistogramObserver("mse", symmetric=True)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert hi > 900.0
    assert _raw_mse(x, lo, hi, True) < _raw_mse(x, -4.0, 4.0, True)


@pytest.mark.parametrize("method", HIST_METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_data_keeps_nearly_full_range(method, symmetric):
    x = np.random.default_rng(6).uniform(-1.0, 1.0, 100_000).astype(np.float32)
    obs = create_observer(method, symmetric=symmetric)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert hi >= 0.99 * x.max() and lo <= 0.99 * x.min()
    assert hi <= np.abs(x).max() and lo >= -np.abs(x).max()


@pytest.mark.parametrize("method", HIST_METHODS)
def test_one_sided_data_has_min_zero(method):
    x = np.random.default_rng(7).uniform(0.0, 6.0, 50_000).astype(np.float32)
    obs = create_observer(method)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert lo == 0.0
    assert hi >= 0.99 * x.max()


@pytest.mark.parametrize("method", ["kl", "mse"])
def test_exact_zeros_do_not_change_kl_or_mse(method):
    # relu(x) and x[x > 0] span the same [0, max] histogram and differ only by exact zeros,
    # which kl and mse leave out: identical ranges, in a plausible place for a half-normal.
    x = _gaussian(400_000, seed=8)
    relu, positive = create_observer(method), create_observer(method)
    relu.update(np.maximum(x, 0.0))
    positive.update(x[x > 0])
    assert relu.compute_range() == positive.compute_range()
    assert 2.5 <= relu.compute_range()[1] <= 5.0


def _kl_reference(counts: np.ndarray, i: int, levels: int, point_mass=None) -> float:
    """Smoothed KL(P‖Q) for keeping ``i`` bins, written as a plain loop (the algorithm's textbook form).

    ``Q`` spreads each level's sum over the occupied bins of ``P`` (the outliers' bin included),
    and a ``P > 0`` bin with ``Q = 0`` gets ``Q = ε`` counts (MXNet / ONNX Runtime smoothing).
    Point masses are extra atoms: exact (the same in P and Q) inside the range, folded into the
    last bin beyond it.
    """
    c = counts.astype(np.float64)
    s = np.zeros_like(c) if point_mass is None else point_mass.astype(np.float64)
    p = c[:i].copy()
    p[i - 1] += c[i:].sum() + s[i:].sum()
    q = np.zeros(i)
    level = np.arange(i) * levels // i
    for j in range(levels):
        members = (level == j) & (p > 0)
        level_sum = c[:i][level == j].sum()
        if members.any() and level_sum > 0:
            q[members] = level_sum / members.sum()
    q[(p > 0) & (q == 0)] = observers.KL_EPSILON
    p, q = np.concatenate([p, s[:i]]), np.concatenate([q, s[:i]])
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


@pytest.mark.parametrize("seed", range(4))
def test_kl_vectorized_matches_loop(seed):
    rng = np.random.default_rng(seed)
    counts = np.bincount(np.abs(rng.standard_normal(20_000) * 40).astype(int), minlength=300)[:300]
    counts[rng.integers(0, 300, 20)] = 0  # gaps: candidates ending in an empty bin need the smoothing
    counts[-1] += 3  # outliers
    levels = 16
    chosen = observers._kl_threshold_bins(counts, levels)
    reference = [_kl_reference(counts, i, levels) for i in range(levels, 301)]
    # The vectorized form leaves ε out of Q's total: a relative difference of ε / Σc.
    assert _kl_reference(counts, chosen, levels) == pytest.approx(min(reference), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_kl_with_point_masses_matches_loop(seed):
    rng = np.random.default_rng(seed)
    counts = np.bincount(np.abs(rng.standard_normal(20_000) * 40).astype(int), minlength=300)[:300].astype(float)
    point_mass = np.zeros(300)
    point_mass[rng.integers(0, 300, 6)] = rng.uniform(200, 2000, 6)  # some inside, some beyond a threshold
    levels = 16
    chosen = observers._kl_threshold_bins(counts, levels, point_mass)
    last = int(np.flatnonzero(counts + point_mass)[-1]) + 1  # no candidate beyond the data
    reference = [_kl_reference(counts, i, levels, point_mass) for i in range(levels, last + 1)]
    assert _kl_reference(counts, chosen, levels, point_mass) == pytest.approx(
        min(reference), rel=1e-7, abs=1e-12)


def test_split_point_masses_finds_spikes_and_only_spikes():
    rng = np.random.default_rng(0)
    smooth = np.bincount((np.abs(rng.standard_normal(500_000)) * 300).astype(int), minlength=2048)[:2048]
    counts = smooth.astype(np.float64)
    spikes = [40, 41, 300, 777]  # two adjacent ones too
    counts[spikes] += 20_000
    found_smooth, found = observers._split_point_masses(counts)
    np.testing.assert_array_equal(found_smooth + found, counts)
    assert sorted(np.flatnonzero(found)) == spikes
    # each spike's excess over its neighbours' median, within sampling noise of the smooth part
    np.testing.assert_allclose(found[spikes], 20_000, rtol=0.05)
    # smooth data alone, a sparse tail, and an empty histogram: no point mass
    assert not observers._split_point_masses(smooth)[1].any()
    sparse = np.bincount(rng.integers(0, 2048, 1000), minlength=2048)
    assert not observers._split_point_masses(sparse)[1].any()
    assert not observers._split_point_masses(np.zeros(64))[1].any()


def _relu6_with_background(seed: int, spikes: bool) -> np.ndarray:
    """ReLU6 of a depthwise-like output: a smooth signal and, optionally, 16 constant background values."""
    rng = np.random.default_rng(seed)
    signal = np.minimum(np.abs(rng.standard_normal(300_000)) * 1.5, 6.0)
    if not spikes:
        return signal
    background = np.repeat(np.linspace(0.1, 1.6, 16), 20_000)  # 52 % of the values on 16 points
    return np.concatenate([signal, background])


@pytest.mark.parametrize("seed", range(3))
def test_kl_threshold_ignores_point_masses_inside_the_range(seed):
    # A channel's constant background value is represented exactly by any grid: adding such
    # spikes must not drag the KL threshold down (without point-mass handling it falls to ~1.6).
    plain, spiky = HistogramObserver("kl"), HistogramObserver("kl")
    plain.update(_relu6_with_background(seed, spikes=False))
    spiky.update(_relu6_with_background(seed, spikes=True))
    t_plain, t_spiky = plain.compute_range()[1], spiky.compute_range()[1]
    assert t_plain > 3.0
    assert t_spiky == pytest.approx(t_plain, rel=0.1)
    counts = spiky._abs_counts(spiky._nonzero_counts())
    naive = observers._kl_threshold_bins(counts, 256) * spiky._width  # spikes smeared into their levels
    assert naive < 0.6 * t_plain


@pytest.mark.parametrize("x, symmetric, expected", [
    (np.repeat(np.arange(17) / 16.0, np.arange(17, 0, -1) * 1000), False, (0.0, 1.0)),  # 16-level pixels
    (np.repeat(np.arange(17) / 16.0, np.arange(17, 0, -1) * 1000), True, (-1.0, 1.0)),
    (np.random.default_rng(0).integers(1, 6, 100_000) * 1.0, False, (0.0, 5.0)),
    (np.random.default_rng(1).integers(-8, 8, 100_000) * 0.125, False, (-1.0, 0.875)),
])
def test_kl_keeps_the_range_of_discrete_data(x, symmetric, expected):
    # Data on a few values is all point masses: each is exact on any grid, so nothing is clipped.
    obs = HistogramObserver("kl", symmetric=symmetric)
    obs.update(x)
    assert obs.compute_range() == pytest.approx(expected)
    _, point_mass = observers._split_point_masses(obs._abs_counts(obs._nonzero_counts()))
    assert np.count_nonzero(point_mass) >= 4


@pytest.mark.parametrize("method", ["kl", "mse", "percentile"])
def test_batch_median_ignores_all_zero_batches(method):
    obs = create_observer(method, batch_aggregate="median")
    obs.update(np.zeros(10))
    assert obs.compute_range() == (0.0, 0.0)
    obs.update(np.linspace(-2.0, 3.0, 5001))
    obs.update(np.zeros(10))
    single = create_observer(method)
    single.update(np.linspace(-2.0, 3.0, 5001))
    assert obs.compute_range() == single.compute_range()


@pytest.mark.parametrize("seed", range(20))
def test_negative_only_first_batch(seed):
    # floor(min / w) with w = -min / (num_bins - 1) can round one bin past the window.
    x = -np.abs(np.random.default_rng(seed).standard_normal(7))
    for method in ("kl", "mse", "percentile"):
        obs = create_observer(method, batch_aggregate="median")
        obs.update(x)
        obs.update(x * 0.5)
        lo, hi = obs.compute_range()
        assert x.min() * 1.001 <= lo < 0.0 and hi == 0.0
    obs = HistogramObserver("mse")
    obs.update(np.array([-0.07487437185929649]))
    assert obs.compute_range() == (pytest.approx(-0.07487437185929649), 0.0)


def test_state_saved_before_an_option_existed_loads():
    obs = HistogramObserver("kl")
    obs.update(np.linspace(0.0, 1.0, 1000))
    state = json.loads(json.dumps(obs.get_state()))
    del state["config"]["batch_aggregate"]  # as written before batch_aggregate existed
    assert Observer.from_state(state).compute_range() == obs.compute_range()


@pytest.mark.parametrize("method", ["mse", "kl", "percentile"])
def test_batch_median_is_the_median_of_single_batch_ranges(method):
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal(5_000) * (1 + k % 3) for k in range(7)]
    batches[2][:20] *= 100.0  # outliers in two batches of seven
    batches[5][:20] *= 100.0
    obs = create_observer(method, batch_aggregate="median")
    singles = []
    for b in batches:
        obs.update(b)
        single = create_observer(method)
        single.update(b)
        singles.append(single.compute_range())
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(np.median([r[0] for r in singles]), rel=1e-12)
    assert hi == pytest.approx(np.median([r[1] for r in singles]), rel=1e-12)
    pooled = create_observer(method)
    for b in batches:
        pooled.update(b)
    if method == "mse":  # the pooled MSE optimum keeps the outliers; the median does not
        assert pooled.compute_range()[1] > 5 * hi and hi < 8.0
    restored = Observer.from_state(json.loads(json.dumps(obs.get_state())))
    assert restored.compute_range() == (lo, hi)
    assert HistogramObserver.from_config(obs.get_config()).get_config() == obs.get_config()


def test_batch_aggregate_rejects_unknown():
    with pytest.raises(ValueError, match="batch_aggregate='mean'"):
        HistogramObserver("mse", batch_aggregate="mean")


def test_kl_is_fast_on_2048_bins():
    import time

    x = _gaussian(100_000, seed=9)
    obs = HistogramObserver("kl", symmetric=False)  # mixed sign: 2048-bin window, |x| folded
    obs.update(x)
    start = time.perf_counter()
    obs.compute_range()
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------- histogram growth
@pytest.mark.parametrize("symmetric", [True, False])
def test_histogram_growth_matches_single_batch(symmetric):
    x = _gaussian(400_000, seed=10) + 0.5
    order = np.argsort(np.abs(x))  # every batch extends the range: the worst case for growth
    streamed = HistogramObserver("percentile", percentile=99.0, symmetric=symmetric)
    for chunk in np.array_split(x[order], 20):
        streamed.update(chunk)
    whole = HistogramObserver("percentile", percentile=99.0, symmetric=symmetric)
    whole.update(x)
    assert streamed.compute_range() == pytest.approx(whole.compute_range(), rel=0.01)
    if symmetric:
        t = np.quantile(np.abs(x), 0.99)
        exact = (-t, t)
    else:
        exact = tuple(np.quantile(x, [0.01, 0.99]))
    assert streamed.compute_range() == pytest.approx(exact, rel=0.01)
    state = streamed.get_state()["stats"]
    assert sum(state["counts"]) == state["total"] == x.size  # re-binning keeps every count


def test_histogram_shift_and_far_outlier():
    obs = HistogramObserver("percentile", percentile=100.0, num_bins=64)
    obs.update(np.linspace(0.0, 1.0, 101))
    obs.update(-np.linspace(0.0, 1.0, 101))  # the window must move/grow to the negative side
    obs.update(np.array([1e30]))  # far beyond int64 bin indices at the current width
    assert obs.compute_range() == (-1.0, 1e30)
    state = obs.get_state()["stats"]
    assert len(state["counts"]) == 64 and sum(state["counts"]) == 203


# ---------------------------------------------------------------- empty / constant / invalid
@pytest.mark.parametrize("method, params", ALL_CONFIGS, ids=CONFIG_IDS)
def test_empty_input_is_a_no_op(method, params):
    obs = create_observer(method, **params)
    empty_state = obs.get_state()
    obs.update(np.zeros((0, 3), dtype=np.float32))
    assert obs.get_state() == empty_state and not obs.has_data
    with pytest.raises(ValueError, match=r"call update\(x\) with some data before compute_range"):
        obs.compute_range()
    obs.update(_batches()[0])
    state = obs.get_state()
    obs.update(np.zeros((0, 8), dtype=np.float32))
    assert obs.get_state() == state


@pytest.mark.parametrize("method, params", ALL_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("value", [3.0, -2.0, 0.0])
def test_constant_input(method, params, value):
    obs = create_observer(method, **params)
    obs.update(np.full((8, 8), value, dtype=np.float32))
    obs.update(np.full((8, 8), value, dtype=np.float32))
    lo, hi = obs.compute_range()
    # The range is the constant extended to 0.0, not widened: all-zero data gives (0.0, 0.0).
    m = abs(value)
    expected = (-m, m) if params.get("symmetric") else (min(value, 0.0), max(value, 0.0))
    np.testing.assert_array_equal(lo, np.broadcast_to(np.float32(expected[0]), np.shape(lo)))
    np.testing.assert_array_equal(hi, np.broadcast_to(np.float32(expected[1]), np.shape(hi)))


def test_all_zero_range_is_widened_by_prepare_range():
    obs = MinMaxObserver()
    obs.update(np.zeros(10))
    assert obs.compute_range() == (0.0, 0.0)
    lo, hi = ops.prepare_range(*obs.compute_range())
    assert (float(lo), float(hi)) == (0.0, np.float32(ops.MIN_RANGE))


@pytest.mark.parametrize("method", HIST_METHODS)
def test_histogram_zeros_first_then_data(method):
    obs = create_observer(method, percentile=100.0) if method == "percentile" else create_observer(method)
    obs.update(np.zeros(1000))
    assert obs.compute_range() == (0.0, 0.0)
    obs.update(np.linspace(0.0, 2.0, 1001))
    lo, hi = obs.compute_range()
    assert lo == 0.0 and hi == pytest.approx(2.0, rel=0.01)
    stats = obs.get_state()["stats"]
    assert stats["total"] == 2001 and stats["zeros"] == 1001 and sum(stats["counts"]) == 2001


@pytest.mark.parametrize("method, params", ALL_CONFIGS, ids=CONFIG_IDS)
def test_non_finite_input_raises_and_keeps_state(method, params):
    obs = create_observer(method, **params)
    obs.update(_batches()[0])
    state = obs.get_state()
    bad = _batches()[1].copy()
    bad[0, 0], bad[3, 2], bad[5, 5] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=rf"{type(obs).__name__}\.update received 3 non-finite"):
        obs.update(bad)
    assert obs.get_state() == state


def test_non_numeric_input_raises():
    with pytest.raises(TypeError, match="numeric"):
        MinMaxObserver().update(np.array(["a", "b"]))


def test_accepts_tensorflow_tensors_and_lists():
    tf = pytest.importorskip("tensorflow")
    obs = MinMaxObserver()
    obs.update(tf.constant([[-1.5, 2.0]]))
    obs.update([0.5, 3.0])
    assert obs.compute_range() == (-1.5, 3.0)


def test_reset_forgets_statistics():
    for method, params in ALL_CONFIGS:
        obs = create_observer(method, **params)
        fresh = obs.get_state()
        obs.update(_batches()[0])
        obs.reset()
        assert obs.get_state() == fresh and not obs.has_data


# ---------------------------------------------------------------------------- serialization
@pytest.mark.parametrize("method, params", ALL_CONFIGS, ids=CONFIG_IDS)
def test_state_round_trip(method, params):
    obs = create_observer(method, **params)
    assert Observer.from_state(_json_round_trip(obs.get_state())).get_state() == obs.get_state()
    batches = _batches()
    for b in batches[:3]:
        obs.update(b)
    restored = Observer.from_state(_json_round_trip(obs.get_state()))
    assert type(restored) is type(obs) and restored.get_config() == obs.get_config()
    _assert_ranges_equal(restored.compute_range(), obs.compute_range())
    for b in batches[3:]:  # both continue identically
        obs.update(b)
        restored.update(b)
    assert restored.get_state() == obs.get_state()
    _assert_ranges_equal(restored.compute_range(), obs.compute_range())


def test_state_errors():
    hist = HistogramObserver("kl")
    hist.update(_batches()[0])
    state = hist.get_state()
    with pytest.raises(ValueError, match="not a 'MinMaxObserver'"):
        MinMaxObserver.from_state(state)
    with pytest.raises(ValueError, match="differs from this observer's config"):
        HistogramObserver("mse").set_state(state)
    with pytest.raises(ValueError, match="Unknown observer type 'Nope'"):
        Observer.from_state({**state, "type": "Nope"})
    broken = _json_round_trip(state)
    broken["stats"]["counts"] = broken["stats"]["counts"][:-1]
    with pytest.raises(ValueError, match="Malformed HistogramObserver stats"):
        Observer.from_state(broken)
    with pytest.raises(ValueError, match="keys 'type', 'config', 'stats'"):
        hist.set_state({"min": 0.0})


@pytest.mark.parametrize("method, params", ALL_CONFIGS, ids=CONFIG_IDS)
def test_config_round_trip(method, params):
    obs = create_observer(method, **params)
    config = obs.get_config()
    assert json.loads(json.dumps(config)) == config
    assert type(obs).from_config(config).get_config() == config


def test_from_config_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['decay'\] for MinMaxObserver"):
        MinMaxObserver.from_config({"decay": 0.9})


def _state_sizes(state) -> list:
    """Lengths of every list in a state, in order: what memory the state takes."""
    if isinstance(state, dict):
        return [s for v in state.values() for s in _state_sizes(v)]
    if isinstance(state, list):
        return [len(state)]
    return []


@pytest.mark.parametrize("method, params", ALL_CONFIGS, ids=CONFIG_IDS)
def test_memory_does_not_grow_with_batches(method, params):
    rng = np.random.default_rng(11)
    obs = create_observer(method, **params)
    obs.update(rng.standard_normal((64, 8)))
    after_one = _state_sizes(obs.get_state())
    for i in range(49):
        obs.update(rng.standard_normal((64, 8)) * (1 + i))  # growing ranges too
    after_fifty = _state_sizes(obs.get_state())
    assert after_one == after_fifty
    if method in HIST_METHODS:
        assert after_one == [obs.num_bins]


# -------------------------------------------------------------------------------- factory
@pytest.mark.parametrize(
    "method, cls, hist_method",
    [
        ("minmax", MinMaxObserver, None),
        ("moving_average", MovingAverageMinMaxObserver, None),
        ("kl", HistogramObserver, "kl"),
        ("percentile", HistogramObserver, "percentile"),
        ("mse", HistogramObserver, "mse"),
    ],
)
def test_create_observer(method, cls, hist_method):
    obs = create_observer(method, symmetric=True)
    assert type(obs) is cls and obs.symmetric
    if hist_method:
        assert obs.method == hist_method
    assert method in observers.OBSERVER_METHODS


def test_create_observer_errors():
    with pytest.raises(ValueError, match=r"method must be one of 'minmax', 'moving_average', 'kl', 'percentile', 'mse'"):
        create_observer("entropy")
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['percentile'\] for observer method 'kl'. Allowed:"):
        create_observer("kl", percentile=99.0)
    with pytest.raises(ValueError, match=r"\['decay'\].*Allowed: \['symmetric', 'per_channel', 'axis'\]"):
        create_observer("minmax", decay=0.5)
    with pytest.raises(ValueError, match="only; per-channel ranges are supported by MinMaxObserver"):
        create_observer("mse", per_channel=True)
    with pytest.raises(ValueError, match="bits=1"):
        create_observer("kl", bits=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "minmax"}, r"method must be one of \('percentile', 'kl', 'mse'\)"),
        ({"num_bins": 8}, "num_bins must be an int >= 16"),
        ({"num_bins": 2048.0}, "num_bins must be an int >= 16"),
        ({"percentile": 50.0}, r"percentile must be a number in \(50, 100\]"),
        ({"percentile": 101}, r"percentile must be a number in \(50, 100\]"),
        ({"bits": 17}, "bits=17"),
    ],
)
def test_histogram_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HistogramObserver(**kwargs)


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """MXNet's ``_smooth_distribution``: ε into empty bins, taken evenly from the occupied ones."""
    zeros = p == 0
    eps1 = eps * zeros.sum() / (~zeros).sum()
    return p + eps * zeros - eps1 * ~zeros


def _mxnet_style_threshold(abs_x: np.ndarray, width: float, levels: int = 128) -> float:
    """Smoothed entropy calibration as MXNet / ONNX Runtime write it, on |x| binned at ``width``.

    Independent of tfq's code: its own histogram (np.histogram), both distributions smoothed
    exactly (MXNet's ``_smooth_distribution``), KL by scipy-style normalised sums, one candidate
    at a time.
    """
    n = int(np.floor(abs_x.max() / width)) + 1
    hist = np.histogram(abs_x, bins=np.arange(n + 1) * width)[0].astype(np.float64)
    best, best_i = np.inf, None
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        occupied = p > 0
        level = np.arange(i) * levels // i
        sums = np.bincount(level, weights=hist[:i], minlength=levels)
        members = np.bincount(level, weights=occupied, minlength=levels)
        q = np.where(occupied & (members[level] > 0), sums[level] / np.maximum(members[level], 1), 0.0)
        ps, qs = _smooth(p), _smooth(q)
        ps, qs = ps / ps.sum(), qs / qs.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def test_kl_clips_far_outliers_like_smoothed_entropy_calibration():
    # 10 values near 60 among 10^6 N(0, 1) values, shuffled and fed in 32 batches as calibrate feeds
    # them. Unsmoothed, every candidate ending in an empty bin below 60 is infinite and the range kept
    # the outliers: (-4.68, 60.1). Smoothed (MXNet, ONNX Runtime), the outliers are clipped.
    rng = np.random.default_rng(0)
    x = rng.permutation(np.concatenate([rng.standard_normal(10**6), 60 + 0.1 * rng.standard_normal(10)]))
    obs = HistogramObserver("kl")
    for batch in np.array_split(x, 32):
        obs.update(batch)
    lo, hi = obs.compute_range()
    assert lo == pytest.approx(x.min())  # the negative side holds no outlier: its data minimum
    assert 4.0 <= hi <= 8.1, (lo, hi)
    reference = _mxnet_style_threshold(np.abs(x), obs._width)
    assert hi == pytest.approx(reference, abs=2 * obs._width)
    # Symmetric: the same rule on |x|.
    sym = HistogramObserver("kl", symmetric=True)
    for batch in np.array_split(x, 32):
        sym.update(batch)
    t = sym.compute_range()[1]
    assert 4.0 <= t <= 8.1
    assert t == pytest.approx(_mxnet_style_threshold(np.abs(x), sym._width), abs=2 * sym._width)


def test_softmax_input_observer_hand_computed_batches_shards_and_state():
    m = 9 * np.log(2.0) + np.log(2)  # int8, 3 classes
    obs = SoftmaxInputObserver()
    obs.update(np.float32([[20.0, 1.0, -9.0]]))  # hi = 1 + m (top clipped), lo = max(-9, 1) = 1 → widened to 0
    assert obs.compute_range() == pytest.approx((0.0, 1.0 + m))
    obs.update(np.float32([[3.0, 2.5, -1.0]]))  # close call: its own min and top
    assert obs.compute_range() == pytest.approx((-1.0, 1.0 + m))
    obs.update(np.zeros((0, 3), np.float32))  # empty: no-op
    assert obs.compute_range() == pytest.approx((-1.0, 1.0 + m))
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((n, 10)) * s).astype(np.float32) for n, s in [(5, 1.0), (64, 9.0), (1, 30.0)]]
    whole, a, b = SoftmaxInputObserver(), SoftmaxInputObserver(), SoftmaxInputObserver()
    for batch in batches:
        whole.update(batch)
    a.update(batches[0])
    b.update(batches[1])
    b.update(batches[2])
    a.merge(b)
    assert a.get_state() == whole.get_state()
    lo, hi = ops.softmax_input_range_numpy(np.concatenate(batches))
    assert whole.compute_range() == pytest.approx((min(lo, 0.0), max(hi, 0.0)))
    restored = Observer.from_state(json.loads(json.dumps(whole.get_state())))
    assert type(restored) is SoftmaxInputObserver and restored.compute_range() == whole.compute_range()
    assert SoftmaxInputObserver(bits=16).get_config()["bits"] == 16
    with pytest.raises(ValueError, match="per_channel=False"):
        SoftmaxInputObserver(per_channel=True)
    with pytest.raises(ValueError, match="bits must be an int in 2..16. Received: bits=1"):
        SoftmaxInputObserver(bits=1)
