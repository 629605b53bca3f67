"""Tests of tfq.core.representative: representative datasets for calibration."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfq.core.representative import RepresentativeDataset, model_input_specs, representative_dataset


def _dense_model(shape=(3,), name="feat", dtype="float32"):
    inputs = keras.Input(shape, name=name, dtype=dtype)
    flat = keras.layers.Flatten()(keras.ops.cast(inputs, "float32")) if len(shape) > 1 else inputs
    return keras.Model(inputs, keras.layers.Dense(2)(keras.ops.cast(flat, "float32")), name="tiny")


def _two_input_model():
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    merged = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], keras.layers.Dense(1)(merged), name="two")


def _samples(rep, **kwargs):
    """All items of one pass, each a list of arrays."""
    return list(rep(**kwargs))


def _stack(items, index=0):
    return np.concatenate([item[index] for item in items])


X = np.arange(7 * 3, dtype=np.float64).reshape(7, 3) / 10.0
Y = np.arange(7)


# --------------------------------------------------------------------------------------------
# model_input_specs
# --------------------------------------------------------------------------------------------


def test_model_input_specs_keras3():
    a = keras.Input((8, 8, 1), name="pixels")
    b = keras.Input((None,), name="ids", dtype="int32")
    out = keras.layers.Dense(1)(keras.layers.Flatten()(a))
    model = keras.Model([a, b], out)
    assert model_input_specs(model) == [("pixels", (8, 8, 1), "float32"), ("ids", (None,), "int32")]


def test_model_input_specs_tf_keras():
    tf_keras = pytest.importorskip("tf_keras")
    inputs = tf_keras.Input((8, 8, 1), name="pixels")
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2)(tf_keras.layers.Flatten()(inputs)))
    assert model_input_specs(model) == [("pixels", (8, 8, 1), "float32")]


def test_model_input_specs_unbuilt_model_raises():
    model = keras.Sequential([keras.layers.Dense(2)], name="lazy")
    with pytest.raises(ValueError, match=r"model 'lazy' has no defined inputs.*keras\.Input"):
        model_input_specs(model)


# --------------------------------------------------------------------------------------------
# Accepted data forms
# --------------------------------------------------------------------------------------------


def test_numpy_yields_each_sample_with_batch_axis_as_float32():
    rep = representative_dataset(X)
    items = _samples(rep)
    assert isinstance(rep, RepresentativeDataset)
    assert len(rep) == 7 and len(items) == 7
    for i, item in enumerate(items):
        assert isinstance(item, list) and len(item) == 1
        assert item[0].dtype == np.float32 and item[0].shape == (1, 3)
        np.testing.assert_array_equal(item[0], X[i : i + 1].astype(np.float32))
    assert rep.input_signature == [((3,), "float32")]
    assert rep.input_names is None


def test_integer_and_bool_arrays_are_cast_to_float32():
    ints = np.arange(12, dtype=np.int16).reshape(4, 3)
    items = _samples(representative_dataset(ints))
    assert all(item[0].dtype == np.float32 for item in items)
    np.testing.assert_array_equal(_stack(items), ints.astype(np.float32))
    bools = _samples(representative_dataset(np.array([[True, False]])))
    np.testing.assert_array_equal(bools[0][0], [[1.0, 0.0]])


def test_yielded_arrays_are_copies_of_the_source():
    source = X.astype(np.float32)
    item = next(iter(representative_dataset(source)()))
    item[0][:] = -5.0
    assert source.min() >= 0.0


def test_nested_python_lists_are_one_input():
    rep = representative_dataset([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(_stack(_samples(rep)), [[1.0, 2.0], [3.0, 4.0]])


def test_list_and_tuple_of_arrays_are_multiple_inputs():
    other = np.arange(14.0).reshape(7, 2)
    for data in ([X, other], (X, other)):
        items = _samples(representative_dataset(data))
        assert len(items) == 7 and all(len(item) == 2 for item in items)
        np.testing.assert_array_equal(_stack(items, 0), X.astype(np.float32))
        np.testing.assert_array_equal(_stack(items, 1), other.astype(np.float32))


def test_dict_is_ordered_by_sorted_key_then_input_names_then_model():
    b = np.arange(14.0).reshape(7, 2)
    data = {"b": b, "a": X}
    rep = representative_dataset(data)
    assert rep.input_names == ["a", "b"]
    np.testing.assert_array_equal(_stack(_samples(rep), 0), X.astype(np.float32))
    rep = representative_dataset(data, input_names=["b", "a"])
    assert rep.input_names == ["b", "a"]
    np.testing.assert_array_equal(_stack(_samples(rep), 0), b.astype(np.float32))
    rep = representative_dataset(data, model=_two_input_model())
    assert rep.input_names == ["a", "b"]
    assert rep.input_signature == [((3,), "float32"), ((2,), "float32")]
    items = _samples(rep)
    np.testing.assert_array_equal(_stack(items, 0), X.astype(np.float32))
    np.testing.assert_array_equal(_stack(items, 1), b.astype(np.float32))


def test_tf_data_unbatched_with_labels():
    dataset = tf.data.Dataset.from_tensor_slices((X, Y))
    rep = representative_dataset(dataset)
    items = _samples(rep)
    assert len(rep) == 7 and len(items) == 7
    assert all(item[0].shape == (1, 3) and len(item) == 1 for item in items)
    np.testing.assert_array_equal(_stack(items), X.astype(np.float32))


def test_tf_data_batched_with_labels_and_weights():
    dataset = tf.data.Dataset.from_tensor_slices((X, Y, np.ones(7))).batch(3)
    rep = representative_dataset(dataset)
    items = _samples(rep)
    assert len(items) == 7 and all(item[0].shape == (1, 3) for item in items)
    np.testing.assert_array_equal(_stack(items), X.astype(np.float32))
    assert len(rep) == 7


def test_tf_data_plain_x_and_drop_remainder_with_model():
    # drop_remainder gives a static batch size: the model decides that elements are batches.
    dataset = tf.data.Dataset.from_tensor_slices(X).batch(2, drop_remainder=True)
    rep = representative_dataset(dataset, model=_dense_model())
    np.testing.assert_array_equal(_stack(_samples(rep)), X[:6].astype(np.float32))
    unbatched = representative_dataset(tf.data.Dataset.from_tensor_slices(X), model=_dense_model())
    np.testing.assert_array_equal(_stack(_samples(unbatched)), X.astype(np.float32))


def test_tf_data_dict_and_tuple_of_inputs():
    b = np.arange(14.0).reshape(7, 2)
    model = _two_input_model()
    by_name = tf.data.Dataset.from_tensor_slices(({"b": b, "a": X}, Y)).batch(4)
    as_tuple = tf.data.Dataset.from_tensor_slices((X, b))  # two inputs, not (x, y)
    for dataset in (by_name, as_tuple):
        items = _samples(representative_dataset(dataset, model=model))
        assert len(items) == 7
        np.testing.assert_array_equal(_stack(items, 0), X.astype(np.float32))
        np.testing.assert_array_equal(_stack(items, 1), b.astype(np.float32))


def test_generator_function_in_tflite_form():
    def generator():
        for i in range(7):
            yield [X[i : i + 1]]

    rep = representative_dataset(generator)
    items = _samples(rep)
    np.testing.assert_array_equal(_stack(items), X.astype(np.float32))
    assert len(rep) == 7


def test_generator_function_of_unbatched_pairs_with_model():
    rep = representative_dataset(lambda: zip(X, Y), model=_dense_model())
    items = _samples(rep)
    assert all(item[0].shape == (1, 3) for item in items)
    np.testing.assert_array_equal(_stack(items), X.astype(np.float32))


def test_integer_model_input_keeps_integer_dtype():
    model = _dense_model(shape=(3,), name="ids", dtype="int32")
    rep = representative_dataset(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), model=model)
    items = _samples(rep)
    assert rep.input_signature == [((3,), "int32")]
    assert items[0][0].dtype == np.int32
    np.testing.assert_array_equal(_stack(items), [[1, 2, 3], [4, 5, 6]])


def test_none_dims_in_the_model_accept_any_size():
    inputs = keras.Input((None,), name="seq")
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: keras.ops.sum(t, axis=1))(inputs))

    def generator():
        yield [np.ones((1, 4))]
        yield [np.ones((1, 6))]

    rep = representative_dataset(generator, model=model)
    assert rep.input_signature == [((None,), "float32")]
    assert [item[0].shape for item in rep()] == [(1, 4), (1, 6)]
    with pytest.raises(ValueError, match=r"cannot batch samples of input 'seq'.*batch_size=1"):
        list(rep.batches(2))


# --------------------------------------------------------------------------------------------
# num_samples, batching, re-iteration, shuffle
# --------------------------------------------------------------------------------------------


def test_num_samples_caps_every_source():
    dataset = tf.data.Dataset.from_tensor_slices((X, Y))
    sources = [X, [X], dataset, dataset.batch(3), lambda: ([X[i : i + 1]] for i in range(7))]
    for data in sources:
        rep = representative_dataset(data, num_samples=4)
        items = _samples(rep)
        assert len(rep) == 4 and len(items) == 4
        np.testing.assert_array_equal(_stack(items), X[:4].astype(np.float32))
    assert len(representative_dataset(X, num_samples=100)) == 7


def test_calling_twice_gives_the_same_data():
    for data in (X, tf.data.Dataset.from_tensor_slices(X).batch(2), lambda: iter([[X]])):
        rep = representative_dataset(data)
        first, second = _samples(rep), _samples(rep)
        assert len(first) == len(second) == 7
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a[0], b[0])


def test_batches_concatenate_to_the_source():
    dataset = tf.data.Dataset.from_tensor_slices(X).batch(3)
    for data in (X, dataset):
        rep = representative_dataset(data)
        for k in (1, 2, 3, 7, 10):
            batches = list(rep.batches(k))
            sizes = [len(b[0]) for b in batches]
            assert all(size == k for size in sizes[:-1]) and 0 < sizes[-1] <= k
            np.testing.assert_array_equal(_stack(batches), X.astype(np.float32))


def test_batch_size_sets_the_items_of_call():
    rep = representative_dataset(X, batch_size=3)
    assert [item[0].shape for item in rep()] == [(3, 3), (3, 3), (1, 3)]
    assert len(rep) == 7 and rep.batch_size == 3


def test_representative_dataset_input_is_returned_or_relimited():
    rep = representative_dataset(X)
    assert representative_dataset(rep) is rep
    limited = representative_dataset(rep, num_samples=2)
    assert limited is not rep and len(limited) == 2
    np.testing.assert_array_equal(_stack(_samples(limited)), X[:2].astype(np.float32))
    rebatched = representative_dataset(rep, batch_size=4)
    assert [item[0].shape[0] for item in rebatched()] == [4, 3]
    checked = representative_dataset(rep, model=_dense_model())
    assert checked.input_names == ["feat"]
    with pytest.raises(ValueError, match=r"input 'other' sample 0 has shape \(3,\).*\(4,\)"):
        representative_dataset(rep, model=_dense_model(shape=(4,), name="other"))


def test_shuffle_of_arrays_is_a_seeded_permutation_and_subset():
    rep = representative_dataset(X, shuffle=True, seed=3)
    order = _stack(_samples(rep))
    np.testing.assert_array_equal(order, _stack(_samples(rep)))  # same every call
    assert not np.array_equal(order, X.astype(np.float32))
    np.testing.assert_array_equal(np.sort(order, axis=0), X.astype(np.float32))
    subset = _stack(_samples(representative_dataset(X, num_samples=3, shuffle=True, seed=3)))
    np.testing.assert_array_equal(subset, order[:3])


def test_shuffle_of_a_stream_is_seeded_and_keeps_all_samples():
    dataset = tf.data.Dataset.from_tensor_slices(X).batch(2)
    rep = representative_dataset(dataset, shuffle=True, seed=1)
    first, second = _stack(_samples(rep)), _stack(_samples(rep))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first, axis=0), X.astype(np.float32))
    assert not np.array_equal(first, X.astype(np.float32))


def test_infinite_dataset_needs_num_samples():
    dataset = tf.data.Dataset.from_tensor_slices(X).repeat()
    with pytest.raises(ValueError, match="infinite.*num_samples"):
        representative_dataset(dataset)
    rep = representative_dataset(dataset, num_samples=10)
    assert len(rep) == 10
    np.testing.assert_array_equal(_stack(_samples(rep))[7:], X[:3].astype(np.float32))


def test_generators_stream_without_being_read_whole():
    produced = []

    def generator():
        for i in itertools.count():
            produced.append(i)
            yield [np.full((1, 3), float(i))]

    rep = representative_dataset(generator, num_samples=3)
    assert len(produced) <= 1  # the eager check reads only the first item
    np.testing.assert_array_equal(_stack(_samples(rep))[:, 0], [0.0, 1.0, 2.0])
    assert len(produced) <= 1 + 3


def test_tflite_converter_accepts_it():
    x = np.random.default_rng(0).random((8, 3), dtype=np.float32)
    model = _dense_model()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(x, model=model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = converter.convert()
    assert isinstance(flatbuffer, bytes) and len(flatbuffer) > 0


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _error(data, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        representative_dataset(data, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_empty_data():
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 3)))
    for data in (np.zeros((0, 3)), [], empty, lambda: iter([]), {"a": np.zeros((0, 2))}):
        message = _error(data)
        assert "representative data is empty: got 0 samples; pass at least one sample" in message


def test_function_returning_the_same_iterator_is_rejected():
    generator = ([X[i : i + 1]] for i in range(7))
    rep = representative_dataset(lambda: generator)  # the eager check consumed sample 0
    with pytest.raises(TypeError, match="returned the same iterator.*new one on every call"):
        _samples(rep)


def test_nan_and_inf_name_the_input_and_first_bad_sample():
    bad = X.copy()
    bad[0, 1] = np.nan
    message = _error(bad)
    assert "input 0 sample 0 contains NaN" in message and "finite" in message
    bad = X.copy()
    bad[5, 2] = np.inf
    # Small arrays fit in the first chunk, which is checked at construction.
    assert "input 'pixels' sample 5 contains Inf" in _error({"pixels": bad})
    message = _error(np.array([[1.0], [1e300]]), model=_dense_model(shape=(1,), name="big"))
    assert "input 'big' sample 1 has value 1e+300 which overflows float32" in message


def test_nan_in_a_stream_raises_at_the_first_bad_sample():
    def generator():
        for i in range(7):
            value = np.nan if i >= 4 else float(i)
            yield [np.full((1, 3), value)]

    rep = representative_dataset(generator)  # first sample fine: construction passes
    items = []
    with pytest.raises(ValueError, match="input 0 sample 4 contains NaN"):
        for item in rep():
            items.append(item)
    assert len(items) == 4
    assert len(representative_dataset(generator, num_samples=4)) == 4  # bad samples not reached


def test_wrong_number_of_inputs():
    message = _error((X, Y), model=_dense_model())
    assert "2 input(s) of shapes [(7, 3), (7,)]" in message
    assert "model 'tiny' has 1 input(s) ['feat']" in message
    assert "pass x, not (x, y)" in message
    message = _error([X], model=_two_input_model())
    assert "1 input(s) of shapes [(7, 3)]" in message and "['a', 'b']" in message


def test_wrong_rank_and_dimension():
    model = _dense_model(shape=(8, 8, 1), name="pixels")
    message = _error(np.zeros((4, 8, 8)), model=model)
    assert "input 'pixels' sample 0 has shape (8, 8) (rank 2" in message
    assert "expects (8, 8, 1)" in message and "x[..., np.newaxis]" in message
    message = _error(np.zeros((8, 8, 1)), model=model)  # one sample without batch axis
    assert "has shape (8, 1)" in message and "x[np.newaxis]" in message
    message = _error(np.zeros((4, 3)), model=_dense_model(shape=(5,), name="feat"))
    assert "input 'feat' sample 0 has shape (3,)" in message and "expects (5,)" in message


def test_wrong_rank_in_a_dataset_element_with_model():
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((4, 2, 2, 3)))
    message = _error(dataset, model=_dense_model())
    assert "input 'feat' has an element of shape (2, 2, 3) (rank 3)" in message
    assert "expects samples of shape (3,)" in message


def test_shape_changing_mid_stream_without_model():
    def generator():
        yield [np.zeros((1, 3))]
        yield [np.zeros((1, 4))]

    rep = representative_dataset(generator)
    with pytest.raises(ValueError, match=r"input 0 sample 1 has shape \(4,\) but earlier samples"):
        _samples(rep)


def test_non_numeric_dtype():
    message = _error(np.array([["a", "b"], ["c", "d"]]), model=_dense_model(shape=(2,), name="t"))
    assert "input 't' has non-numeric dtype <U1 (e.g. 'a')" in message and "encode" in message
    message = _error({"words": np.array([object(), object()])})
    assert "input 'words' has non-numeric dtype object" in message
    strings = tf.data.Dataset.from_tensor_slices(["x", "y"])
    assert "has non-numeric dtype" in _error(strings)


def test_fractional_values_for_integer_model_input():
    model = _dense_model(shape=(2,), name="ids", dtype="int32")
    message = _error(np.array([[1.0, 2.0], [1.5, 2.0]]), model=model)
    assert "input 'ids' sample 1 has non-integer values but the model input is int32" in message


def test_integer_model_input_out_of_range():
    model = _dense_model(shape=(2,), name="ids", dtype="int8")
    message = _error(np.array([[1.0, 300.0]]), model=model)
    assert "input 'ids' has values in [1.0, 300.0]" in message and "int8" in message


def test_item_without_inputs():
    message = _error(lambda: iter([[]]))
    assert "item at sample 0 has no inputs (got an empty list)" in message


def test_dict_keys_must_match_the_inputs():
    message = _error({"a": X, "c": X}, model=_two_input_model())
    assert "dict keys ['a', 'c']" in message and "missing: ['b']" in message
    assert "unexpected: ['c']" in message


def test_inputs_with_different_sample_counts():
    message = _error([X, np.zeros((5, 2))])
    assert "input 0 has 7 samples but input 1 has 5" in message


def test_scalar_data():
    assert "input 0 is a scalar (shape ())" in _error(3.0)


def test_ragged_dataset_is_rejected():
    ragged = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1.0], [2.0, 3.0]]))
    with pytest.raises(TypeError, match="not a dense tensor"):
        representative_dataset(ragged)


def test_generator_object_and_bad_types_are_type_errors():
    with pytest.raises(TypeError, match=r"read only once.*lambda: gen\(\)"):
        representative_dataset([X[i : i + 1]] for i in range(7))
    with pytest.raises(TypeError, match="Received: NoneType"):
        representative_dataset(None)
    with pytest.raises(TypeError, match="returned int"):
        representative_dataset(lambda: 5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_samples": 0}, "num_samples=0"),
        ({"num_samples": 2.5}, "num_samples=2.5"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seed": -1}, "seed=-1"),
        ({"shuffle": "yes"}, "shuffle='yes'"),
        ({"input_names": "a"}, "input_names='a'"),
        ({"input_names": ["a", "a"]}, "input_names=['a', 'a']"),
    ],
)
def test_invalid_arguments(kwargs, fragment):
    message = _error(X, **kwargs)
    assert fragment in message
    assert "pass" in message or "rename" in message


def test_input_names_must_match_model_input_count():
    message = _error(X, model=_dense_model(), input_names=["x", "y"])
    assert "input_names has 2 names but model 'tiny' has 1 inputs ['feat']" in message


def test_batches_rejects_bad_batch_size():
    rep = representative_dataset(X)
    with pytest.raises(ValueError, match="batch_size=0"):
        rep.batches(0)
