"""Bias correction: remove the mean output shift that weight quantization causes.

With quantized weights ``W̃ = W + ε``, a layer's output moves by ``ε·x``; its expectation
``E[ε·x] = ε·E[x]`` is a per-channel bias error that survives averaging and accumulates through
the network (Nagel et al., 2019, "Data-Free Quantization", section 4.2). Subtracting it from the
layer's bias removes it::
    b ← b − Δ,      Δ_o = E[(x ⊛ ε)_o]

* **empirical**: ``Δ`` measured on calibration data — the layer's input in the fake-quant model,
  run through ``ε`` and averaged over samples and positions (padding included).
* **analytical** (no data): ``E[x]`` from the BatchNorm before the layer. The pre-activation
  after a BatchNorm is taken as ``N(β, γ²)`` per channel, so after a ReLU (or ReLU6, or nothing)
  ``E[x] = E[clip(z, lo, hi)]`` (:func:`clipped_normal_mean`) and
  ``Δ_o = Σ_{k,i} ε[k, i, o] · E[x_i]`` (zero padding ignored). Layers whose input has no such
  statistics (the first layer, after max-pooling or an addition …) are not corrected. It is only
  as good as that Gaussian model: measured here on the MobileNet-style digits model, ``E[x]`` was
  within 20–30 % and the mean output shift of the pointwise layers fell 3–5× (empirical: 50–100×);
  on the 8×8 digits CNN, whose mostly-zero images give far-from-Gaussian pre-activations, it did
  not help.

The bias changed is the one the converter writes: ``β + (b − μ)·γ/σ`` after BatchNorm folding
(through ``β``), or the layer's own bias. A layer with neither bias nor BatchNorm cannot be
corrected; a warning names it.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

from tfq.core.representative import representative_dataset
from tfq.models.graph import ModelGraph
from tfq.ptq.weight_rounding import _factor, wrapped_kernel
from tfq.quantsim.layers import (
    ActivationQuantizer,
    FloatBarrier,
    QuantizedLayer,
    tapping,
)
from tfq.quantsim.rewrite import _walk_layers, quantized_layers_of

__all__ = ["BIAS_CORRECTION_METHODS", "clipped_normal_mean", "correct_biases", "expected_shift"]

BIAS_CORRECTION_METHODS = ("empirical", "analytical")


def clipped_normal_mean(mean, std, low: float = -math.inf, high: float = math.inf) -> np.ndarray:
    """``E[clip(z, low, high)]`` for ``z ~ N(mean, std²)``, per element.

    With ``a = (low − μ)/σ``, ``b = (high − μ)/σ``, ``Φ``/``φ`` the standard normal CDF/PDF::
        E = low·Φ(a) + high·(1 − Φ(b)) + μ·(Φ(b) − Φ(a)) + σ·(φ(a) − φ(b))

    (terms with an infinite bound vanish). ``σ = 0`` gives ``clip(μ, low, high)``.

    Example:
        >>> round(float(clipped_normal_mean(0.0, 1.0, 0.0)), 4)     # E[relu(z)] = 1/sqrt(2π)
        0.3989
    """
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.abs(np.asarray(std, dtype=np.float64))
    mu, sigma = np.broadcast_arrays(mu, sigma)
    out = np.clip(mu, low, high).astype(np.float64)
    ok = sigma > 0
    if not np.any(ok):
        return out
    m, s = mu[ok], sigma[ok]
    cdf = np.vectorize(lambda t: 0.5 * (1.0 + math.erf(t / math.sqrt(2.0))), otypes=[np.float64])
    pdf = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)  # noqa: E731
    result = np.zeros_like(m)
    if np.isfinite(low):
        a = (low - m) / s
        cdf_a, pdf_a = cdf(a), pdf(a)
        result += low * cdf_a
    else:
        cdf_a, pdf_a = np.zeros_like(m), np.zeros_like(m)
    if np.isfinite(high):
        b = (high - m) / s
        cdf_b, pdf_b = cdf(b), pdf(b)
        result += high * (1.0 - cdf_b)
    else:
        cdf_b, pdf_b = np.ones_like(m), np.zeros_like(m)
    result += m * (cdf_b - cdf_a) + s * (pdf_a - pdf_b)
    out[ok] = result
    return out


_ACTIVATION_BOUNDS = {"linear": (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 6.0)}


def expected_shift(error_kernel, input_mean, depthwise: bool = False) -> np.ndarray:
    """``Δ_o = Σ_{k,i} ε[k, i, o] · E[x_i]``: the mean output shift of a kernel error on a constant-mean input.

    Args:
        error_kernel: ``W̃ − W``, ``(..., in, out)`` (depthwise ``(..., in, multiplier)``).
        input_mean: ``(in,)``.
        depthwise: output channel ``i·multiplier + m`` reads input channel ``i`` only.

    Example:
        >>> expected_shift(np.array([[1.0, 0.0], [2.0, -1.0]]), np.array([1.0, 3.0])).tolist()
        [7.0, -3.0]
    """
    e = np.asarray(error_kernel, dtype=np.float64)
    mean = np.asarray(input_mean, dtype=np.float64)
    if depthwise:
        weighted = e * mean.reshape((1,) * (e.ndim - 2) + (-1, 1))
        return weighted.reshape(-1, e.shape[-2] * e.shape[-1]).sum(axis=0)
    shape = [1] * e.ndim
    shape[-2] = -1
    return (e * mean.reshape(shape)).reshape(-1, e.shape[-1]).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Model walk.


def _quantized_error(wrapper, references=None):
    """``(ε, kind)``: the fake-quantized folded kernel minus the float one, in the op's layout.

    ``references`` (``{id(wrapper): folded float kernel}``) gives the float kernel when the
    wrapper's own kernel was already put on the grid (by :mod:`tfq.ptq.weight_rounding`).
    """

    target = wrapped_kernel(wrapper)
    if target is None:
        return None, None
    _, axis = wrapper._kernel_and_scale_axis()
    quantized = keras.ops.convert_to_numpy(wrapper._quantize_any(target.folded.astype(np.float32), axis))
    reference = (references or {}).get(id(wrapper), target.folded)
    return np.asarray(quantized, np.float64) - reference, target.kind


def _apply(wrapper, delta: np.ndarray) -> bool:
    """Subtracts ``delta`` from the folded bias; False if the layer has no bias to change."""
    bn = wrapper.batchnorm
    layer = wrapper.layer
    if bn is not None and bn.center:
        bn.beta.assign((keras.ops.convert_to_numpy(bn.beta).astype(np.float64) - delta).astype(np.float32))
        return True
    if bn is not None:
        # β is absent: b_fold = (b − μ)·f, so μ ← μ + Δ/f where f ≠ 0.

        f = _factor(wrapper).astype(np.float64)
        mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
        bn.moving_mean.assign(np.where(f != 0, mean + delta / np.where(f != 0, f, 1.0), mean).astype(np.float32))
        return True
    if layer.use_bias:
        layer.bias.assign((keras.ops.convert_to_numpy(layer.bias).astype(np.float64) - delta).astype(np.float32))
        return True
    return False


def _empirical_shifts(model, wrappers, data, num_samples, batch_size, references) -> dict:
    """``Δ`` per wrapper: mean of ``x ⊛ ε`` over the calibration data, inputs from the fake-quant model."""

    errors = {}
    for w in wrappers:
        eps, _ = _quantized_error(w, references)
        if eps is not None:
            errors[id(w)] = (w, eps.astype(np.float32))
    sums = {key: 0.0 for key in errors}
    counts = {key: 0 for key in errors}
    rep = representative_dataset(data, num_samples, model=model)
    with tapping([w for w, _ in errors.values()]) as records:
        for batch in rep.batches(batch_size):
            model(batch if len(batch) > 1 else batch[0], training=False)
            for key, (w, eps) in errors.items():
                for x in records[key]["inputs"]:
                    y = keras.ops.convert_to_numpy(w._linear(x, eps)).astype(np.float64)
                    y = y.reshape(-1, y.shape[-1])
                    sums[key] = sums[key] + y.sum(axis=0)
                    counts[key] += y.shape[0]
                records[key]["inputs"].clear()
                records[key]["pre_activation"].clear()
    return {key: (errors[key][0], sums[key] / max(counts[key], 1)) for key in errors if counts[key]}


def _input_statistics(graph, node) -> tuple | None:
    """``(E[x] per channel, repeat)`` of a wrapper's input, from the BatchNorm that made it (or None)."""

    key = node.first_input
    repeat = 1
    mean_preserving = (ActivationQuantizer, FloatBarrier, keras.layers.Dropout, keras.layers.GlobalAveragePooling1D,
                       keras.layers.GlobalAveragePooling2D, keras.layers.AveragePooling1D,
                       keras.layers.AveragePooling2D)
    while key is not None:
        producer = graph.producer(key)
        if producer is None or producer.layer is None:
            return None
        layer = producer.layer
        if isinstance(layer, QuantizedLayer):
            bn = layer.batchnorm
            if bn is None or layer.activation not in _ACTIVATION_BOUNDS:
                return None
            n = int(bn.moving_mean.shape[0])
            gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else np.ones(n)
            beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else np.zeros(n)
            low, high = _ACTIVATION_BOUNDS[layer.activation]
            return clipped_normal_mean(beta, gamma, low, high), repeat
        if isinstance(layer, keras.layers.Flatten):
            shape = producer.shapes[0] if producer.shapes else ()
            if len(shape) < 2 or any(d is None for d in shape[1:]):
                return None
            repeat *= int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        elif not isinstance(layer, mean_preserving):
            return None
        key = producer.first_input
    return None


def _analytical_shifts(model, wrappers, references) -> dict:
    wanted = {id(w) for w in wrappers}
    shifts = {}
    levels = [model] + [layer for layer in _walk_layers(model) if isinstance(layer, keras.Model)]
    for level in levels:
        graph = ModelGraph(level)
        for node in graph.nodes:
            if not isinstance(node.layer, QuantizedLayer) or id(node.layer) not in wanted or node.calls != 1:
                continue
            stats = _input_statistics(graph, node)
            if stats is None:
                continue
            eps, kind = _quantized_error(node.layer, references)
            if eps is None:
                continue
            mean, repeat = stats
            mean = np.tile(mean, repeat)
            if eps.shape[-2] != mean.shape[0]:
                continue
            shifts[id(node.layer)] = (node.layer, expected_shift(eps, mean, depthwise=kind == "depthwise"))
    return shifts


def correct_biases(model, method: str, data=None, *, num_samples: int | None = 512,
                   batch_size: int = 64, references: dict | None = None) -> dict[str, np.ndarray]:
    """Corrects, in place, the bias of every wrapped layer of a frozen fake-quant model.

    Args:
        model: a frozen model from :func:`tfq.qat.freeze_model` (tfq's own object: it is changed).
        method: ``"empirical"`` (needs ``data``) or ``"analytical"``.
        data: calibration data for ``"empirical"``.
        num_samples: cap on samples (empirical).
        batch_size: samples per forward pass (empirical).
        references: ``{id(wrapper): folded float kernel}`` for layers whose kernels
            :mod:`tfq.ptq.weight_rounding` already put on the grid (``ε`` is then measured against them).

    Returns:
        ``{wrapper name: Δ}``, the shift subtracted from each corrected layer's folded bias.

    Raises:
        ValueError: unknown method; ``"empirical"`` without data; ``"analytical"`` on a model none of
            whose quantized layers reads a BatchNorm's output (nothing to correct).

    Example:
        >>> shifts = correct_biases(frozen, "empirical", x_train[:256])    # doctest: +SKIP
    """

    if method not in BIAS_CORRECTION_METHODS:
        raise ValueError(f"bias correction method must be one of {BIAS_CORRECTION_METHODS}. Received: {method!r}")
    wrappers = [w for w in quantized_layers_of(model) if not w.float_weights]
    if method == "empirical":
        if data is None:
            raise ValueError("bias_correction='empirical' needs calibration data; pass representative_data, or use "
                             "'analytical' (BatchNorm statistics).")
        shifts = _empirical_shifts(model, wrappers, data, num_samples, batch_size, references)
    else:
        shifts = _analytical_shifts(model, wrappers, references)
        if wrappers and not shifts:
            raise ValueError(
                f"bias_correction='analytical' takes each layer's input mean from the BatchNorm (and ReLU) that makes "
                f"its input, and no quantized layer of model {model.name!r} reads one, so nothing would be corrected. "
                f"Use bias_correction='empirical' with representative_data, or convert without bias_correction.")
    done, refused = {}, []
    for wrapper, delta in shifts.values():
        if _apply(wrapper, delta):
            done[wrapper.name] = delta
        else:
            refused.append(wrapper.name)
    if refused:
        warnings.warn(f"tfq: bias correction cannot change {', '.join(refused)}: these layers have neither a bias "
                      f"nor a BatchNorm (build them with use_bias=True to correct them).", stacklevel=3)
    return done


def correction_step(frozen, ctx) -> dict:
    """The ``bias_correction`` post-training method (:mod:`tfq.core.ptq_methods`) on the frozen model:
    :func:`correct_biases`, the shift measured against the float kernels before the earlier steps
    (learned rounding) changed them; the shifts are also ``MethodsReport.bias_shifts``."""
    r = ctx.recipe
    method = r.bias_correction_method
    if method == "empirical" and ctx.data is None:
        raise ValueError("bias_correction='empirical' measures the shift on calibration data: pass "
                         "representative_data, or use bias_correction='analytical' (BatchNorm statistics).")
    shifts = correct_biases(frozen, method, ctx.data, num_samples=r.num_calibration_samples or 512,
                            references=ctx.shared.get("references"))
    if ctx.report is not None:
        ctx.report.bias_shifts = shifts
    return shifts
