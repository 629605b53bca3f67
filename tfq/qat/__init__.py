"""Quantization-aware training for Keras 3 models.

Example:
    >>> qat_model = tfq.qat.quantize_model(model, calibration_data=x_train[:256])   # doctest: +SKIP
    >>> qat_model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])  # doctest: +SKIP
    >>> qat_model.fit(x_train, y_train, epochs=2)                                    # doctest: +SKIP
    >>> tflite = tfq.convert(qat_model, "int8")                                      # doctest: +SKIP
"""

from __future__ import annotations

import keras

from tfq.compression.common import strip_all
from tfq.core.recipes import load_recipe
from tfq.models.interop import load_keras_model
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


def quantize_model(
    model,
    recipe=None,
    *,
    range_mode: str = "moving_average",
    decay: float | None = None,
    calibration_data=None,
    calibration: str = "minmax",
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
        num_calibration_samples: cap on calibration samples.
        warn_unknown: warn about layers that stay float because tfq has no rule for them.
        preserve: ``None``, ``"sparsity"`` or ``"clusters"`` (see above).
        bn_folding: how folded BatchNorms train until :class:`tfq.callbacks.FreezeBatchNorm`
            freezes their statistics: ``"unfolded"`` (default; BN after the op on the
            fake-quantized weights, the cost of Keras' float BN) or ``"two_pass"``
            (Krishnamoorthi's batch-statistics correction, statistics from a second, float op:
            one more convolution per step). See README "QAT cost" for the trade-off measured.
        logits_range: range of the quantizer on the input of a softmax fused in its layer
            (``Dense(..., activation="softmax")``): ``"tensor"`` (default; its min/max, like every
            other activation) or ``"softmax"`` (the logits the int8 softmax output depends on,
            :class:`~tfq.observers.SoftmaxInputObserver`, in calibration and in the moving
            average: confident samples no longer stretch the range, so the logits between classes
            get a finer grid; the argmax is kept and no probability moves by more than one output
            step). README "QAT cost" has the accuracy measured with each: neither wins everywhere.
        **calibration_params: parameters of the calibration method.

    Returns:
        A new ``keras.Model`` ready for ``compile``/``fit``.

    Raises:
        ValueError: bad ``range_mode``, ``preserve`` or ``bn_folding``; a subclassed model never called
            (its input shapes are unknown; a called one is traced through its ``call``); a stateful RNN.
        TypeError: ``model`` is not a model or a path.
    """

    if range_mode not in ("moving_average", "learned"):
        raise ValueError(f"range_mode must be 'moving_average' or 'learned'. Received: range_mode={range_mode!r}")
    if preserve not in (None, "sparsity", "clusters"):
        raise ValueError(f"preserve must be None, 'sparsity' or 'clusters'. Received: preserve={preserve!r}")
    model = load_keras_model(model)

    model = strip_all(model)
    r = load_recipe(recipe if recipe is not None else "qat_int8")
    if decay is None:
        decay = float(r.calibration_params.get("decay", 0.999))
    qmodel = rewrite_model(model, r, range_mode=range_mode, decay=decay, warn_unknown=warn_unknown,
                           trainable=True, preserve=preserve, bn_folding=bn_folding, logits_range=logits_range)
    if calibration_data is not None:
        cal = calibrate(qmodel, calibration_data, calibration, num_samples=num_calibration_samples,
                        **calibration_params)
        quantizers = quantizers_of(qmodel)
        for name, (lo, hi) in cal.ranges.items():
            quantizers[name].set_range(lo, hi)
    return qmodel
