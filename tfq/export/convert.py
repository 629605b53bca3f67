"""Keras model → TFLite, in every mode, with tfq's calibration deciding INT8 ranges.

INT8 export rewrites the model (:func:`tfq.quantsim.rewrite.rewrite_model`), calibrates it, fixes
every fake-quant range and hands the graph to the TFLite converter, which turns the fake-quant
ranges into the tensors' scales: the ranges tfq chose are the ones in the file.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping

import keras

from tfq.compression.common import strip_all
from tfq.core.calibration_methods import DEFAULT_CALIBRATION, get_calibration_method
from tfq.core.export_modes import CONVERT_OPTIONS, ExportMode, get_export_mode
from tfq.core.fileio import atomic_write_bytes, check_writable
from tfq.core.logs import verbosity
from tfq.core.messages import check_bool, short_repr
from tfq.core.process_lock import serialized
from tfq.core.ptq_methods import RANGE_STAGES, get_ptq_method, methods_at
from tfq.core.recipes import Recipe, TensorSpec, load_recipe
from tfq.core.representative import representative_dataset
from tfq.export import check as checker
from tfq.export import tflite_frontend
from tfq.export.graph_converter import keras_graph_converter
from tfq.export.int4 import (
    blockwise_integers,
    float_activation_weights,
    snap_four_bit_kernels,
    write_float_activation_int4,
    write_int4_weights,
)
from tfq.models.interop import convert_tfmot_model, load_keras_model
from tfq.models.loading import (
    SavedModelPath,
    check_saved_model_complete,
    is_quantized_model,
    is_tf_keras_model,
)
from tfq.numerics.outliers import (
    input_outlier_samples,
    warn_outlier_samples,
    without_samples,
)
from tfq.ptq import pipeline as ptq_methods
from tfq.ptq.calibration import Calibration, calibrate, check_ranges
from tfq.ptq.pipeline import MethodsReport, uses_methods, uses_stage
from tfq.quantsim.rewrite import (
    fix_ranges_in_place,
    freeze_model,
    quantizers_of,
    rewrite_model,
    uncovered_layers,
)
from tfq.tflite.converter import ConversionError, run_converter
from tfq.tflite.info import inspect_tflite

__all__ = ["convert", "ConversionError", "fake_quantize"]


def _tf():
    import tensorflow as tf

    return tf


def _keras_converter(model: keras.Model):
    tf = _tf()
    if isinstance(model, SavedModelPath):
        check_saved_model_complete(model)
        return tf.lite.TFLiteConverter.from_saved_model(str(model))
    return tf.lite.TFLiteConverter.from_keras_model(_with_list_inputs(model))


def _with_list_inputs(model: keras.Model) -> keras.Model:
    """A model built on a dict of inputs (keras-hub backbones), taking them as a list instead.

    The converter traces a Functional model with its inputs as a list, which such a model
    refuses; the wrapper's inputs keep the dict's names (the ``.tflite`` signature's input names)
    in ``model.inputs`` order, so representative data in that order fits it.
    """
    if not isinstance(model, keras.Model) or isinstance(model, keras.Sequential):
        return model  # a Sequential model has one input (and no .input until called in Keras 3)
    structure = model.input
    if not isinstance(structure, dict):
        return model
    names = sorted(structure)
    inputs = [keras.Input(batch_shape=structure[k].shape, dtype=structure[k].dtype, name=k) for k in names]
    return keras.Model(inputs, model(dict(zip(names, inputs))), name=model.name)


def _float_layer_patterns(float_layers) -> list[str]:
    """``float_layers`` as recipe patterns: a bare string is one pattern; names/regexes stay; classes become
    ``class:Name``."""
    if isinstance(float_layers, str):
        return [float_layers]
    if isinstance(float_layers, type):
        float_layers = [float_layers]
    if not isinstance(float_layers, (list, tuple, set, frozenset)):
        raise TypeError(f"float_layers must be a list of layer names, regexes or layer classes (or one name). "
                        f"Received: float_layers={short_repr(float_layers)}")
    out = []
    for item in float_layers:
        if isinstance(item, type):
            out.append(f"class:{item.__name__}")
        elif isinstance(item, str):
            out.append(item)
        else:
            raise TypeError(f"float_layers items are names, regexes or layer classes. Received: {short_repr(item)}")
    return out


def _check_keywords(calibration, calibration_params, per_channel, verbose, output) -> None:
    """Types of the keyword options, checked before any work (one line each)."""
    if not isinstance(calibration, (str, Calibration)):
        raise TypeError(f"calibration must be a method name (e.g. 'kl') or a tfq.Calibration from tfq.calibrate. "
                        f"Received: calibration={short_repr(calibration)} ({type(calibration).__name__})")
    if calibration_params is not None and not isinstance(calibration_params, Mapping):
        raise TypeError(f"calibration_params must be a dict of method parameters (e.g. {{'percentile': 99.9}}) or "
                        f"None. Received: calibration_params={short_repr(calibration_params)}")
    if isinstance(calibration, Calibration) and calibration_params:
        raise ValueError(f"calibration_params={dict(calibration_params)!r} set how tfq calibrates, but calibration is "
                         f"a tfq.Calibration whose ranges are chosen already: drop calibration_params, or pass "
                         f"calibration={calibration.method!r} to calibrate again.")
    for name, value in (("per_channel", per_channel), ("verbose", verbose)):
        check_bool(name, value)
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"output must be a file path or None. Received: output={short_repr(output)}")


def _build_recipe(mode, recipe, calibration, per_channel, io_dtype, float_layers, num_calibration_samples,
                  methods=None, calibration_params=None) -> Recipe:
    """The recipe of a conversion: the recipe given (keyword options that differ from it are refused,
    ``float_layers`` added, ``calibration_params`` merged, ``num_calibration_samples`` and the
    ``methods`` given replace its values), or one built from the keyword options (``mode`` None: int8)."""
    methods = {k: v for k, v in (methods or {}).items() if v is not None}
    method = calibration if isinstance(calibration, str) else None
    if method is not None:
        get_calibration_method(method)  # a one-line error naming the registered methods
    patterns = _float_layer_patterns(float_layers)
    if recipe is not None:
        r = load_recipe(recipe)
        for name, given, default, theirs in (
            ("mode", mode, None, r.mode),
            ("calibration", method, DEFAULT_CALIBRATION, r.calibration),
            ("io_dtype", io_dtype, "float32", r.io_dtype),
        ):
            if given is not None and given != default and given != theirs:
                raise ValueError(f"{name}={given!r} conflicts with the recipe's {name} {theirs!r}. Pass one of them "
                                 f"(e.g. recipe.replace({name}={given!r})).")
        if per_channel is False and r.weights.is_integer and r.weights.per_channel:
            raise ValueError("per_channel=False conflicts with the recipe's per-channel weights. Pass one of them "
                             "(e.g. a recipe with weights=TensorSpec(per_channel=False)).")
        changes = {}
        if patterns:
            changes["float_layers"] = tuple(r.float_layers) + tuple(patterns)
        if calibration_params:
            changes["calibration_params"] = {**r.calibration_params, **calibration_params}
        if num_calibration_samples is not None:
            changes["num_calibration_samples"] = num_calibration_samples
        r = r.with_methods(methods) if methods else r
        return r.replace(**changes) if changes else r
    mode = "int8" if mode is None else mode
    entry = get_export_mode(mode)
    weights = None
    if not per_channel:
        if not TensorSpec(**entry.default_weights).is_integer:
            raise ValueError(entry.refusal("per_channel", "False"))
        weights = TensorSpec(**dict(entry.default_weights, per_channel=False))
    return Recipe(mode=mode, weights=weights, calibration=method or DEFAULT_CALIBRATION,
                  calibration_params=dict(calibration_params or {}), io_dtype=io_dtype,
                  float_layers=tuple(patterns), num_calibration_samples=num_calibration_samples).with_methods(methods)


def _describe(value) -> str:
    """A short description of an option's value for error messages (data is not printed)."""
    if isinstance(value, Calibration):
        return f"<tfq.Calibration ({value.method}, {len(value)} ranges)>"
    if not isinstance(value, (str, int, float, bool, type(None), list, tuple, dict, TensorSpec)):
        return short_repr(value) if hasattr(value, "shape") else f"<{type(value).__name__}>"
    return short_repr(value)


def _options_set(r: Recipe, data, calibration) -> dict:
    """The :data:`tfq.export_modes.CONVERT_OPTIONS` a conversion asks for, with their values."""
    entry = get_export_mode(r.mode)
    options = {}
    if data is not None:
        options["representative_data"] = data
    if isinstance(calibration, Calibration):
        options["calibration"] = calibration
    elif r.calibration != DEFAULT_CALIBRATION:
        options["calibration"] = r.calibration
    if r.calibration_params:
        options["calibration_params"] = dict(r.calibration_params)
    if r.num_calibration_samples is not None:
        options["num_calibration_samples"] = r.num_calibration_samples
    default_weights = TensorSpec(**entry.default_weights)
    if r.weights != default_weights:
        if r.weights == TensorSpec(**dict(entry.default_weights, per_channel=False)):
            options["per_channel"] = False
        else:
            options["weights"] = r.weights
    if r.activations != TensorSpec(**entry.default_activations):
        options["activations"] = r.activations
    if r.overrides:
        options["overrides"] = [o.pattern for o in r.overrides]
    if r.float_layers:
        options["float_layers"] = list(r.float_layers)
    for name, (value, given) in r.method_settings().items():
        options[name] = {"value": value, **given} if given else value
    return options


def _refuse_unhonoured(options: dict, honours, message) -> None:
    for name, value in options.items():
        if name not in honours:
            raise ValueError(message(name, _describe(value)))


def _check_options(model, r: Recipe, data, calibration) -> None:
    """Every option is honoured by the mode and by the model's route, or refused in one line naming it."""
    entry: ExportMode = get_export_mode(r.mode)
    options = _options_set(r, data, calibration)
    if not entry.tfq_ranges or isinstance(model, SavedModelPath):
        # The converter calibrates by MinMax: "minmax" is what it does, and the default's outlier test runs on
        # the inputs (_screened_inputs), so both are honoured.
        if options.get("calibration") == "minmax":
            del options["calibration"]
    registered = set(uses_methods(r)) - set(CONVERT_OPTIONS)  # the recipe checked the modes of these
    _refuse_unhonoured(options, entry.honours | registered, lambda name, value: entry.refusal(name, value))
    if isinstance(model, SavedModelPath):
        honours = {"representative_data", "num_calibration_samples"}
        _refuse_unhonoured(options, honours, lambda name, value: (
            f"{name}={value} needs a Keras model that tfq can rewrite; {str(model)!r} is a SavedModel, which the "
            f"TFLite converter converts alone (MinMax calibration). Pass the .keras file, or drop {name}."))
    elif is_quantized_model(model):
        needs_calibration = _qat_needs_calibration(model)
        honours = {"representative_data", "num_calibration_samples", *uses_methods(r)}
        if needs_calibration:
            honours |= {"calibration", "calibration_params"}
        _refuse_unhonoured(options, honours, lambda name, value: (
            f"{name}={value} does not apply to model {model.name!r}: it is a tfq QAT model, whose quantizers "
            f"(which layers, per-channel or not, trained ranges) are fixed. Pass it to tfq.qat.quantize_model "
            f"(recipe=...) before training, or drop {name}."))


def _qat_needs_calibration(qmodel) -> bool:
    """Whether some quantizer of a tfq QAT model never saw data (its range is still to calibrate)."""

    return any(q.mode != "fixed" and float(keras.ops.convert_to_numpy(q.initialized)) < 0.5
               for q in quantizers_of(qmodel).values())


def _check_methods(model, r: Recipe, data, calibration, report=None) -> None:
    """Refuses, in one line, the methods beyond calibration where they cannot apply."""

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
    for name in on:
        entry = get_ptq_method(name)
        if entry.data == "excludes" and data is not None:
            raise ValueError(f"{name} takes activation ranges without data, so it excludes representative_data. "
                             f"Pass representative_data=None, or {name}={entry.off!r} to calibrate on your data.")
    if isinstance(calibration, Calibration):
        chooses = [m.name for stage in RANGE_STAGES for m in methods_at(stage) if m.name in on]
        if chooses:
            raise ValueError(f"{chooses[0]} chooses the ranges itself, so it cannot use a precomputed calibration. "
                             f"Pass calibration as a method name, or calibrate the equalized model "
                             f"(tfq.calibrate(tfq.equalize(model), ...)) and convert that.")


@serialized
def convert(
    model,
    mode: str | None = None,
    representative_data=None,
    *,
    recipe=None,
    calibration=DEFAULT_CALIBRATION,
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
    methods: Mapping | None = None,
    check: bool = True,
    strict: bool = False,
    int16_layers=(),
) -> bytes:
    """Converts a Keras model, a SavedModel or a float ``.tflite`` to TFLite.

    Every option is honoured or refused with one line naming it: each mode honours the options
    :mod:`tfq.export_modes` lists for it (``"int8"`` all of them; ``"int16x8"``, whose ranges
    the TFLite converter chooses itself, only representative data, ``num_calibration_samples``,
    ``equalize`` and ``data_free``; ``"float"``/``"fp16"``/``"dynamic"`` none), a tfq QAT model no
    layer choices.

    A SavedModel directory, a Keras model made of a ``keras.layers.TFSMLayer`` or a float ``.tflite``
    (path or bytes) is quantized to int8 *below Keras* (:mod:`tfq.export.tflite_frontend`): its float
    ``.tflite`` runs in LiteRT's interpreter over the calibration samples, tfq's calibration method
    chooses every activation range, and LiteRT's quantizer (``ai-edge-quantizer``) writes the file
    from those ranges. Measured on a CNN SavedModel it equals the plain converter's SQNR (45.58 dB
    both), where LiteRT's quantizer with its own calibration reaches 27.24 dB (figures in
    docs/guides/ptq.md). There ``calibration``, ``calibration_params``, ``per_channel``,
    ``float_layers``/``int16_layers`` (op types or tensor names), ``num_calibration_samples``,
    ``io_dtype`` (``"int8"``) and the check apply; methods that need a Keras graph are refused.
    In other modes a SavedModel is converted by the converter alone; a ``.tflite`` takes
    ``"int8"`` or ``"int16x8"`` only.

    Args:
        model: a Keras 3 or tf_keras model, a tfq QAT model, a path to ``.keras``/SavedModel, a
            Keras model of a ``TFSMLayer``, or a float ``.tflite`` (path ending ``.tflite``, or bytes).
        mode: ``"float"``, ``"dynamic"`` (int8 weights, float activations), ``"fp16"``,
            ``"int8"`` (full integer), ``"int16x8"``, ``"w4_dynamic"`` (tfq's 4-bit weights stored
            INT4, activations quantized at run time by LiteRT's hybrid kernels) or ``"w4_weight_only"``
            (4-bit weights dequantized when loaded, float compute) (or a registered mode). None (the default):
            the recipe's mode, or ``"int8"`` without a recipe.
        representative_data: calibration data for ``"int8"``/``"int16x8"`` (arrays, dict,
            ``tf.data.Dataset`` or callable). Not needed for a trained QAT model.
        recipe: a :class:`~tfq.recipes.Recipe`, preset name or file. Keyword choices that differ
            from it (``mode``, ``calibration``, ``io_dtype``, ``per_channel=False``) are refused;
            ``float_layers`` are added to its own, ``calibration_params`` merged into its own,
            ``num_calibration_samples`` and the methods below replace its values.
        calibration: a method name (or a registered one) or a :class:`~tfq.Calibration` from
            :func:`tfq.calibrate`. The default, ``"robust_minmax"``, takes each range by MinMax over
            the calibration samples, setting aside (with a warning naming them) the samples far
            outside the rest (:mod:`tfq.outliers`); the rest of the conversion does not see them
            either. ``"minmax"`` keeps every sample; ``"moving_average"``, ``"kl"``,
            ``"percentile"``, ``"mse"`` choose ranges from averages or histograms. Every method warns
            about such samples.
        per_channel: per-output-channel weight scales for convolutions.
        io_dtype: model input/output type: ``"float32"``, ``"int8"``, ``"uint8"`` (int8 mode) or
            ``"int16"`` (int16x8 mode).
        float_layers: layer names, regexes (``re.fullmatch``) or classes kept float inside an INT8
            model; a single string is one pattern. A pattern that matches no layer is an error
            naming the nearest layer names.
            For a model quantized below Keras: op types (``"DIV"``), regexes fully matching an op's
            output tensor name or one of its ``;``-separated parts, or op indices
            (:func:`tfq.export.tflite_frontend.op_table` lists them).
        num_calibration_samples: cap on calibration samples.
        output: if given, the model is also written there atomically (checked writable first).
        calibration_params: method parameters (e.g. ``{"percentile": 99.9}``), validated.
        verbose: show progress (calibration, the converter) on a terminal and INFO lines on the ``"tfq"``
            logger.
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
        methods: any registered post-training method (:mod:`tfq.ptq_methods`) by name: its value or a
            dict of its options, e.g. ``{"weight_rounding": "gptq"}`` or ``{"my_method": {"k": 2.0}}``;
            validated by the method's registry entry. The four keywords above are shorthands for it.
        check: run the produced model in LiteRT's interpreter (in a separate process, so a kernel
            that aborts cannot take this one down) on 8 calibration samples, an all-zeros input and
            a near-silent one, against the float model (:mod:`tfq.export.check`). An op that fails
            or outputs NaN/inf where float is finite is kept float (int8 from a Keras model: its
            layers are added to ``float_layers`` and the model converted again) with a warning
            naming the op and the layers; where that cannot be done, or an output is below 0 dB
            SQNR (or 30 dB below the best output), a warning names it. ``io_dtype`` not honoured
            on every input and output is refused. Adds 0.06–0.3 s to a small model's conversion
            (the checker process starts while the model converts); thresholds and figures in
            :mod:`tfq.export.check`.
        strict: refuse (``ConversionError``) a model the check finds broken or far from float,
            instead of fixing or warning.
        int16_layers: for a model quantized below Keras, the ops (named as in ``float_layers``)
            computed with int16 activations and int8 weights inside the int8 model. Refused for a
            Keras model (its int8 export cannot mix int16 activations: convert its float ``.tflite``).

    Returns:
        The ``.tflite`` flatbuffer bytes. Same inputs give the same bytes.

    Raises:
        ValueError: bad mode/io_dtype/calibration, an option the mode or model cannot honour,
            missing data, data that does not fit the model, a float_layers pattern matching no layer
            (or only layers that move data, such as Flatten), an output path that cannot be written; a
            precomputed calibration with a range for a tensor the model does not quantize, a
            non-finite range or one beyond ±1e12, or with ``num_calibration_samples`` (its ranges
            are chosen already).
        ConversionError: the converter refused an op (the message names it and the fix).
        TypeError: an option of the wrong type (e.g. ``calibration=None``).
        FileNotFoundError: a model path that does not exist.

    Example:
        >>> tflite = tfq.convert(model, "int8", x_train[:300], calibration="kl")   # doctest: +SKIP
        >>> tflite = tfq.convert(model, "int8", None, data_free=True, equalize=True,
        ...                      bias_correction="analytical")                    # doctest: +SKIP
        >>> tflite = tfq.convert(model, recipe="int16x8", representative_data=x_train[:300])  # doctest: +SKIP
        >>> tflite = tfq.convert("saved_model_dir", "int8", x_train[:300], calibration="kl",
        ...                      float_layers=["DIV"], int16_layers=[".*conv1.*"])       # doctest: +SKIP
    """
    methods = _methods_given(methods, equalize=equalize, bias_correction=bias_correction,
                             weight_rounding=weight_rounding, data_free=data_free)
    _check_keywords(calibration, calibration_params, per_channel, verbose, output)
    checker.check_keywords(check, strict)
    if recipe is None:
        get_export_mode("int8" if mode is None else mode)  # before loading anything
    if output is not None:
        check_writable(output, "output")
    if not tflite_frontend.is_tflite_input(model):
        model = load_keras_model(model, saved_model=True, tfmot=True)
    if _below_keras(model, mode, recipe):
        content = _convert_below_keras(
            model, mode, representative_data, calibration=calibration, calibration_params=calibration_params,
            per_channel=per_channel, io_dtype=io_dtype, float_layers=float_layers, int16_layers=int16_layers,
            num_calibration_samples=num_calibration_samples, verbose=verbose, check=check, strict=strict,
            recipe=recipe, methods=methods, report=report)
        if output is not None:
            atomic_write_bytes(output, content)
        return content
    _refuse_int16_layers(int16_layers, model)
    if is_tf_keras_model(model):  # a tfmot QAT model: tfmot's own fake-quant ops carry the ranges

        r = _build_recipe(mode, recipe, calibration, per_channel, io_dtype,
                          float_layers, num_calibration_samples, methods, calibration_params)
        given = sorted(_options_set(r, representative_data, calibration))
        if recipe is not None or given:
            raise ValueError(
                f"model {model.name!r} is a tfmot QAT model: its ranges come from tfmot's fake-quant ops, "
                f"so {', '.join((['recipe'] if recipe is not None else []) + given)} do(es) not apply. "
                f"Pass mode='int8' and io_dtype only."
            )
        content = convert_tfmot_model(model, r.mode, r.io_dtype)
        if check:
            content = checker.checked(content, model, None, mode=r.mode, io_dtype=r.io_dtype, strict=strict)
        if output is not None:
            atomic_write_bytes(output, content)
        return content

    model = strip_all(model)  # pruning/clustering wrappers: convert the weights they compute with
    r = _build_recipe(mode, recipe, calibration, per_channel, io_dtype, float_layers, num_calibration_samples, methods,
                      calibration_params)
    _check_methods(model, r, representative_data, calibration, report)
    _check_options(model, r, representative_data, calibration)
    params = dict(r.calibration_params)
    entry = get_export_mode(r.mode)
    with verbosity(verbose):  # progress on a terminal: calibration's bar, the converter's elapsed time
        if entry.float_activations:
            content = _convert_float_activations(model, r, representative_data, report)
        elif entry.tfq_ranges:
            content = _convert_int8(model, r, representative_data, calibration, params, verbose, report)
        elif entry.needs_data:
            content = _convert_with_converter_calibration(model, r, representative_data, report)
        else:
            content = _convert_float_family(model, r)
    if check:
        fixable = entry.tfq_ranges and not entry.float_activations and not is_quantized_model(model) and (
            representative_data is not None)
        content = checker.checked(
            content, model, representative_data, mode=r.mode, io_dtype=r.io_dtype, strict=strict,
            layer_names=[layer.name for layer in _all_layers(model)],
            reconvert=(lambda nodes: _int8_keeping_float(model, r, representative_data, calibration, params, nodes))
            if fixable else None)
    if output is not None:
        atomic_write_bytes(output, content)
    return content


def _same_options_as(source, *, without: tuple[str, ...]):
    """Gives the decorated function ``source``'s signature minus ``without``: one list of options, not a copy.

    The decorated function takes ``(model, mode=None, representative_data=None, **options)`` and reads
    the options through :func:`_bound_options`, which checks them against that signature.
    """

    def wrap(fn):
        sig = inspect.signature(source)
        params = [p for p in sig.parameters.values() if p.name not in without]
        fn.__signature__ = sig.replace(parameters=params, return_annotation=inspect.signature(fn).return_annotation)
        return fn

    return wrap


def _bound_options(fn, *args, **kwargs) -> dict:
    """The arguments of a call of ``fn`` (a :func:`_same_options_as` function), defaults included; an unknown
    keyword is a one-line TypeError naming it."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _methods_given(methods, **shorthands) -> dict:
    """``methods`` (name → setting) with the keyword shorthands (``equalize=`` …) given (not None) added."""
    if methods is not None and not isinstance(methods, Mapping):
        raise TypeError(f"methods must be a dict of post-training method names to settings (e.g. "
                        f"{{'equalize': True}}) or None. Received: methods={short_repr(methods)}")
    out = dict(methods or {})
    for name, value in shorthands.items():
        if value is None:
            continue
        if out.get(name) is not None and out[name] != value:
            raise ValueError(f"{name}={value!r} conflicts with methods[{name!r}]={out[name]!r}. Give one of them.")
        out[name] = value
    return out


@_same_options_as(convert, without=("io_dtype", "output", "check", "strict", "int16_layers"))
def fake_quantize(model, mode=None, representative_data=None, **options) -> keras.Model:
    """The fake-quant Keras model that :func:`convert` hands to the TFLite converter, for simulation.

    Same arguments as :func:`convert` (its signature, without ``io_dtype``, ``output``, ``check``,
    ``strict`` and ``int16_layers``: it writes no file to check, and simulates a Keras model; int8
    and int16x8 recipes). The model computes in float with
    every quantization simulated (weights on their integer grid, activations on their ranges), so
    it also evaluates recipes TFLite cannot run (``allow_non_tflite=True``, e.g. 3-bit weights) —
    with the same calibration, equalization, learned rounding and bias correction as the export.
    In int16x8 mode it simulates tfq's own ranges (every option applies), which the exported
    int16x8 model does not use (the converter calibrates it).

    Returns:
        A new ``keras.Model`` with fixed ranges (the caller's model is untouched).

    Example:
        >>> w4a8 = tfq.Recipe(weights=tfq.TensorSpec(bits=4), weight_rounding="adaround")
        >>> sim = tfq.fake_quantize(model, recipe=w4a8, representative_data=x_train[:256])   # doctest: +SKIP
        >>> sim.predict(x_test)                                                              # doctest: +SKIP
    """
    o = _bound_options(fake_quantize, model, mode, representative_data, **options)
    methods = _methods_given(o["methods"], **{k: o[k] for k in ("equalize", "bias_correction", "weight_rounding",
                                                                "data_free")})
    _check_keywords(o["calibration"], o["calibration_params"], o["per_channel"], o["verbose"], None)
    model = load_keras_model(model)
    r = _build_recipe(mode, o["recipe"], o["calibration"], o["per_channel"], "float32", o["float_layers"],
                      o["num_calibration_samples"], methods, o["calibration_params"])
    if not TensorSpec(**get_export_mode(r.mode).default_activations).is_integer:
        raise ValueError(f"fake_quantize simulates integer models: mode must be 'int8' or 'int16x8'. "
                         f"Received: mode={r.mode!r}")
    _check_methods(model, r, representative_data, o["calibration"], o["report"])
    return _frozen_int8_model(model, r, representative_data, o["calibration"], dict(r.calibration_params),
                              o["verbose"], o["report"])


def _strip_quantization(model):
    """The float model under a tfq QAT model: float/fp16/dynamic export of a QAT model."""

    return freeze_model(model, {}, strip=True) if quantizers_of(model) else model


def _convert_float_family(model, r: Recipe) -> bytes:
    """Modes the TFLite converter makes alone without data (float, fp16, dynamic): the mode's driver."""
    if is_quantized_model(model):
        model = _strip_quantization(model)
    model = _with_unrolled_rnns(model, r.mode)
    converter = _keras_converter(model)
    get_export_mode(r.mode).configure(converter, r.io_dtype, None)
    return run_converter(converter, r.mode, model)


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


def _convert_with_converter_calibration(model, r: Recipe, data, report=None) -> bytes:
    """Modes whose ranges the TFLite converter chooses from representative data (int16x8): the mode's driver."""

    if is_quantized_model(model):
        model = _strip_quantization(model)
    model = ptq_methods.prepare_model(model, r, report)
    if uses_stage(r, "calibration_inputs"):
        data = ptq_methods.calibration_inputs(rewrite_model(model, "int8", warn_unknown=False), r, data, report)
    _require_data(data, r.mode)
    rep = representative_dataset(data, r.num_calibration_samples,
                                 model=None if isinstance(model, SavedModelPath) else model)
    rep = _screened_inputs(rep, r)
    converter = _keras_converter(_with_unrolled_rnns(model, r.mode))
    get_export_mode(r.mode).configure(converter, r.io_dtype, rep)
    return run_converter(converter, r.mode, model)


def _convert_int8(model, r: Recipe, data, calibration, params, verbose, report=None) -> bytes:
    trained_ranges = is_quantized_model(model) and not _qat_needs_calibration(model)
    frozen, qmodel, data = _prepare_int8(model, r, data, calibration, params, verbose, report, in_place=True)
    uncovered = uncovered_layers(qmodel)
    content = _int8_converter_run(frozen, r, data if uncovered else None)
    float_ops = _unexpected_float_ops(content, r)
    data_used = not trained_ranges or bool(uncovered)
    if float_ops and not uncovered and data is not None:
        # Some op the converter made has no fake-quant range: let it calibrate that op too.
        content = _int8_converter_run(frozen, r, data)
        float_ops = _unexpected_float_ops(content, r)
        data_used = True
    if data is not None and not data_used:
        warnings.warn(
            f"tfq.convert: representative_data was not used: model {model.name!r} is a trained tfq QAT model, whose "
            f"ranges come from training and are the ones in the file. Drop representative_data (and "
            f"num_calibration_samples) for this model.",
            stacklevel=3,
        )
    if float_ops and uncovered and data is None:
        class_name, names = sorted(uncovered.items())[0]
        raise ValueError(
            f"layer {names[0]!r} ({class_name}) has inner tensors tfq does not quantize itself (no rule, and its "
            f"call could not be decomposed), and {len(float_ops)} op(s) stayed float: pass representative_data "
            f"to tfq.convert, from which the TFLite converter calibrates them."
        )
    if float_ops:
        _warn_float_ops(float_ops, model)
    _warn_slow_int8_ops(content)
    return write_int4_weights(content, r, frozen)  # 4-bit weights stored INT4 (tfq.export.int4); else unchanged


def _convert_float_activations(model, r: Recipe, data, report=None) -> bytes:
    """Modes with float activations and tfq's 4-bit weights (``w4_dynamic``, ``w4_weight_only``): the
    weight-only fake-quant model chooses the integers (blockwise ones first, then nearest/AdaRound/GPTQ),
    the float ``.tflite`` of the model with those weights is converted, and the weights are stored INT4."""
    entry = get_export_mode(r.mode)
    if isinstance(model, SavedModelPath):
        raise ValueError(f"mode={r.mode!r} chooses the weights of a Keras model tfq can rewrite; {str(model)!r} is a "
                         f"SavedModel. Pass the .keras file, or use mode='dynamic'.")
    if is_quantized_model(model):
        raise ValueError(f"mode={r.mode!r} chooses 4-bit weights for a float model, and {model.name!r} is a tfq QAT "
                         f"model. Convert it with mode='int8' (a QAT model trained at 4 bits exports INT4 weights), "
                         f"or pass the float model.")
    if data is not None and r.weight_rounding == "nearest":
        warnings.warn(f"tfq.convert: representative_data was not used: mode={r.mode!r} keeps activations float and "
                      f"rounds weights to nearest. Pass weight_rounding='gptq' to choose the integers on it, or drop it.",
                      stacklevel=3)
    qmodel = rewrite_model(ptq_methods.prepare_model(model, r, report), r)
    frozen = fix_ranges_in_place(qmodel, {})  # weight quantizers only: no ranges
    blockwise = blockwise_integers(frozen, r, data, report)
    snap_four_bit_kernels(frozen, unhandled_only=r.weight_rounding != "nearest")
    ptq_methods.apply_weight_methods(frozen, r, data, report)
    choices, by_name = float_activation_weights(frozen, r, blockwise)
    float_content = _convert_float_family(freeze_model(frozen, {}, strip=True), r)
    return write_float_activation_int4(float_content, choices, entry.float_activations, by_name)


def _int8_converter_run(frozen, r: Recipe, data) -> bytes:
    """One TFLite conversion of a frozen fake-quant model.

    Without ``data`` every range comes from the fake-quant ops. With it, the converter also
    calibrates (MinMax) every tensor that has no fake-quant range — the inside of layers tfq keeps
    whole — and keeps float only the ops that have no int8 kernel.
    """

    converter = keras_graph_converter(frozen)  # one trace, no SavedModel export: see tfq.export.graph_converter
    rep = None if data is None else representative_dataset(data, r.num_calibration_samples, model=frozen)
    get_export_mode(r.mode).configure(converter, r.io_dtype, rep)
    return run_converter(converter, r.mode, frozen)


def _frozen_int8_model(model, r: Recipe, data, calibration, params, verbose, report=None) -> keras.Model:
    """The fake-quant Keras model with fixed ranges that the converter turns into the INT8 ``.tflite``."""
    return _prepare_int8(model, r, data, calibration, params, verbose, report)[0]


def _prepare_int8(model, r: Recipe, data, calibration, params, verbose, report=None, in_place=False):
    """(frozen model, the fake-quant model it was frozen from, the calibration data actually used).

    ``in_place``: a model rewritten here is fixed in place rather than copied (for the converter only).
    """

    ranges = None
    if is_quantized_model(model):
        qmodel = model
        # A trained QAT model carries its ranges; only quantizers that never saw data need calibrating.
        needs_calibration = _qat_needs_calibration(qmodel)
    else:
        qmodel = rewrite_model(ptq_methods.prepare_model(model, r, report), r)
        needs_calibration = not isinstance(calibration, Calibration)
        if not needs_calibration:
            ranges = check_ranges(calibration.ranges)
            missing = sorted(n for n, q in quantizers_of(qmodel).items() if q.mode != "fixed" and n not in ranges)
            if missing:
                raise ValueError(
                    f"the calibration has no range for {len(missing)} tensor(s) of this model (e.g. {missing[0]!r}): "
                    f"it was made for another model or recipe. Re-run tfq.calibrate on this model."
                )
            _check_precomputed(model, qmodel, r, ranges)
        data = ptq_methods.calibration_inputs(qmodel, r, data, report)
    if needs_calibration:
        _require_data(data, r.mode)
        cal = calibrate(qmodel, data, r.calibration, num_samples=r.num_calibration_samples, verbose=verbose, **params)
        ranges = cal.ranges
        ranges.update(ptq_methods.data_free_ranges(qmodel, r))
        if cal.method == DEFAULT_CALIBRATION and cal.outlier_samples:
            # Set aside for what follows too: weight methods, the converter's calibration inside opaque layers.
            data = without_samples(data, cal.outlier_samples, r.num_calibration_samples, model=qmodel)
    if in_place and qmodel is not model:
        frozen = fix_ranges_in_place(qmodel, ranges)  # rewritten here: no one else holds it
    else:
        frozen = freeze_model(qmodel, ranges)
    # 4-bit kernels on their grid: simulated and written as such (learned rounding sets its own layers')
    snap_four_bit_kernels(frozen, unhandled_only=r.weight_rounding != "nearest")
    ptq_methods.apply_weight_methods(frozen, r, data, report)
    return frozen, qmodel, data


def _check_precomputed(model, qmodel, r: Recipe, ranges: dict) -> None:
    """A precomputed calibration's ranges are all used, and nothing it makes moot is asked for (one line)."""
    extra = set(ranges) - set(quantizers_of(qmodel))
    if extra and (r.float_layers or r.overrides):  # tensors the recipe keeps float: the calibration may cover them
        extra -= set(quantizers_of(rewrite_model(model, r.replace(float_layers=(), overrides=()), warn_unknown=False)))
    if extra:
        raise ValueError(
            f"the calibration has a range for {len(extra)} tensor(s) this model does not quantize (e.g. "
            f"{min(extra)!r}): it was made for another model or recipe, and that range would be ignored. "
            f"Re-run tfq.calibrate on this model.")
    if r.num_calibration_samples is not None and not uses_methods(r) and not uncovered_layers(qmodel):
        raise ValueError(
            f"num_calibration_samples={r.num_calibration_samples} caps the samples tfq calibrates on, but calibration "
            f"is a tfq.Calibration whose ranges are chosen already: drop num_calibration_samples, or pass "
            f"calibration='{DEFAULT_CALIBRATION}' (or another method) to calibrate again.")


def _unexpected_float_ops(content: bytes, r: Recipe) -> list:
    """Float compute ops of an INT8 model, unless the recipe keeps some layers float."""

    if r.float_layers or any(o.float for o in r.overrides):
        return []
    info = inspect_tflite(content)
    return [(op, info.tensors[op.outputs[0]].name if op.outputs else "?") for op in info.float_ops]


# int8 ops that LiteRT's CPU delegate (XNNPACK, 2.3) does not take: each runs in LiteRT's own kernel and splits
# the delegated graph around it. Measured (PReLU CNN, 32x32 digits, batch 1, 2 cores): the INT8 model 1.5x (1
# thread) to 2.0x (2 threads) slower than float; with PReLU float, 0.8x float at the same accuracy and SQNR
# (0.54x, 1 thread, since the float layer's barrier is NEG·MUL that XNNPACK takes, not a float16 CAST pair).
SLOW_INT8_OPS = ("PRELU",)


def _warn_slow_int8_ops(content: bytes) -> None:
    """One warning when the INT8 model holds int8 ops that run slower than float on LiteRT's CPU runtime."""
    ops = [op for op in inspect_tflite(content).ops if op.type in SLOW_INT8_OPS and "INT8" in op.output_dtypes]
    if ops:
        warnings.warn(
            f"tfq.convert: {len(ops)} int8 {ops[0].type} op(s): LiteRT's CPU delegate (XNNPACK) has no int8 "
            f"{ops[0].type}, so each runs in LiteRT's own kernel between delegated parts, measured 1.5-3x slower than "
            f"the float model at batch 1. For CPU speed keep them float (float_layers=[keras.layers.PReLU]: same "
            f"SQNR, faster than float) or use tfq.tune(..., objective='latency'); on integer-only hardware ignore this.",
            stacklevel=5,  # _convert_int8, convert, its process lock, the caller
        )


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


def _screened_inputs(rep, r: Recipe):
    """The data the TFLite converter calibrates with, after the outlier test on the model inputs
    (:func:`tfq.outliers.input_outlier_samples`): warned about, and set aside with the default calibration.
    For conversions where the converter runs the model itself (SavedModel, int16x8)."""

    outliers = input_outlier_samples(rep)
    set_aside = r.calibration == DEFAULT_CALIBRATION
    warn_outlier_samples(outliers, r.calibration if set_aside else "minmax", set_aside=set_aside, stacklevel=5)
    return representative_dataset(without_samples(rep, outliers.indices)) if set_aside and outliers else rep


def _int8_keeping_float(model, r: Recipe, data, calibration, params, nodes) -> bytes:
    """The int8 conversion again, the ops making the tensors ``nodes`` kept float (the converter's denylist,
    :func:`tfq.export.check.convert_keeping_float`): the fix for an op that fails or makes NaN."""
    frozen, _, data = _prepare_int8(model, r, data, calibration, params, False)
    converter = keras_graph_converter(frozen)
    rep = representative_dataset(data, r.num_calibration_samples, model=frozen)
    get_export_mode(r.mode).configure(converter, r.io_dtype, rep)
    return checker.convert_keeping_float(converter, nodes, r.mode)


# --------------------------------------------------------------------------------- the front-end below Keras
def _integer_mode(mode) -> bool:
    """Whether a registered mode has integer activations (int8, int16x8): what tfq quantizes below Keras."""
    return TensorSpec(**get_export_mode(mode).default_activations).is_integer


def _below_keras(model, mode, recipe) -> bool:
    """Whether ``model`` takes the front-end below Keras (:mod:`tfq.export.tflite_frontend`): a float
    ``.tflite`` always (other modes are refused there); a SavedModel directory or a ``TFSMLayer`` model
    in int8 (its other modes stay with the TFLite converter)."""
    if tflite_frontend.is_tflite_input(model):
        return True
    if not (isinstance(model, SavedModelPath) or tflite_frontend.has_tfsm_layer(model)):
        return False
    if recipe is not None:
        return load_recipe(recipe).mode == "int8"
    return mode is None or mode == "int8"


def _refuse_int16_layers(int16_layers, model) -> None:
    if int16_layers is None or (isinstance(int16_layers, (list, tuple, set, frozenset)) and not int16_layers):
        return
    name = getattr(model, "name", None) or type(model).__name__
    raise ValueError(f"int16_layers={short_repr(int16_layers)} keeps ops of a float .tflite, SavedModel or TFSMLayer "
                     f"model at int16 activations; {name!r} is converted through its Keras graph, whose INT8 export "
                     f"cannot mix int16 activations. Convert its float .tflite instead (tfq.convert(float_bytes, "
                     f"'int8', data, int16_layers=[...])), use mode='int16x8', or drop int16_layers.")


def _convert_below_keras(model, mode, data, *, calibration, calibration_params, per_channel, io_dtype, float_layers,
                         int16_layers, num_calibration_samples, verbose, check, strict, recipe, methods,
                         report) -> bytes:
    """INT8 (or int16x8) of a float ``.tflite`` / SavedModel / TFSMLayer model: tfq's calibration on the
    float ``.tflite`` in LiteRT, LiteRT's quantizer writing the file (:mod:`tfq.export.tflite_frontend`),
    then the check, whose crashing or NaN ops are kept float by name."""
    what = "a float .tflite" if tflite_frontend.is_tflite_input(model) else (
        f"SavedModel {str(model)!r}" if isinstance(model, SavedModelPath) else f"TFSMLayer model {model.name!r}")
    if recipe is not None:
        r = load_recipe(recipe)
        mode = r.mode if mode is None else mode
        if r.mode != mode:
            raise ValueError(f"mode={mode!r} conflicts with the recipe's mode {r.mode!r}. Pass one of them.")
        if calibration == DEFAULT_CALIBRATION and r.calibration != DEFAULT_CALIBRATION:
            calibration = r.calibration
        calibration_params = {**r.calibration_params, **(calibration_params or {})}
        float_layers = tuple(_float_layer_patterns(float_layers)) + tuple(r.float_layers)
        if r.weights.is_integer and not r.weights.per_channel:
            per_channel = False
        unhonoured = [name for name, on in (("overrides", bool(r.overrides)), ("methods", bool(uses_methods(r))),
                                            ("weights", r.weights.bits != 8), ("activations", r.activations.bits != 8))
                      if on]
        if unhonoured:
            raise ValueError(f"recipe {r.name or r.mode!r} sets {unhonoured[0]}, which {what} cannot honour (tfq "
                             f"quantizes it below Keras: int8 weights and activations, per-op float_layers and "
                             f"int16_layers). Drop it from the recipe, or convert the Keras model.")
    mode = "int8" if mode is None else mode
    if not _integer_mode(mode):
        raise ValueError(f"mode={mode!r} does not apply to {what}: tfq quantizes it to 'int8' or 'int16x8' (with "
                         f"its own calibration). Convert the source model for {mode!r}.")
    given = {k: v for k, v in (methods or {}).items() if v is not None}
    if given or report is not None:
        name = min(given) if given else "report"
        raise ValueError(f"{name} need a Keras model that tfq can rewrite; {what} is quantized below Keras "
                         f"(calibration, per_channel, float_layers and int16_layers apply). Convert the Keras model, "
                         f"or drop {name}.")
    io_allowed = tuple(d for d in get_export_mode(mode).io_dtypes if d != "uint8")  # LiteRT's quantizer: no uint8
    if io_dtype not in io_allowed:
        raise ValueError(f"io_dtype={io_dtype!r} does not apply to {what} in mode {mode!r}: pass one of "
                         f"{', '.join(map(repr, io_allowed))}.")
    if float_layers is None:
        float_layers = ()
    patterns = list(float_layers) if isinstance(float_layers, (list, tuple, set, frozenset)) else [float_layers]
    if int16_layers is None:
        int16_layers = ()
    int16 = list(int16_layers) if isinstance(int16_layers, (list, tuple, set, frozenset)) else [int16_layers]
    with verbosity(verbose):
        return tflite_frontend.convert_tflite(
            model, data, mode=mode, calibration=calibration, calibration_params=dict(calibration_params or {}),
            per_channel=per_channel, float_layers=patterns, int16_layers=int16,
            num_calibration_samples=num_calibration_samples, io_dtype=io_dtype, check=check, strict=strict)
