"""Per-layer precision under a budget (tfq.mixed_precision): sizes, accuracy and per-layer types checked in the file."""

import numpy as np
import pytest

import tfq
from tfq.analysis import precision


def _file_weights(content: bytes) -> dict[str, tuple[str, int, int]]:
    """``{tensor name: (type, elements, buffer bytes)}`` of the constant tensors of 2+ dims, read with LiteRT's own
    flatbuffer schema (independent of tfq's reader)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out = {}
    sg = model.Subgraphs(0)
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        buffer = model.Buffers(t.Buffer())
        size = buffer.DataLength() if buffer is not None else 0
        if t.ShapeLength() >= 2 and size:
            out[t.Name().decode()] = (types[t.Type()], int(np.prod(t.ShapeAsNumpy())), size)
    return out


def _layer_type(weights: dict, layer: str) -> str:
    found = {v[0] for k, v in weights.items() if f"/{layer}_1/" in k.split(";")[0] + "/"}
    assert len(found) == 1, (layer, found)
    return found.pop()


def _model(fragile: str | None = None):
    """A small digits model: conv → fc1 → fc2 → probs, trained briefly. ``fragile``: a layer given one huge weight
    per output channel on an input that is always zero (the function is unchanged, its 4-bit grid ruined)."""
    import keras
    from tfq.examples import train_model

    (x_train, y_train), (x_test, y_test) = tfq.datasets.load_digits()
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x_train.shape[1:], name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs, name="small")
    train_model(model, x_train, y_train, epochs=6, seed=0)
    if fragile is not None:
        fc1, layer = model.get_layer("fc1"), model.get_layer(fragile)
        k1, b1 = fc1.kernel.numpy(), fc1.bias.numpy()
        k1[:, 0], b1[0] = 0.0, -1.0  # fc1 unit 0: relu(-1) = 0 for every input
        fc1.kernel.assign(k1)
        fc1.bias.assign(b1)
        kernel = layer.kernel.numpy()
        kernel[0, :] = 50 * np.abs(kernel).max()  # multiplies the dead unit: no effect in float
        layer.kernel.assign(kernel)
    return model, (x_train, y_train), (x_test, y_test)


@pytest.fixture(scope="module")
def small():
    return _model()


@pytest.fixture(scope="module")
def budgeted(small):
    model, (x_train, _), (x_test, y_test) = small
    int8 = tfq.convert(model, "int8", x_train[:256])
    budget = int(0.75 * len(int8))
    return budget, precision.mixed_precision(model, x_train[:256], x_test, y_test, size_budget=budget)


def test_size_budget_is_met_in_bytes_and_the_table_matches_the_file(small, budgeted, tmp_path):
    from conftest import tflite_accuracy

    model, _, (x_test, y_test) = small
    budget, result = budgeted
    assert len(result.tflite) == result.size <= budget
    assert result.met and result.settings["budget_bytes"] == budget
    assert result.references["w4a8"]["size"] <= result.size < result.references["int8"]["size"]
    assert result.metric == pytest.approx(tflite_accuracy(result.tflite, x_test, y_test), abs=1e-12)
    float_acc = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert result.baseline == float_acc and result.drop == pytest.approx(float_acc - result.metric)
    weights = _file_weights(result.tflite)
    expected_type = {"int4": "INT4", "int8": "INT8", "float": "FLOAT32"}
    for row in result.rows:
        assert _layer_type(weights, row["layer"]) == expected_type[row["choice"]], row
        assert row["weight_bits"] == {"int4": 4, "int8": 8, "float": 32}[row["choice"]]
        n = row["params"]
        assert row["bytes"] == sum(v[2] for k, v in weights.items() if f"/{row['layer']}_1/" in k.split(";")[0] + "/")
        assert row["bytes"] == {"int4": (n + 1) // 2, "int8": n, "float": 4 * n}[row["choice"]]
    assert {r["choice"] for r in result.rows} >= {"int4"}  # the budget needs some 4-bit layers
    # the most accurate point within the budget: the first on the path that fits
    path_sizes = {t["index"]: t["size"] for t in result.trials}
    assert all(size > budget for k, size in path_sizes.items() if k < result.settings["chosen_index"])
    text = result.to_markdown()
    assert text.splitlines()[0].startswith("| layer | class | choice | weight bits | activation bits")
    assert all(f"| {r['layer']} |" in text for r in result.rows)
    import json

    out = result.save(tmp_path / "mixed")
    assert (out / "model.tflite").read_bytes() == result.tflite
    assert tfq.load_recipe(out / "recipe.yaml") == result.recipe
    saved = json.loads((out / "mixed_precision.json").read_text())
    assert saved["size"] == result.size and [r["choice"] for r in saved["rows"]] == [r["choice"] for r in result.rows]


def test_max_drop_is_met_through_litert_at_the_smallest_size_on_the_path(small):
    from conftest import tflite_accuracy

    model, (x_train, _), (x_test, y_test) = small
    result = precision.mixed_precision(model, x_train[:256], x_test, y_test, max_drop=0.0)
    accuracy = tflite_accuracy(result.tflite, x_test, y_test)
    assert result.met and accuracy >= result.baseline
    assert result.references["w4a8"]["drop"] > 0  # uniform W4A8 misses the target: the search has to choose
    assert result.references["w4a8"]["size"] < result.size <= result.references["int8"]["size"]
    assert any(r["choice"] == "int4" for r in result.rows)
    chosen = result.settings["chosen_index"]
    assert [t["index"] for t in result.trials if t["index"] == chosen + 1 and t["drop"] > 0]  # the next point fails
    rerun = tfq.convert(model, recipe=result.recipe, representative_data=x_train[:256])
    assert [w.bits for w in tfq.inspect_tflite(rerun).weights] == [w.bits for w in tfq.inspect_tflite(result.tflite).weights]


@pytest.fixture(scope="module")
def fragile():
    return _model(fragile="fc2")


@pytest.mark.parametrize("method", ["sqnr", "hessian"])
def test_a_fragile_layer_ranks_first(fragile, method):
    model, (x_train, _), _ = fragile
    omega = precision.layer_sensitivities(model, x_train[:256], sensitivity=method, choices=("int4", "int8"))
    ranked = sorted(omega, key=lambda n: -omega[n]["int4"])
    assert ranked[0] == "fc2", omega
    assert all(omega[n]["int4"] >= 0 for n in omega)


def test_allocation_path_is_the_knapsack_hull_in_order():
    """Hand-computed: per-layer (bytes, Ω) hulls and the moves cheapest-Ω-per-byte first."""
    import keras

    a = keras.layers.Dense(100, name="a")
    a.build((None, 10))   # 1000 weights
    b = keras.layers.Dense(10, name="b")
    b.build((None, 10))   # 100 weights
    omega = {"a": {"float": 0.0, "int8": 1.0, "int4": 2.0}, "b": {"float": 0.0, "int8": 0.01, "int4": 5.0}}
    path = precision.allocation_path([a, b], omega, ("float", "int8", "int4"))
    # bytes: a float 4400, int8 1000 + 800 + 400 = 2200, int4 500 + 1200 = 1700; b float 440, int8 100 + 80 + 40 = 220,
    # int4 50 + 120 = 170. Slopes: a 1.0/2200, then 1.0/500; b 0.01/220, then 4.99/50.
    assert path == [{"a": "float", "b": "float"}, {"a": "float", "b": "int8"}, {"a": "int8", "b": "int8"},
                    {"a": "int4", "b": "int8"}, {"a": "int4", "b": "int4"}]
    # a choice above the hull (int8 worse per byte than going straight to int4) is skipped
    omega["a"]["int8"] = 1.9
    assert [p["a"] for p in precision.allocation_path([a], omega, ("float", "int8", "int4"))] == ["float", "int4"]
    # measured bytes: an int16 choice with more bytes than float and more Ω is dominated, never on the path; one
    # between float and int8 in bytes is a step of its own (slopes 0.5/2000 < 0.1/200 < 1.4/500)
    omega["a"].update(int16=0.5)
    sizes = {"a": {"float": 4400, "int16": 4500, "int8": 2200, "int4": 1700}}
    choices = ("float", "int16", "int8", "int4")
    assert [p["a"] for p in precision.allocation_path([a], omega, choices, sizes)] == ["float", "int4"]
    sizes["a"]["int16"] = 2400
    omega["a"]["int8"] = 0.6
    assert [p["a"] for p in precision.allocation_path([a], omega, choices, sizes)] == ["float", "int16", "int8", "int4"]


def test_bad_targets_and_choices_are_refused_in_one_line(small):
    model, (x_train, _), (x_test, y_test) = small
    cases = [
        ({"size_budget": 0}, "size_budget must be bytes"),
        ({"size_budget": 1.5}, "size_budget must be bytes"),
        ({"size_budget": -3}, "size_budget must be bytes"),
        ({"latency_budget": 0}, "latency_budget must be milliseconds"),
        ({"max_drop": -0.1}, "max_drop must be a number >= 0"),
        ({"choices": ("int4", "int16"), "sensitivity": "hessian"}, "sensitivity='hessian' models weight rounding only"),
        ({"choices": ("int8", "int16"), "weight_rounding": "gptq"}, "'gptq' is not carried into files with int16"),
        ({"choices": ("int3", "int8")}, "choices values must be among"),
        ({"choices": ("int8",)}, "at least two different choices"),
        ({"choices": "int8"}, "choices must be a non-empty list"),
        ({"sensitivity": "fisher"}, "sensitivity must be one of"),
        ({"weight_rounding": "best"}, "weight_rounding must be"),
        ({"hutchinson_samples": 0}, "hutchinson_samples must be an int >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            precision.mixed_precision(model, x_train[:64], x_test, y_test, **kwargs)
        assert "\n" not in str(info.value), kwargs
        assert "Received" in str(info.value), kwargs


def test_unreachable_size_budget_returns_the_smallest_not_met(small, caplog):
    model, (x_train, _), (x_test, y_test) = small
    with caplog.at_level("WARNING", logger="tfq"):
        result = precision.mixed_precision(model, x_train[:256], x_test, y_test, size_budget=1000,
                                           choices=("int4", "int8"))
    assert not result.met and result.size == result.references["w4a8"]["size"] > 1000
    assert "size_budget=1000 (1,000 B) is below the smallest file" in caplog.text


def test_deterministic(small, budgeted):
    model, (x_train, _), (x_test, y_test) = small
    budget, first = budgeted
    again = precision.mixed_precision(model, x_train[:256], x_test, y_test, size_budget=budget)
    assert again.tflite == first.tflite and again.rows == first.rows


def test_latency_budget_is_measured_through_the_interpreter(small):
    from tfq.tflite.interpreter import TFLiteModel

    model, (x_train, _), (x_test, y_test) = small
    result = precision.mixed_precision(model, x_train[:256], x_test, y_test, latency_budget=50.0, max_drop=0.02,
                                       choices=("int4", "int8"))
    assert result.met and result.latency_ms is not None and result.latency_ms <= 50.0
    assert all(t["latency_ms"] is not None for t in result.trials)
    again = float(np.median(TFLiteModel(result.tflite, num_threads=1).latency_ms(x_test[:1], runs=20)))
    assert again < 50.0


def test_evaluate_reports_weight_bits_and_packed_bytes_per_variant(small, budgeted):
    model, _, (x_test, y_test) = small
    _, result = budgeted
    report = tfq.evaluate({"keras": model, "mixed": result.tflite}, x_test[:32], y_test[:32], latency=False)
    row = report.row("mixed")
    weights = _file_weights(result.tflite)
    bits = {"INT4": 4, "INT8": 8, "FLOAT32": 32}
    assert row["weight_bits_per_layer"] == {k: bits[v[0]] for k, v in weights.items()}
    assert row["weight_bytes"] == sum(v[2] for v in weights.values()) == sum(r["bytes"] for r in result.rows)
    counts = {b: sum(1 for r in result.rows if r["weight_bits"] == b) for b in (4, 8, 32)}
    assert row["weight_bits"] == " ".join(f"{b}×{n}" for b, n in counts.items() if n)
    keras_row = report.row("keras")
    assert keras_row["weight_bits"] == "32×4" and keras_row["weight_bytes"] == 4 * sum(r["params"] for r in result.rows)
    assert f"| {row['weight_bytes'] / 1024:.1f} | {row['weight_bits']} |" in report.to_markdown()


@pytest.mark.slow
def test_mobilenet_mixed_beats_uniform_w4a8_within_max_drop(trained_mobilenet):
    from conftest import tflite_accuracy

    model, (x_train, _), (x_test, y_test), float_acc = trained_mobilenet
    result = precision.mixed_precision(model, x_train[:256], x_test, y_test, max_drop=0.01)
    accuracy = tflite_accuracy(result.tflite, x_test, y_test)
    assert result.met and accuracy >= float_acc - 0.01
    assert result.size < result.references["int8"]["size"]
    assert accuracy > result.references["w4a8"]["metric"]


@pytest.mark.slow
def test_weight_rounding_is_honoured_in_every_file(small, budgeted):
    """GPTQ inside the search: the chosen file holds other integers than nearest's for the same choices."""
    model, (x_train, _), (x_test, y_test) = small
    budget, _ = budgeted
    result = precision.mixed_precision(model, x_train[:256], x_test, y_test, size_budget=budget,
                                       weight_rounding="gptq", choices=("int4", "int8"))
    assert result.recipe.weight_rounding == "gptq" and result.size <= budget
    direct = tfq.convert(model, recipe=result.recipe.replace(weight_rounding="nearest"),
                         representative_data=x_train[:256])
    assert direct != result.tflite and len(direct) == len(result.tflite)


def test_litert_runs_an_int8_int16_mix_written_by_ai_edge_quantizer(small):
    """What the "int16" choice rests on: LiteRT runs a file mixing int8 and int16 activations (written here by
    ai-edge-quantizer directly, per-op 16-bit activations on fc1) at the float model's accuracy."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import qtyping, quantizer

    model, (x_train, _), (x_test, y_test) = small
    q = quantizer.Quantizer(tfq.convert(model, "float"))
    q.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 8, 8)
    q.add_static_config(".*fc1.*", qtyping.TFLOperationName.FULLY_CONNECTED, 16, 8)
    signature = next(iter(Interpreter(model_content=tfq.convert(model, "float")).get_signature_list().items()))
    data = {signature[0]: [{signature[1]["inputs"][0]: x_train[i:i + 1]} for i in range(64)]}
    content = bytes(q.quantize(q.calibrate(data), enable_progress_report=False).quantized_model)
    info = tfq.inspect_tflite(content)
    fc_inputs = [info.tensors[op.inputs[0]].dtype for op in info.ops if op.type == "FULLY_CONNECTED"]
    assert sorted(fc_inputs) == ["INT16", "INT8", "INT8"]
    assert [info.tensors[op.inputs[0]].dtype for op in info.ops if op.type == "QUANTIZE"].count("INT16") == 1
    out = tfq.tflite.interpreter.TFLiteModel(content).predict(x_test)
    float_acc = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    assert (out.argmax(1) == y_test).mean() >= float_acc - 0.01


@pytest.fixture(scope="module")
def int16_curve(small):
    model, (x_train, _), (x_test, y_test) = small
    return precision.budget_curve(model, x_train[:256], x_test, y_test, choices=("int4", "int8", "int16"))


def _litert_layer_types(content: bytes, names=("conv", "fc1", "fc2", "probs")) -> dict[str, tuple]:
    """``{layer: (input dtype, weight dtype, output dtype)}`` of each CONV_2D / FULLY_CONNECTED op: tensors found
    with LiteRT's flatbuffer schema, dtypes from LiteRT's interpreter (``get_tensor_details``)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    dtype = {d["index"]: np.dtype(d["dtype"]) for d in interp.get_tensor_details()}
    model = schema.Model.GetRootAs(content, 0)
    sg = model.Subgraphs(0)
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        if codes[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())] not in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                                "FULLY_CONNECTED"):
            continue
        weight = sg.Tensors(op.Inputs(1)).Name().decode()
        layer = next(n for n in names if f"/{n}_1/" in weight)
        out[layer] = (dtype[op.Inputs(0)], dtype[op.Inputs(1)], dtype[op.Outputs(0)])
    return out


def test_int16_choice_gives_int16_activations_in_litert_and_the_accuracy_of_an_independent_loop(small, int16_curve):
    from conftest import tflite_accuracy

    model, (x_train, _), (x_test, y_test) = small
    point = next(p for p in int16_curve["path"] if p["counts"]["int16"] == 1 and p["counts"]["int8"] >= 1)
    result = precision.mixed_precision(model, x_train[:256], x_test, y_test, choices=("int4", "int8", "int16"),
                                       size_budget=point["size"])
    assert result.assignment == point["assignment"] and result.size == point["size"] and result.met
    (chosen,) = [n for n, c in result.assignment.items() if c == "int16"]
    assert result.settings["route"] == "below_keras" and result.settings["int16_layers"] == [chosen]
    types = _litert_layer_types(result.tflite)
    assert set(types) == set(result.assignment)
    for layer, choice in result.assignment.items():
        act = np.int16 if choice == "int16" else np.int8
        assert types[layer][0] == act and types[layer][2] == act, (layer, choice, types[layer])
        if choice != "int4":  # (INT4 weights: checked by the table's bits and bytes below)
            assert types[layer][1] == np.int8, (layer, choice, types[layer])
    for row in result.rows:  # the table reads the file
        assert row["activation_bits"] == (16 if row["choice"] == "int16" else 8), row
        assert row["weight_bits"] == (4 if row["choice"] == "int4" else 8), row
        assert row["bytes"] == (row["params"] + 1) // 2 if row["choice"] == "int4" else row["params"], row
    assert result.metric == pytest.approx(tflite_accuracy(result.tflite, x_test, y_test), abs=1e-12)
    again = precision.mixed_precision(model, x_train[:256], x_test, y_test, choices=("int4", "int8", "int16"),
                                      size_budget=point["size"])
    assert again.tflite == result.tflite  # deterministic


def test_int4_layers_of_int16_files_hold_tfq_nearest_integers(small, int16_curve):
    """The 4-bit weights on the below-Keras route are the integers and scales the Keras route writes (nearest)."""
    from tfq.tflite.int4 import int4_tensors

    model, (x_train, _), _ = small
    point = next(p for p in int16_curve["path"] if p["counts"]["int16"] >= 1 and p["counts"]["int4"] >= 1)
    assignment = point["assignment"]
    search = precision._prepare(model, x_train[:256], x_train[:8], np.zeros(8), "accuracy", None, "nearest", 1,
                                False, "test", below_keras=True)
    below = {t.name.split(";")[0].split("/")[1]: t for t in int4_tensors(search.convert(assignment))}
    keras_route = tfq.convert(model, recipe=search.recipe(assignment), representative_data=x_train[:256])
    keras_int4 = {t.name.split(";")[0].split("/")[1]: t for t in int4_tensors(keras_route)}
    int4_layers = {f"{n}_1" for n, c in assignment.items() if c == "int4"}
    assert set(below) == int4_layers and set(keras_int4) == int4_layers
    for name in int4_layers:
        np.testing.assert_array_equal(below[name].values.reshape(len(below[name].scales), -1),
                                      keras_int4[name].values.reshape(len(keras_int4[name].scales), -1))
        np.testing.assert_allclose(below[name].scales, keras_int4[name].scales, rtol=1e-6)


def test_layer_ops_maps_conv_depthwise_and_dense_layers_by_weight_names():
    """Each Keras layer → its op in the float .tflite (BN folded into the kernel): the op type and the weight's
    shape in TFLite's layout, for names that prefix one another."""
    import keras

    from tfq.tflite.info import inspect_tflite

    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.ReLU(6.0, name="conv_relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(6.0, name="dw_relu")(x)
    x = keras.layers.Conv2D(6, 1, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(5, name="fc")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc2")(x), name="net")
    content = tfq.convert(model, "float")
    info = inspect_tflite(content)
    ops = precision.layer_ops(content, ["conv", "dw", "conv2", "fc", "fc2"])
    expected = {"conv": ("CONV_2D", (4, 3, 3, 2)), "dw": ("DEPTHWISE_CONV_2D", (1, 3, 3, 4)),
                "conv2": ("CONV_2D", (6, 1, 1, 4)), "fc": ("FULLY_CONNECTED", (5, 6)), "fc2": ("FULLY_CONNECTED", (3, 5))}
    for layer, (index, weight) in ops.items():
        op = info.ops[index]
        assert (op.type, tuple(info.tensors[op.inputs[1]].shape)) == expected[layer], layer
        assert info.tensors[op.inputs[1]].name == weight
    assert len({i for i, _ in ops.values()}) == 5
    with pytest.raises(ValueError, match="layer 'dense': expected one CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED op") as err:
        precision.layer_ops(content, ["dense"])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_mobilenet_int16_layers_conv_and_depthwise_run_int16_in_litert(trained_mobilenet):
    from conftest import tflite_accuracy

    model, (x_train, _), (x_test, y_test), _ = trained_mobilenet
    curve = precision.budget_curve(model, x_train[:256], x_test, y_test, choices=("int8", "int16"))
    names = list(curve["path"][0]["assignment"])
    assert all(c == "int16" for c in curve["path"][0]["assignment"].values())
    point = curve["path"][len(curve["path"]) // 2]  # about half the layers int16
    result = precision.mixed_precision(model, x_train[:256], x_test, y_test, choices=("int8", "int16"),
                                       size_budget=point["size"])
    sizes = [p["size"] for p in curve["path"]]
    assert result.size <= point["size"] and result.assignment in [p["assignment"] for p in curve["path"]], sizes
    assert {"int8", "int16"} <= set(result.assignment.values()), sizes
    types = _litert_layer_types(result.tflite, names)
    assert set(types) == set(names)
    for layer, choice in result.assignment.items():
        act = np.int16 if choice == "int16" else np.int8
        assert types[layer] == (act, np.int8, act), (layer, choice, types[layer])
    assert {type(model.get_layer(n)).__name__ for n in result.settings["int16_layers"]} <= {"Conv2D", "DepthwiseConv2D",
                                                                                          "Dense"}
    assert result.metric == pytest.approx(tflite_accuracy(result.tflite, x_test, y_test), abs=1e-12)
