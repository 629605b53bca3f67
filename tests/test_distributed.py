"""Calibration and QAT across shards, replicas and workers.

* Observers merge: the state of shards merged equals the state of one observer fed all the data
  (bit for bit for min/max and histograms; the moving average to float64 rounding, checked
  against the sequential formula by hand).
* Calibrations of shards merge into the one-process calibration; a strategy's replicas too.
* Multi-worker QAT (slow): two worker processes on localhost (TF_CONFIG) run
  ``scripts/train_qat.py --strategy=multi_worker`` and end with the same weights and ranges; the
  exported INT8 model agrees with a single-worker run of the same script through LiteRT.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import tfq
import tfq.qat
from tests.conftest import background_python
from tfq.observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer, create_observer

REPO = Path(__file__).resolve().parents[1]

MERGE_CONFIGS = [
    ("minmax", {}),
    ("minmax", {"per_channel": True, "symmetric": True}),
    ("moving_average", {"decay": 0.8}),
    ("moving_average", {"per_channel": True}),
    ("percentile", {}),
    ("percentile", {"symmetric": True, "percentile": 99.0}),
    ("kl", {}),
    ("kl", {"symmetric": True, "num_bins": 64}),
    ("mse", {}),
    ("mse", {"batch_aggregate": "median"}),
]
MERGE_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for m, p in MERGE_CONFIGS]


def _shard_batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose ranges differ by orders of magnitude (the histogram must coarsen and move),
    plus all-zero batches before and after data."""
    rng = np.random.default_rng(seed)
    batches = [np.zeros((16, 4), np.float32)]
    for i, (scale, offset) in enumerate([(1.0, 0.0), (0.01, -2.0), (30.0, 5.0), (0.5, 0.0), (3e3, -1e3), (1e-3, 0.0)]):
        batches.append((rng.standard_normal((64 + 8 * i, 4)) * scale + offset).astype(np.float32))
    batches.append(np.zeros((8, 4), np.float32))
    return batches


# ------------------------------------------------------------------------------------ observers
@pytest.mark.parametrize("method, params", MERGE_CONFIGS, ids=MERGE_IDS)
@pytest.mark.parametrize("split", [0, 1, 3, 7])
def test_merged_shards_equal_one_observer_fed_everything(method, params, split):
    batches = _shard_batches()
    whole, first, second = (create_observer(method, **params) for _ in range(3))
    for b in batches:
        whole.update(b)
    for b in batches[:split]:
        first.update(b)
    for b in batches[split:]:
        second.update(b)
    second_state = second.get_state()
    first.merge(second)
    assert second.get_state() == second_state  # the other observer is not changed
    if method == "moving_average":  # an affine recurrence re-associated: float64 rounding
        np.testing.assert_allclose(first.compute_range(), whole.compute_range(), rtol=1e-12, atol=1e-12)
        assert first.num_batches == whole.num_batches == len(batches)
    else:  # the same state, bin for bin
        assert first.get_state() == whole.get_state()
        np.testing.assert_array_equal(first.compute_range(), whole.compute_range())


def test_histograms_of_many_shards_merge_in_any_order():
    batches = _shard_batches(seed=3)
    whole = HistogramObserver("kl")
    for b in batches:
        whole.update(b)
    shards = [HistogramObserver("kl") for _ in batches]
    for shard, b in zip(shards, batches):
        shard.update(b)
    for order in ([6, 2, 0, 7, 1, 5, 3, 4], list(range(8))[::-1]):
        merged = HistogramObserver("kl")
        for i in order:
            merged.merge(shards[i])
        assert merged.get_state() == whole.get_state()
    state = whole.get_state()["stats"]
    assert sum(state["counts"]) == state["total"] == sum(b.size for b in batches)
    assert np.log2(state["bin_width"]) == int(np.log2(state["bin_width"]))  # a power of two


def test_moving_average_merge_follows_the_formula_by_hand():
    a, b = MovingAverageMinMaxObserver(decay=0.5), MovingAverageMinMaxObserver(decay=0.5)
    a.update([0.0, 2.0])  # max: 2
    a.update([0.0, 4.0])  # 0.5·2 + 0.5·4 = 3
    b.update([-2.0, 8.0])
    b.update([0.0, 6.0])  # b alone: max 8 → 7; min -2 → -1
    a.merge(b)  # a then b: max 3 → 0.5·3 + 0.5·8 = 5.5 → 0.5·5.5 + 0.5·6 = 5.75; min 0 → -1 → -0.5
    assert a.compute_range() == (-0.5, 5.75)
    assert a.get_state()["stats"]["num_batches"] == 4


def test_merge_refuses_other_types_configs_and_old_states():
    with pytest.raises(TypeError, match="MinMaxObserver.merge needs a MinMaxObserver. Received: HistogramObserver"):
        MinMaxObserver().merge(HistogramObserver())
    with pytest.raises(ValueError, match="different configurations"):
        HistogramObserver("kl").merge(HistogramObserver("kl", num_bins=512))
    old = MovingAverageMinMaxObserver()
    old.update([1.0, 2.0])
    state = old.get_state()
    for key in ("num_batches", "first_min", "first_max"):  # as saved before merging existed
        del state["stats"][key]
    restored = Observer.from_state(state)
    assert restored.compute_range() == old.compute_range()  # still loads …
    fresh = MovingAverageMinMaxObserver()
    fresh.update([0.0, 1.0])
    with pytest.raises(ValueError, match="no batch count"):  # … but cannot be merged after another
        fresh.merge(restored)
    empty = MinMaxObserver()
    empty.merge(MinMaxObserver())  # nothing on either side: still nothing
    assert not empty.has_data


# ---------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def digits_model(digits):
    (x_train, _), _ = digits
    keras.utils.set_random_seed(0)
    return tfq.examples.digits_cnn(input_shape=x_train.shape[1:])


@pytest.mark.parametrize("method", ["robust_minmax", "minmax", "moving_average", "kl", "percentile", "mse"])
def test_calibrations_of_shards_merge_into_the_one_process_calibration(digits_model, digits, method, tmp_path):
    (x_train, _), _ = digits
    data = x_train[:384]
    whole = tfq.calibrate(digits_model, data, method, batch_size=64)
    # Shards on batch boundaries: every batch is computed exactly as in the one-process run.
    shards = [tfq.calibrate(digits_model, data[i:i + 128], method, batch_size=64, keep_observers=True)
              for i in range(0, 384, 128)]
    shards[1].save(tmp_path / "shard1.json")  # the states travel through JSON (another worker's file)
    merged = tfq.merge_calibrations([shards[0], tmp_path / "shard1.json", shards[2]])
    assert merged.num_samples == whole.num_samples == 384
    assert merged.ranges.keys() == whole.ranges.keys()
    if method == "moving_average":
        for name, r in whole.ranges.items():
            np.testing.assert_allclose(merged.ranges[name], r, rtol=1e-9, atol=1e-12)
    else:
        assert merged.ranges == whole.ranges
    assert shards[0].merge(shards[1], shards[2]).ranges == merged.ranges
    assert tfq.Calibration.load(merged.save(tmp_path / "merged.json")).observers == merged.observers


def test_merge_calibrations_refuses_mismatches(digits_model, digits):
    (x_train, _), _ = digits
    plain = tfq.calibrate(digits_model, x_train[:64], "minmax")
    kept = tfq.calibrate(digits_model, x_train[:64], "minmax", keep_observers=True)
    other = tfq.calibrate(digits_model, x_train[:64], "kl", keep_observers=True)
    with pytest.raises(ValueError, match="calibration 1 has no observer states: calibrate each shard with keep_observers=True"):
        tfq.merge_calibrations([kept, plain])
    with pytest.raises(ValueError, match="calibration 1 \\('kl'"):
        tfq.merge_calibrations([kept, other])
    with pytest.raises(ValueError, match="at least one calibration"):
        tfq.merge_calibrations([])
    with pytest.raises(ValueError, match="batch_aggregate='median' takes one range per batch"):
        tfq.calibrate(digits_model, x_train[:64], "mse", batch_aggregate="median", strategy=object())
    with pytest.raises(ValueError, match="method='robust_minmax' \\(the default\\) tests every sample against the others.*"
                                         "with strategy pass method='minmax'"):
        tfq.calibrate(digits_model, x_train[:64], strategy=object())


STRATEGY_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.get_logger().setLevel("ERROR")
    import keras
    import tfq

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    (x, _), _ = tfq.datasets.load_digits()
    keras.utils.set_random_seed(0)
    model = tfq.examples.digits_cnn(input_shape=x.shape[1:])
    probs = model.get_layer("probs")
    probs.kernel.assign(probs.kernel * 200.0)  # logits far apart, as a trained classifier's
    data = x[:192]
    out = {}
    for method in ["minmax", "moving_average", "kl"]:  # kl: a histogram, as percentile and mse
        # Replica r of global batch k (2 × 32 samples) sees one-process batch 2k + r (32 samples);
        # the moving average runs over the global batches, as one process with batches of 64.
        one = tfq.calibrate(model, data, method, batch_size=64 if method == "moving_average" else 32)
        dist = tfq.calibrate(model, data, method, batch_size=32, strategy=strategy)
        out[method] = dict(one=one.ranges, dist=dist.ranges, samples=dist.num_samples)
    # A QAT model: its softmax input is calibrated by SoftmaxInputObserver (per-sample statistics)
    qat = tfq.qat.quantize_model(model, logits_range="softmax")
    for method in ["minmax", "moving_average"]:
        one = tfq.calibrate(qat, data, method, batch_size=64 if method == "moving_average" else 32)
        dist = tfq.calibrate(qat, data, method, batch_size=32, strategy=strategy)
        out["qat_" + method] = dict(one=one.ranges, dist=dist.ranges, samples=dist.num_samples)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def strategy_run():
    """The strategy run (devices are configured before TF starts: a subprocess), started at once."""
    yield from background_python(STRATEGY_SCRIPT)


@pytest.fixture(scope="module", autouse=True)
def _start_strategy_early(request):
    """Runs the strategy subprocess alongside this module's other tests (when its test is selected)."""
    if any(item.name.startswith("test_calibration_under_a_mirrored") for item in request.session.items):
        request.getfixturevalue("strategy_run")
    yield


def test_calibration_under_a_mirrored_strategy_equals_one_process(strategy_run):
    stdout, stderr = strategy_run.communicate(timeout=600)
    assert strategy_run.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result.keys() == {"minmax", "moving_average", "kl", "qat_minmax", "qat_moving_average"}
    # the QAT model's softmax input range is the softmax statistic, narrower than the tensor's min/max
    qat_lo, qat_hi = result["qat_minmax"]["one"]["probs_pre_activation_fq"]
    lo, hi = result["minmax"]["one"]["probs_pre_activation_fq"]
    assert lo <= qat_lo and qat_hi <= hi and (qat_lo, qat_hi) != (lo, hi)
    for method, r in result.items():
        assert r["samples"] == 192
        if method.endswith("moving_average"):  # batches of 64 against two slices of 32: float32 conv rounding
            for name, (lo, hi) in r["one"].items():
                assert r["dist"][name] == pytest.approx([lo, hi], rel=1e-5, abs=1e-6), name
        else:
            assert r["dist"] == r["one"], method


# ---------------------------------------------------------------------------------- multi-worker
def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_qat_matches_a_single_worker_run(trained_cnn, digits, tmp_path):
    """Two workers (TF_CONFIG) and one single-worker run of the same script, started together."""
    model, _ = trained_cnn
    (x_train, y_train), (x_test, y_test) = digits
    model.save(tmp_path / "float.keras")
    np.savez(tmp_path / "train.npz", x=x_train[:640], y=y_train[:640])
    command = [sys.executable, str(REPO / "scripts" / "train_qat.py"), f"--model={tmp_path / 'float.keras'}",
               f"--data={tmp_path / 'train.npz'}", "--epochs=2", "--batch_size=64", "--freeze_bn_epoch=1",
               "--strategy=multi_worker"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    procs = [subprocess.Popen(command + [f"--output_dir={tmp_path / 'multi'}"], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                               "index": i}})))
             for i in range(2)]
    procs.append(subprocess.Popen(command + [f"--output_dir={tmp_path / 'single'}"], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=1200)
            assert proc.returncode == 0, stderr[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    chief = keras.models.load_model(tmp_path / "multi" / "qat.keras")
    worker = keras.models.load_model(tmp_path / "multi" / "worker_1" / "qat.keras")
    single = keras.models.load_model(tmp_path / "single" / "qat.keras")
    # Synchronous training: both workers hold the same weights, BN statistics and ranges, bit for bit.
    for a, b in zip(chief.weights, worker.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    ranges = {n: q.current_range() for n, q in tfq.qat.quantizers_of(chief).items() if q.mode != "fixed"}
    single_ranges = {n: q.current_range() for n, q in tfq.qat.quantizers_of(single).items() if q.mode != "fixed"}
    assert ranges.keys() == single_ranges.keys()
    for name, r in ranges.items():  # same global batches: ranges differ by summation order only
        assert r == pytest.approx(single_ranges[name], rel=1e-3, abs=1e-5), name
    multi_int8 = (tmp_path / "multi" / "qat_int8.tflite").read_bytes()
    single_int8 = (tmp_path / "single" / "qat_int8.tflite").read_bytes()
    assert (tmp_path / "multi" / "worker_1" / "qat_int8.tflite").read_bytes() == multi_int8
    assert tfq.inspect_tflite(multi_int8).num_float_ops == 0
    multi_out = tfq.TFLiteModel(multi_int8).predict(x_test)
    single_out = tfq.TFLiteModel(single_int8).predict(x_test)
    assert (multi_out.argmax(1) == single_out.argmax(1)).mean() >= 0.98
    multi_acc, single_acc = (float((o.argmax(1) == y_test).mean()) for o in (multi_out, single_out))
    assert multi_acc > 0.9 and abs(multi_acc - single_acc) <= 0.02
