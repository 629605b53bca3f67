"""Pruning and clustering of the digits CNN down to INT8 TFLite, checked through LiteRT's interpreter.

The preserving-QAT tests on this model are slow (fine-tuning twice each); the same mechanism is checked
fast on a small conv+BN model in ``test_clustering.py``.
"""

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tfq
from tests.conftest import tflite_accuracy
from tfq import callbacks, clustering, pruning

LAYERS = ("conv1", "conv2", "fc1", "probs")


def tflite_weights(content) -> dict[str, np.ndarray]:
    """The INT8 weight tensors, read through the interpreter, by Keras layer name, in Keras layout."""
    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    found = {}
    for detail in interp.get_tensor_details():
        if detail["dtype"] != np.int8 or len(detail["shape"]) < 2:
            continue
        try:
            values = interp.get_tensor(detail["index"])
        except ValueError:  # activations: no data outside invoke
            continue
        for name in LAYERS:
            if f"/{name}" in detail["name"] and name not in found:
                # TFLite stores (out, h, w, in) filters and (out, in) FC weights.
                found[name] = np.transpose(values, (1, 2, 3, 0)) if values.ndim == 4 else values.T
    assert set(found) == set(LAYERS), sorted(found)
    return found


def distinct_per_output_channel(w: np.ndarray) -> int:
    return max(len(np.unique(w[..., c])) for c in range(w.shape[-1]))


@pytest.fixture(scope="module")
def pruned75(trained_cnn, digits):
    """The trained CNN pruned to 75 % while fine-tuning 4 epochs (target after 60 % of them), stripped."""
    model, _ = trained_cnn
    (x_train, y_train), _ = digits
    keras.utils.set_random_seed(0)
    steps = 4 * int(np.ceil(len(x_train) / 32))
    pruned = pruning.prune_low_magnitude(model, 0.75, end_step=int(0.6 * steps), frequency=10)
    pruned.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    pruned.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0, callbacks=[callbacks.UpdatePruningStep()])
    return pruning.strip_pruning(pruned)


def test_pruned_int8_keeps_accuracy_and_gzips_smaller(trained_cnn, digits, pruned75):
    model, float_acc = trained_cnn
    (x_train, _), (x_test, y_test) = digits
    sparsity = pruning.sparsity_of(pruned75)
    assert all(sparsity[name] == pytest.approx(0.75, abs=1e-3) for name in LAYERS)
    dense = tfq.convert(model, "int8", x_train[:300])
    sparse = tfq.convert(pruned75, "int8", x_train[:300])
    acc = tflite_accuracy(sparse, x_test, y_test)
    assert acc >= float_acc - 0.015, (acc, float_acc)
    dense_info, sparse_info = tfq.inspect_tflite(dense), tfq.inspect_tflite(sparse)
    assert sparse_info.size == pytest.approx(dense_info.size, rel=0.01)  # zeros take room until compressed
    assert sparse_info.gzip_size < 0.5 * dense_info.gzip_size, (sparse_info.gzip_size, dense_info.gzip_size)
    read = tflite_weights(sparse)
    for name in LAYERS:  # the file's zeros, read through the interpreter, are the pruned ones
        kernel = pruned75.get_layer(name).kernel.numpy()
        assert np.mean(read[name] == 0) >= np.mean(kernel == 0) - 1e-3
    assert sparse_info.weight_sparsity == pytest.approx(
        sum(np.count_nonzero(v == 0) for v in read.values()) / sum(v.size for v in read.values()), abs=1e-3)


@pytest.mark.slow
def test_sparsity_preserving_qat_keeps_the_zeros(digits, pruned75):
    (x_train, y_train), (x_test, y_test) = digits
    zeros = {name: pruned75.get_layer(name).kernel.numpy() == 0 for name in LAYERS}
    kept = {}
    for preserve in ("sparsity", None):
        keras.utils.set_random_seed(0)
        qat = tfq.qat.quantize_model(pruned75, calibration_data=x_train[:256], preserve=preserve)
        qat.compile(keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
        qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)
        content = tfq.convert(qat, "int8")
        read = tflite_weights(content)
        kept[preserve] = sum(np.count_nonzero(read[n][zeros[n]] == 0) for n in LAYERS) / sum(z.sum() for z in zeros.values())
        if preserve == "sparsity":
            assert tflite_accuracy(content, x_test, y_test) > 0.95
    assert kept["sparsity"] >= 0.99
    assert kept[None] < 0.9  # plain QAT moves the pruned weights: the check above can fail


@pytest.mark.slow
def test_cluster_preserving_qat_keeps_16_values_per_channel(trained_cnn, digits, tmp_path):
    model, float_acc = trained_cnn
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    clustered = clustering.cluster_weights(model, number_of_clusters=16)
    clustered.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    clustered.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)
    stripped = clustering.strip_clustering(clustered)
    assert all(len(np.unique(stripped.get_layer(n).kernel.numpy())) <= 16 for n in LAYERS)
    qat = tfq.qat.quantize_model(stripped, calibration_data=x_train[:256], preserve="clusters")
    qat.compile(keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)
    content = tfq.convert(qat, "int8")
    read = tflite_weights(content)
    for name in LAYERS:
        assert distinct_per_output_channel(read[name]) <= 16, name
    assert max(len(np.unique(read[n])) for n in ("conv1", "conv2")) > 16  # per channel, not per tensor
    info = tfq.inspect_tflite(content)
    assert info.max_distinct_per_channel <= 16
    assert tflite_accuracy(content, x_test, y_test) >= float_acc - 0.015
    # Through a .keras file: the shared values and indices reload, and export the same bytes.
    qat.save(tmp_path / "cqat.keras")
    assert tfq.convert(keras.models.load_model(tmp_path / "cqat.keras"), "int8") == content
