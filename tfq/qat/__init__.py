"""Quantization-aware training for Keras 3 models.

Example:
    >>> qat_model = tfq.qat.quantize_model(model, calibration_data=x_train[:256])   # doctest: +SKIP
    >>> qat_model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])  # doctest: +SKIP
    >>> qat_model.fit(x_train, y_train, epochs=2)                                    # doctest: +SKIP
    >>> tflite = tfq.convert(qat_model, "int8")                                      # doctest: +SKIP
"""

from __future__ import annotations

import numbers

import keras

from tfq.compression.common import strip_all
from tfq.core.calibration_methods import (
    calibration_method_names,
    get_calibration_method,
)
from tfq.core.messages import check_bool, short_repr
from tfq.core.process_lock import serialized
from tfq.core.recipes import load_recipe
from tfq.models.interop import load_keras_model
from tfq.models.loading import is_quantized_model
from tfq.ptq.calibration import calibrate
from tfq.quantsim.layers import (
    ActivationQuantizer,
    QuantizedLayer,
    QuantizedNormalization,
)
from tfq.quantsim.registry import register_layer, unregister_layer
from tfq.quantsim.rewrite import (
    batchnorm_layers_of,
    freeze_model,
    quantized_layers_of,
    quantizers_of,
    rewrite_model,
)

__all__ = [
    "ActivationQuantizer",
    "QuantizedLayer",
    "QuantizedNormalization",
    "batchnorm_layers_of",
    "freeze_model",
    "quantize_model",
    "quantized_layers_of",
    "quantizers_of",
    "register_layer",
    "unregister_layer",
]


@serialized
def quantize_model(
    model,
    recipe=None,
    *,
    range_mode: str = "moving_average",
    decay: float | None = None,
    calibration_data=None,
    calibration: str | None = None,
    num_calibration_samples: int | None = 512,
    warn_unknown: bool = True,
    preserve: str | None = None,
    bn_folding: str = "unfolded",
    logits_range: str = "tensor",
    **calibration_params,
) -> keras.Model:
    """Returns a new model with fake-quant ops where TFLite will quantize; the caller's is untouched.

    Weights of convolutions, Dense and EinsumDense layers are fake-quantized per output channel
    (symmetric, narrow range), transposed convolutions per tensor; a
    BatchNormalization after a weighted layer is folded into it as TFLite folds it (in training
    it uses batch statistics until frozen, see ``bn_folding`` and :class:`QuantizedLayer`), and
    a following ReLU/ReLU6 is fused. Activations get per-tensor asymmetric ranges, tracked by moving average
    (``r ← decay·r + (1 − decay)·batch_min/max``) or learned by gradient. Layers without an int8
    TFLite kernel stay float with a warning. A softmax or sigmoid output is fake-quantized on
    TFLite's fixed grid (1/256 steps) in training too, and Keras' crossentropy losses read the
    fake-quantized logits under it, as they read a float softmax's logits (so a confidently wrong
    sample, whose probability rounds to 0, still has a gradient). Nested models (a
    ``keras.applications`` base in a transfer model) are rewritten too. The result saves and loads with ``model.save`` /
    ``keras.models.load_model`` (classes registered under the package ``"tfq"``), trains under
    ``tf.distribute`` strategies (build it inside ``strategy.scope()``) and converts with
    ``tfq.convert(qat_model, "int8")`` without representative data.

    ``preserve`` keeps what compression made (tfmot's PQAT/CQAT): ``"sparsity"`` fixes the zeros of
    every weighted layer that has some (from :func:`tfq.pruning.strip_pruning`), ``"clusters"`` the
    shared values of every kernel with at most 256 distinct ones (from
    :func:`tfq.clustering.strip_clustering`; the shared values train, the assignment stays). BN
    folding and per-channel fake-quant keep both, so the INT8 ``.tflite`` has the zeros and at most
    as many distinct int8 values per output channel (:meth:`QuantizedLayer.init_preservation`). A
    model still wrapped by ``prune_low_magnitude``/``cluster_weights`` is stripped first.

    Args:
        model: a built Functional or Sequential Keras 3 model (nested models allowed; a layer called
            several times gets its own ranges and fusions at each call and keeps one kernel), a
            subclassed model called once (traced through its ``call``), a tf_keras model, or a path.
        recipe: :class:`~tfq.recipes.Recipe`, preset name, dict or file (default ``"qat_int8"``).
        range_mode: ``"moving_average"`` or ``"learned"``.
        decay: moving-average decay (default: the recipe's ``decay`` parameter, else 0.999).
        calibration_data: if given, ranges start from a calibration pass on it — recommended when
            fine-tuning a trained model. Calibration runs in inference mode (BN moving statistics);
            for a model trained from scratch, whose moving statistics mean nothing yet, leave it out:
            ranges then start from the first training batch.
        calibration: method for that pass (``"minmax"``, ``"percentile"``, ``"kl"``, ``"mse"`` …).
            Default: the recipe's calibration (``"kl"`` for ``recipe="int8_kl"``), or ``"minmax"``
            when the recipe's is ``"moving_average"`` (a QAT recipe such as the default
            ``"qat_int8"``: its ``decay`` drives the moving average in training). Given with a
            recipe whose calibration differs, it is refused; given without ``calibration_data``,
            it is refused (it would choose nothing).
        num_calibration_samples: cap on calibration samples.
        warn_unknown: warn about layers that stay float because tfq has no rule for them.
        preserve: ``None``, ``"sparsity"`` or ``"clusters"`` (see above).
        bn_folding: how folded BatchNorms train until :class:`tfq.callbacks.FreezeBatchNorm`
            freezes their statistics: ``"unfolded"`` (default; BN after the op on the
            fake-quantized weights, the cost of Keras' float BN) or ``"two_pass"``
            (Krishnamoorthi's batch-statistics correction, statistics from a second, float op:
            one more convolution per step). See docs/benchmarks.md "QAT cost" for the trade-off measured.
        logits_range: range of the quantizer on the input of a softmax fused in its layer
            (``Dense(..., activation="softmax")``): ``"tensor"`` (default; its min/max, like every
            other activation) or ``"softmax"`` (the logits the int8 softmax output depends on,
            :class:`~tfq.observers.SoftmaxInputObserver`, in calibration and in the moving
            average: confident samples no longer stretch the range, so the logits between classes
            get a finer grid; the argmax is kept and no probability moves by more than one output
            step). docs/benchmarks.md "QAT cost" has the accuracy measured with each: neither wins everywhere.
        **calibration_params: parameters of the calibration method (``percentile=99.9`` with
            ``calibration="percentile"``), merged into the recipe's when the method is the
            recipe's. Any other keyword is refused.

    Returns:
        A new ``keras.Model`` ready for ``compile``/``fit``.

    Raises:
        ValueError: bad ``range_mode``, ``preserve``, ``bn_folding`` or ``decay``; a subclassed model
            never called (its input shapes are unknown; a called one is traced through its ``call``); a
            stateful RNN; a recipe without integer tensors (``"fp16"``); a model that already is a tfq
            QAT model; ``calibration`` conflicting with the recipe's, or a calibration choice without
            ``calibration_data``.
        TypeError: ``model`` is not a model or a path; a keyword that is no option nor a
            parameter of any calibration method; an option of the wrong type.
    """

    _check_qat_options(range_mode, preserve, decay, warn_unknown, num_calibration_samples, calibration_params)
    model = load_keras_model(model)
    if is_quantized_model(model):
        raise ValueError(f"model {model.name!r} already is a tfq QAT model (it has fake-quant layers): train it as "
                         f"is, or pass the float model it was made from to quantize_model.")

    model = strip_all(model)
    r = load_recipe(recipe if recipe is not None else "qat_int8")
    if not (r.weights.is_integer or r.activations.is_integer):
        raise ValueError(f"quantize_model trains towards an integer model, but recipe {r.name or r.mode!r} "
                         f"(mode {r.mode!r}) quantizes no tensor to integers, so the model would get no fake-quant "
                         f"op. Pass an integer recipe (e.g. 'qat_int8'), or convert the float model directly: "
                         f"tfq.convert(model, {r.mode!r}).")
    method, params = _calibration_choice(r, recipe is not None, calibration, calibration_params,
                                         calibration_data is not None)
    if decay is None:
        decay = float(r.calibration_params.get("decay", 0.999))
    qmodel = rewrite_model(model, r, range_mode=range_mode, decay=decay, warn_unknown=warn_unknown,
                           trainable=True, preserve=preserve, bn_folding=bn_folding, logits_range=logits_range)
    if calibration_data is not None:
        cal = calibrate(qmodel, calibration_data, method, num_samples=num_calibration_samples, **params)
        quantizers = quantizers_of(qmodel)
        for name, (lo, hi) in cal.ranges.items():
            quantizers[name].set_range(lo, hi)
    return qmodel


def _check_qat_options(range_mode, preserve, decay, warn_unknown, num_calibration_samples, calibration_params):
    """quantize_model's options, checked before any work (one line each)."""
    if range_mode not in ("moving_average", "learned"):
        raise ValueError(f"range_mode must be 'moving_average' or 'learned'. "
                         f"Received: range_mode={short_repr(range_mode)}")
    if preserve not in (None, "sparsity", "clusters"):
        raise ValueError(f"preserve must be None, 'sparsity' or 'clusters'. Received: preserve={short_repr(preserve)}")
    check_bool("warn_unknown", warn_unknown)
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay < 1):
        raise ValueError(f"decay must be a number in (0, 1) (e.g. 0.999), or None for the recipe's. "
                         f"Received: decay={short_repr(decay)}")
    if num_calibration_samples is not None and (isinstance(num_calibration_samples, bool) or not isinstance(
            num_calibration_samples, numbers.Integral) or num_calibration_samples < 1):
        raise ValueError(f"num_calibration_samples must be an int >= 1, or None for all. "
                         f"Received: num_calibration_samples={short_repr(num_calibration_samples)}")
    known = {key for name in calibration_method_names() for key in get_calibration_method(name).params}
    for key, value in calibration_params.items():
        if key not in known:
            raise TypeError(f"quantize_model() got an unexpected keyword argument {key!r}: it is no option of "
                            f"quantize_model nor a parameter of any calibration method ({', '.join(sorted(known))}). "
                            f"Received: {key}={short_repr(value)}")


def _calibration_choice(r, recipe_given: bool, calibration, calibration_params: dict, has_data: bool):
    """(method, parameters) of the calibration pass: ``calibration`` or the recipe's (see quantize_model)."""
    recipe_method = r.calibration if r.calibration != "moving_average" else None
    if calibration is not None:
        get_calibration_method(calibration)  # a one-line error naming the registered methods
        if recipe_given and recipe_method is not None and calibration != recipe_method:
            raise ValueError(f"calibration={calibration!r} conflicts with the calibration of recipe "
                             f"{r.name or r.mode!r}, {recipe_method!r}. Pass one of them (e.g. "
                             f"recipe.replace(calibration={calibration!r})).")
        method = calibration
    else:
        method = recipe_method if recipe_given and recipe_method else "minmax"
    params = dict(r.calibration_params) if method == recipe_method else {}
    for key, value in calibration_params.items():
        if key not in get_calibration_method(method).params:
            owners = [n for n in calibration_method_names() if key in get_calibration_method(n).params]
            raise ValueError(f"{key}={short_repr(value)} is a parameter of calibration={owners[0]!r}, not of the "
                             f"calibration used, {method!r}: pass calibration={owners[0]!r} too, or drop {key}.")
    params.update(calibration_params)
    get_calibration_method(method).check_params(params, "calibration parameter")
    if not has_data and (calibration is not None or calibration_params):
        given = ", ".join(([f"calibration={calibration!r}"] if calibration is not None else [])
                          + [f"{k}={short_repr(v)}" for k, v in calibration_params.items()])
        raise ValueError(f"{given} choose(s) the starting ranges from calibration_data, which was not given: pass "
                         f"calibration_data=x_train[:512], or drop it (ranges then start from the first training "
                         f"batch).")
    return method, params
