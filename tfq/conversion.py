"""Keras model → TFLite, in every mode, with tfq's calibration deciding INT8 ranges.

INT8 export rewrites the model (:func:`tfq.qat.transform.rewrite_model`), calibrates it, fixes
every fake-quant range and hands the graph to the TFLite converter, which turns the fake-quant
ranges into the tensors' scales: the ranges tfq chose are the ones in the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings

import keras

from tfq.calibration import Calibration, calibrate
from tfq.fileio import atomic_write_bytes
from tfq.models import SavedModelPath, is_quantized_model, is_tf_keras_model, load_model
from tfq.recipes import MODES, Recipe, TensorSpec, load_recipe

__all__ = ["convert", "ConversionError", "fake_quantize"]


class ConversionError(ValueError):
    """The TFLite converter refused the model; the message says which op and what to do."""


def _tf():
    import tensorflow as tf

    return tf


def _io_type(io_dtype: str):
    tf = _tf()
    return {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16}[io_dtype]


def _summarize_converter_error(text: str, mode: str, model=None) -> str:
    cause = _first_error_line(text)
    if "TensorList" in text:
        rnns = [f"{layer.name!r} ({type(layer).__name__})" for layer in _all_layers(model)
                if isinstance(layer, keras.layers.RNN)] if model is not None else []
        where = f"recurrent layer {rnns[0]}" if rnns else "a recurrent layer"
        return (f"{where} loops over a sequence of unknown length, which TFLite cannot run in {mode} (the converter "
                f"said: {cause}). Give the model a fixed number of time steps (keras.Input(shape=(steps, "
                f"features))): tfq then unrolls it.")
    op = re.search(r"'(tfl?\.\w+)' op", text)
    op_name = op.group(1) if op else None
    if "neither a custom op nor a flex op" in text or "is not supported" in text or "Failed to" in text:
        hint = (f"op {op_name!r} cannot run in {mode}" if op_name else f"an op cannot run in {mode}")
        return (f"{hint}: keep the layer that makes it in float (float_layers=[...]) or use mode='dynamic'. "
                f"Converter said: {cause}")
    return f"the TFLite converter failed: {cause}"


def _first_error_line(text: str) -> str:
    """The converter's first error, without the MLIR location that precedes it."""
    for line in text.splitlines():
        if "error:" in line:
            return " ".join(line.split("error:", 1)[1].split())[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no message"


@contextlib.contextmanager
def _captured_stderr():
    """Redirects the process's stderr (file descriptor 2, where the converter's C++ code writes its
    progress and its errors) into a buffer; yields a list that receives the text."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _run_converter(converter, mode: str, model=None) -> bytes:
    # The converter prints its SavedModel export and its progress; keep a library call quiet.
    sink = io.StringIO()
    failure = None
    with _captured_stderr() as stderr:
        try:
            with contextlib.redirect_stdout(sink), warnings.catch_warnings():
                # Emitted for every fake-quant graph with integer I/O; the ranges come from the graph.
                warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
                return converter.convert()
        except Exception as err:  # ConverterError and friends
            failure = str(err)
    raise ConversionError(_summarize_converter_error(failure + "\n" + "".join(stderr), mode, model)) from None


def _keras_converter(model: keras.Model):
    tf = _tf()
    if isinstance(model, SavedModelPath):
        return tf.lite.TFLiteConverter.from_saved_model(str(model))
    return tf.lite.TFLiteConverter.from_keras_model(_with_list_inputs(model))


def _with_list_inputs(model: keras.Model) -> keras.Model:
    """A model built on a dict of inputs (keras-hub backbones), taking them as a list instead.

    The converter traces a Functional model with its inputs as a list, which such a model
    refuses; the wrapper's inputs keep the dict's names (the ``.tflite`` signature's input names)
    in ``model.inputs`` order, so representative data in that order fits it.
    """
    structure = model.input if isinstance(model, keras.Model) else None
    if not isinstance(structure, dict):
        return model
    names = sorted(structure)
    inputs = [keras.Input(batch_shape=structure[k].shape, dtype=structure[k].dtype, name=k) for k in names]
    return keras.Model(inputs, model(dict(zip(names, inputs))), name=model.name)


def _build_recipe(mode, recipe, calibration, per_channel, io_dtype, float_layers, num_calibration_samples,
                  methods=None) -> Recipe:
    """The recipe of a conversion; ``methods`` (equalize, bias_correction, …: None = not given)
    replace the recipe's own values."""
    methods = {k: v for k, v in (methods or {}).items() if v is not None}
    if recipe is not None:
        r = load_recipe(recipe)
        if mode is not None and mode != r.mode:
            raise ValueError(f"mode={mode!r} conflicts with the recipe's mode {r.mode!r}. Pass one of them.")
        if float_layers:
            r = r.replace(float_layers=tuple(r.float_layers) + tuple(_layer_patterns(float_layers)))
        return r.replace(**methods) if methods else r
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
    method = calibration if isinstance(calibration, str) else "minmax"
    weights = None
    if mode in ("int8", "int16x8", "dynamic"):
        weights = TensorSpec(per_channel=bool(per_channel))
    return Recipe(mode=mode, weights=weights, calibration=method, io_dtype=io_dtype,
                  float_layers=tuple(_layer_patterns(float_layers)), num_calibration_samples=num_calibration_samples,
                  **methods)


def _check_methods(model, r: Recipe, data, calibration, report=None) -> None:
    """Refuses, in one line, the methods beyond calibration where they cannot apply."""
    from tfq.ptq_methods import MethodsReport, uses_methods

    if report is not None and not isinstance(report, MethodsReport):
        raise TypeError(f"report must be a tfq.MethodsReport (or None). Received: {type(report).__name__}")
    on = uses_methods(r)
    if not on:
        return
    names = ", ".join(on)
    if isinstance(model, SavedModelPath):
        raise ValueError(f"{names} need a Keras model that tfq can rewrite; {str(model)!r} is a SavedModel. "
                         f"Pass the .keras file.")
    if is_quantized_model(model):
        raise ValueError(f"{names} apply to a float model, and {model.name!r} is already a tfq QAT model. Apply them "
                         f"before QAT (e.g. tfq.qat.quantize_model(tfq.equalize(model))) or convert without them.")
    if r.data_free_method and data is not None:
        raise ValueError("data_free takes activation ranges without data, so it excludes representative_data. "
                         "Pass representative_data=None, or data_free=False to calibrate on your data.")
    if isinstance(calibration, Calibration) and (r.equalize or r.data_free_method):
        raise ValueError(f"{'equalize' if r.equalize else 'data_free'} chooses the ranges itself, so it cannot use a "
                         f"precomputed calibration. Pass calibration as a method name, or calibrate the equalized "
                         f"model (tfq.calibrate(tfq.equalize(model), ...)) and convert that.")


def _layer_patterns(float_layers) -> list[str]:
    """Names/regexes stay; layer classes become ``class:Name``."""
    out = []
    for item in float_layers:
        if isinstance(item, type):
            out.append(f"class:{item.__name__}")
        elif isinstance(item, str):
            out.append(item)
        else:
            raise TypeError(f"float_layers items are names, regexes or layer classes. Received: {item!r}")
    return out


def convert(
    model,
    mode: str | None = "int8",
    representative_data=None,
    *,
    recipe=None,
    calibration="minmax",
    per_channel: bool = True,
    io_dtype: str = "float32",
    float_layers=(),
    num_calibration_samples: int | None = None,
    output=None,
    calibration_params: dict | None = None,
    verbose: bool = False,
    equalize: bool | None = None,
    bias_correction: bool | str | None = None,
    weight_rounding: str | None = None,
    data_free: bool | str | None = None,
    report=None,
) -> bytes:
    """Converts a Keras model to TFLite.

    Args:
        model: a Keras 3 or tf_keras model, a tfq QAT model, or a path to ``.keras``/SavedModel.
        mode: ``"float"``, ``"dynamic"`` (int8 weights, float activations), ``"fp16"``,
            ``"int8"`` (full integer) or ``"int16x8"``. May be None when ``recipe`` is given.
        representative_data: calibration data for ``"int8"``/``"int16x8"`` (arrays, dict,
            ``tf.data.Dataset`` or callable). Not needed for a trained QAT model.
        recipe: a :class:`~tfq.recipes.Recipe`, preset name or file; overrides the keyword
            choices below except ``float_layers`` (added to the recipe's).
        calibration: a method name (``"minmax"``, ``"moving_average"``, ``"kl"``,
            ``"percentile"``, ``"mse"``) or a :class:`~tfq.Calibration` from :func:`tfq.calibrate`.
        per_channel: per-output-channel weight scales for convolutions.
        io_dtype: model input/output type: ``"float32"``, ``"int8"``, ``"uint8"`` (int8 mode) or
            ``"int16"`` (int16x8 mode).
        float_layers: layer names, regexes or classes kept float inside an INT8 model.
        num_calibration_samples: cap on calibration samples.
        output: if given, the model is also written there atomically.
        calibration_params: method parameters (e.g. ``{"percentile": 99.9}``).
        verbose: show calibration progress.
        equalize: cross-layer equalization and high-bias absorption first (:func:`tfq.equalize`);
            int8/int16x8.
        bias_correction: correct each layer's mean output shift from weight quantization:
            ``"empirical"`` (calibration data), ``"analytical"`` (BatchNorm statistics) or True
            (empirical; analytical with ``data_free``); int8.
        weight_rounding: ``"nearest"``, ``"adaround"`` or ``"gptq"``: each weight's integer
            learned on the calibration data, written as is into the ``.tflite``; int8.
        data_free: ranges without calibration data, from BatchNorm statistics: True /
            ``"synthetic"`` (ZeroQ-style synthetic inputs) or ``"bn_statistics"``; pass
            ``representative_data=None``. int8/int16x8.
            These four default to the recipe's values (off); given here, they replace them. They
            are refused for float/fp16/dynamic modes, SavedModels, tfq QAT and tfmot models.
        report: a :class:`tfq.MethodsReport` to fill in with what those methods did
            (seconds per method, the integers chosen per layer, the bias shifts).

    Returns:
        The ``.tflite`` flatbuffer bytes. Same inputs give the same bytes.

    Raises:
        ValueError: bad mode/io_dtype/calibration, missing data, data that does not fit the model.
        ConversionError: the converter refused an op (the message names it and the fix).
        FileNotFoundError: a model path that does not exist.

    Example:
        >>> tflite = tfq.convert(model, "int8", x_train[:300], calibration="kl")   # doctest: +SKIP
        >>> tflite = tfq.convert(model, "int8", None, data_free=True, equalize=True,
        ...                      bias_correction="analytical")                    # doctest: +SKIP
    """
    methods = dict(equalize=equalize, bias_correction=bias_correction, weight_rounding=weight_rounding,
                   data_free=data_free)
    model = load_model(model)
    if is_tf_keras_model(model):
        from tfq.interop import convert_tfmot_model, is_tfmot_qat_model, to_keras3

        if is_tfmot_qat_model(model):
            # tfmot's own fake-quant ops carry the ranges: tfq's recipe and calibration do not apply.
            given = [k for k, v in methods.items() if v is not None]
            if recipe is not None or float_layers or isinstance(calibration, Calibration) or given:
                raise ValueError(
                    f"model {model.name!r} is a tfmot QAT model: its ranges come from tfmot's fake-quant ops, "
                    f"so recipe, float_layers, calibration{', ' + ', '.join(given) if given else ''} do not apply. "
                    f"Pass mode='int8' and io_dtype only."
                )
            content = convert_tfmot_model(model, "int8" if mode is None else mode, io_dtype)
            if output is not None:
                atomic_write_bytes(output, content)
            return content
        model = to_keras3(model)
    from tfq._compression import strip_all

    model = strip_all(model)  # pruning/clustering wrappers: convert the weights they compute with
    r = _build_recipe(mode, recipe, calibration, per_channel, io_dtype, float_layers, num_calibration_samples, methods)
    _check_methods(model, r, representative_data, calibration, report)
    params = dict(r.calibration_params)
    params.update(calibration_params or {})
    if r.mode in ("float", "dynamic", "fp16"):
        content = _convert_float_family(model, r)
    elif r.mode == "int16x8":
        content = _convert_int16x8(model, r, representative_data, report)
    else:
        content = _convert_int8(model, r, representative_data, calibration, params, verbose, report)
    if output is not None:
        atomic_write_bytes(output, content)
    return content


def fake_quantize(
    model,
    mode: str | None = "int8",
    representative_data=None,
    *,
    recipe=None,
    calibration="minmax",
    per_channel: bool = True,
    float_layers=(),
    num_calibration_samples: int | None = None,
    calibration_params: dict | None = None,
    verbose: bool = False,
    equalize: bool | None = None,
    bias_correction: bool | str | None = None,
    weight_rounding: str | None = None,
    data_free: bool | str | None = None,
    report=None,
) -> keras.Model:
    """The fake-quant Keras model that :func:`convert` hands to the TFLite converter, for simulation.

    Same arguments as :func:`convert` (int8 and int16x8 recipes). The model computes in float with
    every quantization simulated (weights on their integer grid, activations on their ranges), so
    it also evaluates recipes TFLite cannot run (``allow_non_tflite=True``, e.g. 4-bit weights) —
    with the same calibration, equalization, learned rounding and bias correction as the export.

    Returns:
        A new ``keras.Model`` with fixed ranges (the caller's model is untouched).

    Example:
        >>> w4a8 = tfq.Recipe(weights=tfq.TensorSpec(bits=4), allow_non_tflite=True, weight_rounding="adaround")
        >>> sim = tfq.fake_quantize(model, recipe=w4a8, representative_data=x_train[:256])   # doctest: +SKIP
        >>> sim.predict(x_test)                                                              # doctest: +SKIP
    """
    methods = dict(equalize=equalize, bias_correction=bias_correction, weight_rounding=weight_rounding,
                   data_free=data_free)
    model = load_model(model)
    if isinstance(model, SavedModelPath):
        raise ValueError(f"fake_quantize needs a Keras model that tfq can rewrite; {str(model)!r} is a SavedModel. "
                         f"Pass the .keras file.")
    if is_tf_keras_model(model):
        from tfq.interop import to_keras3

        model = to_keras3(model)
    r = _build_recipe(mode, recipe, calibration, per_channel, "float32", float_layers, num_calibration_samples,
                      methods)
    if r.mode not in ("int8", "int16x8"):
        raise ValueError(f"fake_quantize simulates integer models: mode must be 'int8' or 'int16x8'. "
                         f"Received: mode={r.mode!r}")
    _check_methods(model, r, representative_data, calibration, report)
    params = dict(r.calibration_params)
    params.update(calibration_params or {})
    return _frozen_int8_model(model, r, representative_data, calibration, params, verbose, report)


def _strip_quantization(model):
    """The float model under a tfq QAT model: float/fp16/dynamic export of a QAT model."""
    from tfq.qat.transform import freeze_model, quantizers_of

    return freeze_model(model, {}, strip=True) if quantizers_of(model) else model


def _convert_float_family(model, r: Recipe) -> bytes:
    tf = _tf()
    if is_quantized_model(model):
        model = _strip_quantization(model)
    model = _with_unrolled_rnns(model, r.mode)
    converter = _keras_converter(model)
    if r.mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif r.mode == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return _run_converter(converter, r.mode, model)


def _with_unrolled_rnns(model, mode: str):
    """``model`` with its recurrent layers copied as ``unroll=True`` where the number of time steps
    is static: the converter cannot lower Keras 3's recurrent loop (TensorList ops) in any mode.
    Other layers are shared, not copied; the caller's model is untouched."""
    if not isinstance(model, keras.Model):
        return model
    loops = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.RNN) and not layer.unroll
             and _static_steps(layer)]
    if not loops:
        return model
    pairs = []

    def clone(layer):
        if isinstance(layer, keras.Model) and any(inner in loops for inner in _all_layers(layer)):
            return keras.models.clone_model(layer, clone_function=clone)
        if layer in loops:
            copy = layer.__class__.from_config(dict(layer.get_config(), unroll=True))
            pairs.append((layer, copy))
            return copy
        return layer

    unrolled = keras.models.clone_model(model, clone_function=clone)
    for layer, copy in pairs:
        copy.set_weights(layer.get_weights())
    warnings.warn(
        f"tfq: {type(loops[0]).__name__} layer(s) {', '.join(repr(layer.name) for layer in loops[:4])} unrolled over "
        f"their time steps for {mode} export (the converter cannot lower Keras's recurrent loop).",
        stacklevel=4,
    )
    return unrolled


def _static_steps(layer) -> bool:
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) >= 2 and shape[1] is not None


def _require_data(data, mode):
    if data is None:
        raise ValueError(
            f"mode={mode!r} needs representative_data (a few hundred typical inputs) to choose activation ranges. "
            f"Pass representative_data=x_train[:300], or a trained tfq QAT model."
        )


def _convert_int16x8(model, r: Recipe, data, report=None) -> bytes:
    from tfq.data import representative_dataset

    from tfq import ptq_methods

    tf = _tf()
    if is_quantized_model(model):
        model = _strip_quantization(model)
    model = ptq_methods.prepare_model(model, r, report)
    if r.data_free_method:
        from tfq.qat.transform import rewrite_model

        data = ptq_methods.calibration_inputs(rewrite_model(model, "int8", warn_unknown=False), r, data, report)
    _require_data(data, "int16x8")
    rep = representative_dataset(data, r.num_calibration_samples, model=None if isinstance(model, str) else model)
    converter = _keras_converter(_with_unrolled_rnns(model, "int16x8"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = rep
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    if r.io_dtype != "float32":
        converter.inference_input_type = _io_type(r.io_dtype)
        converter.inference_output_type = _io_type(r.io_dtype)
    return _run_converter(converter, "int16x8", model)


def _convert_int8(model, r: Recipe, data, calibration, params, verbose, report=None) -> bytes:
    from tfq.qat.transform import uncovered_layers

    if isinstance(model, SavedModelPath):
        return _convert_saved_model_int8(model, r, data)
    frozen, qmodel, data = _prepare_int8(model, r, data, calibration, params, verbose, report)
    uncovered = uncovered_layers(qmodel)
    content = _int8_converter_run(frozen, r, data if uncovered else None)
    float_ops = _unexpected_float_ops(content, r)
    if float_ops and not uncovered and data is not None:
        # Some op the converter made has no fake-quant range: let it calibrate that op too.
        content = _int8_converter_run(frozen, r, data)
        float_ops = _unexpected_float_ops(content, r)
    if float_ops and uncovered and data is None:
        class_name, names = sorted(uncovered.items())[0]
        raise ValueError(
            f"layer {names[0]!r} ({class_name}) has inner tensors tfq does not quantize itself (no rule, and its "
            f"call could not be decomposed), and {len(float_ops)} op(s) stayed float: pass representative_data "
            f"to tfq.convert, from which the TFLite converter calibrates them."
        )
    if float_ops:
        _warn_float_ops(float_ops, model)
    return content


def _int8_converter_run(frozen, r: Recipe, data) -> bytes:
    """One TFLite conversion of a frozen fake-quant model.

    Without ``data`` every range comes from the fake-quant ops. With it, the converter also
    calibrates (MinMax) every tensor that has no fake-quant range — the inside of layers tfq keeps
    whole — and keeps float only the ops that have no int8 kernel.
    """
    from tfq.data import representative_dataset

    tf = _tf()
    converter = _keras_converter(frozen)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = _io_type(r.io_dtype)
    converter.inference_output_type = _io_type(r.io_dtype)
    if data is not None:
        converter.representative_dataset = representative_dataset(data, r.num_calibration_samples, model=frozen)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    return _run_converter(converter, "int8", frozen)


def _frozen_int8_model(model, r: Recipe, data, calibration, params, verbose, report=None) -> keras.Model:
    """The fake-quant Keras model with fixed ranges that the converter turns into the INT8 ``.tflite``."""
    return _prepare_int8(model, r, data, calibration, params, verbose, report)[0]


def _prepare_int8(model, r: Recipe, data, calibration, params, verbose, report=None):
    """(frozen model, the fake-quant model it was frozen from, the calibration data actually used)."""
    from tfq import ptq_methods
    from tfq.qat.transform import freeze_model, quantizers_of, rewrite_model

    ranges = None
    if is_quantized_model(model):
        qmodel = model
        # A trained QAT model carries its ranges; only quantizers that never saw data need calibrating.
        needs_calibration = any(q.mode != "fixed" and float(keras.ops.convert_to_numpy(q.initialized)) < 0.5
                                for q in quantizers_of(qmodel).values())
    else:
        qmodel = rewrite_model(ptq_methods.prepare_model(model, r, report), r)
        needs_calibration = not isinstance(calibration, Calibration)
        if not needs_calibration:
            ranges = calibration.ranges
            missing = sorted(n for n, q in quantizers_of(qmodel).items() if q.mode != "fixed" and n not in ranges)
            if missing:
                raise ValueError(
                    f"the calibration has no range for {len(missing)} tensor(s) of this model (e.g. {missing[0]!r}): "
                    f"it was made for another model or recipe. Re-run tfq.calibrate on this model."
                )
        data = ptq_methods.calibration_inputs(qmodel, r, data, report)
    if needs_calibration:
        _require_data(data, "int8")
        ranges = calibrate(qmodel, data, r.calibration, num_samples=r.num_calibration_samples,
                           verbose=verbose, **params).ranges
        ranges.update(ptq_methods.data_free_ranges(qmodel, r))
    frozen = freeze_model(qmodel, ranges)
    ptq_methods.apply_weight_methods(frozen, r, data, report)
    return frozen, qmodel, data


def _unexpected_float_ops(content: bytes, r: Recipe) -> list:
    """Float compute ops of an INT8 model, unless the recipe keeps some layers float."""
    from tfq.inspect import inspect_tflite

    if r.float_layers or any(o.float for o in r.overrides):
        return []
    info = inspect_tflite(content)
    return [(op, info.tensors[op.outputs[0]].name if op.outputs else "?") for op in info.float_ops]


def _warn_float_ops(float_ops, model) -> None:
    """One warning: the ops TFLite could not make int8 (no int8 kernel), with the layers they come from."""
    layer_names = sorted((layer.name for layer in _all_layers(model)), key=len, reverse=True)
    by_type: dict[str, set] = {}
    for op, tensor in float_ops:
        layer = next((n for n in layer_names if n in tensor), tensor)
        by_type.setdefault(op.type, set()).add(layer)
    detail = "; ".join(f"{t} in {', '.join(sorted(v)[:4])}" for t, v in sorted(by_type.items()))
    warnings.warn(
        f"tfq: {len(float_ops)} op(s) stay float because TFLite has no int8 kernel for them ({detail}). The rest "
        f"of the model is int8; list those layers in float_layers to accept this, or replace them.",
        stacklevel=3,
    )


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _convert_saved_model_int8(path, r: Recipe, data) -> bytes:
    """A SavedModel has no Keras graph to rewrite: the converter's own MinMax calibration is used."""
    from tfq.data import representative_dataset

    tf = _tf()
    _require_data(data, "int8")
    if r.calibration != "minmax":
        raise ValueError(
            f"calibration={r.calibration!r} needs a Keras model (.keras) that tfq can rewrite; a SavedModel is "
            f"calibrated by the TFLite converter with 'minmax' only. Pass the .keras file or calibration='minmax'."
        )
    converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(data, r.num_calibration_samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = _io_type(r.io_dtype)
    converter.inference_output_type = _io_type(r.io_dtype)
    return _run_converter(converter, "int8")
