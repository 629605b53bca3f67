"""Data-free INT8: activation ranges without calibration data, from BatchNorm statistics.

A trained BatchNorm remembers the distribution of its layer's output: ``z ~ N(β, γ²)`` per
channel after normalisation. Two ways to use it:

* ``"synthetic"`` (ZeroQ, Cai et al., 2020): synthesize inputs whose statistics match every
  BatchNorm — starting from Gaussian noise, minimise with Adam over the inputs

  ::
      L = Σ_l ‖mean(u_l)‖₂ + ‖std(u_l) − 1‖₂,     u_l = (z_l − β_l) / |γ_l|

  (means and standard deviations per channel over the batch and positions, ``z_l`` the
  pre-activation of layer ``l`` with its BatchNorm folded in) — then calibrate on them as on
  real data. Every tensor gets a range, and data-driven methods (AdaRound, GPTQ, empirical bias
  correction) can run on the synthetic inputs.
* ``"bn_statistics"`` (DFQ, Nagel et al., 2019): the output of a layer with a folded BatchNorm
  and a fused ReLU/ReLU6/linear activation gets ``[min_c(β − kγ), max_c(β + kγ)]`` (k = 6),
  clipped by the activation; tensors without such statistics (model input, pooling, logits)
  take their ranges from synthetic inputs as above.

The maths (:func:`batchnorm_matching_loss`, :func:`batchnorm_range`) takes arrays or tensors;
:func:`synthesize_inputs` and :func:`batchnorm_ranges` walk a rewritten model.
"""

from __future__ import annotations

import keras
import numpy as np

from tfq.quantsim.layers import observing, tapping
from tfq.quantsim.rewrite import quantized_layers_of

__all__ = ["DATA_FREE_METHODS", "batchnorm_matching_loss", "batchnorm_range", "batchnorm_ranges",
           "synthesize_inputs"]

DATA_FREE_METHODS = ("synthetic", "bn_statistics")
NUM_SAMPLES = 256
STEPS = 100
BATCH_SIZE = 64
LEARNING_RATE = 0.2
NUM_STD = 6.0


def batchnorm_matching_loss(pre_activations, betas, gammas):
    """``Σ_l ‖mean(u_l)‖₂ + ‖std(u_l) − 1‖₂`` with ``u_l = (z_l − β_l) / |γ_l|`` (channels last).

    Channels with ``|γ| < 1e-6`` (dead) are left out.

    Args:
        pre_activations: one tensor per layer, channels on the last axis.
        betas: per-channel ``β`` of each layer's BatchNorm.
        gammas: per-channel ``γ``.

    Example:
        >>> z = np.array([[1.0], [3.0]], np.float32)                 # mean 2, std 1
        >>> float(batchnorm_matching_loss([z], [np.float32([2.0])], [np.float32([1.0])]))
        0.0
    """
    total = 0.0
    for z, beta, gamma in zip(pre_activations, betas, gammas):
        gamma = np.asarray(gamma, np.float32)
        live = np.abs(gamma) >= 1e-6
        if not np.any(live):
            continue
        z = keras.ops.reshape(z, (-1, z.shape[-1]))
        u = (z - np.asarray(beta, np.float32)) / np.where(live, np.abs(gamma), 1.0)
        u = keras.ops.take(u, np.flatnonzero(live), axis=1)
        mean = keras.ops.mean(u, axis=0)
        std = keras.ops.sqrt(keras.ops.var(u, axis=0) + 1e-8)
        total = total + keras.ops.norm(mean) + keras.ops.norm(std - 1.0)
    return total


def batchnorm_range(beta, gamma, activation: str = "linear", num_std: float = NUM_STD) -> tuple[float, float]:
    """The range of ``act(z)``, ``z ~ N(β, γ²)`` per channel: ``[min_c(β − kγ), max_c(β + kγ)]``, then ``act``.

    Example:
        >>> batchnorm_range([1.0, -2.0], [0.5, 1.0], "relu", num_std=2.0)
        (0.0, 2.0)
    """
    beta = np.asarray(beta, np.float64)
    gamma = np.abs(np.asarray(gamma, np.float64))
    lo, hi = float(np.min(beta - num_std * gamma)), float(np.max(beta + num_std * gamma))
    if activation == "relu":
        lo, hi = max(lo, 0.0), max(hi, 0.0)
    elif activation == "relu6":
        lo, hi = min(max(lo, 0.0), 6.0), min(max(hi, 0.0), 6.0)
    return lo, hi


def _bn_wrappers(qmodel):
    return [w for w in quantized_layers_of(qmodel) if w.batchnorm is not None]


def _bn_vectors(wrapper):
    bn = wrapper.batchnorm
    n = int(bn.moving_mean.shape[0])
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else np.ones(n, np.float32)
    beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else np.zeros(n, np.float32)
    return np.asarray(beta, np.float32), np.asarray(gamma, np.float32)


def synthesize_inputs(qmodel, num_samples: int = NUM_SAMPLES, *, steps: int = STEPS, batch_size: int = BATCH_SIZE,
                      learning_rate: float = LEARNING_RATE, seed: int = 0) -> np.ndarray:
    """Inputs whose statistics match the model's BatchNorms (ZeroQ), for calibration without data.

    Args:
        qmodel: a model rewritten by :func:`tfq.quantsim.rewrite.rewrite_model` (run in float here).
        num_samples: how many inputs.
        steps: Adam steps per batch.
        batch_size: inputs optimised together (statistics are batch statistics).
        learning_rate: Adam's learning rate.
        seed: the initial noise.

    Returns:
        float32 ``(num_samples, *input_shape)``.

    Raises:
        ValueError: the model has several inputs, an input of unknown shape, or no BatchNorm.

    Example:
        >>> x_synthetic = synthesize_inputs(tfq.quantsim.rewrite.rewrite_model(model))   # doctest: +SKIP
    """
    import tensorflow as tf

    inputs = qmodel.inputs
    if len(inputs) != 1:
        raise ValueError(f"data_free needs a model with one input; {qmodel.name!r} has {len(inputs)}. "
                         f"Pass representative_data instead.")
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"data_free needs a fixed input shape to synthesize inputs; {qmodel.name!r} takes "
                         f"{(None, *shape)}. Build the model with a fixed keras.Input shape, or pass "
                         f"representative_data.")
    wrappers = _bn_wrappers(qmodel)
    if not wrappers:
        raise ValueError(f"data_free needs BatchNormalization statistics, and model {qmodel.name!r} has no "
                         f"BatchNormalization after a Conv/Dense layer. Pass representative_data instead.")
    stats = [_bn_vectors(w) for w in wrappers]
    betas = [b for b, _ in stats]
    gammas = [g for _, g in stats]

    def loss_of(x):
        with observing({}), tapping(wrappers) as records:
            qmodel(x, training=False)
        pre = [records[id(w)]["pre_activation"][-1] for w in wrappers]
        return batchnorm_matching_loss(pre, betas, gammas)

    rng = np.random.default_rng(seed)
    batch = min(batch_size, num_samples)
    x = tf.Variable(np.zeros((batch, *shape), np.float32))
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build([x])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_of(x)
        optimizer.apply_gradients([(tape.gradient(loss, x), x)])
        return loss

    out = []
    for _ in range(-(-num_samples // batch)):
        x.assign(rng.standard_normal((batch, *shape)).astype(np.float32))
        for v in optimizer.variables:  # each batch starts a fresh Adam (moments, step count)
            v.assign(keras.ops.zeros(v.shape, v.dtype))
        optimizer.learning_rate = learning_rate  # a variable too
        for _ in range(steps):
            step()
        out.append(keras.ops.convert_to_numpy(x))
    return np.concatenate(out)[:num_samples].astype(np.float32)


def batchnorm_ranges(qmodel, num_std: float = NUM_STD) -> dict[str, tuple[float, float]]:
    """Ranges of the outputs of wrapped layers with a folded BatchNorm, from its ``β`` and ``γ``.

    Only outputs whose activation is fused (ReLU, ReLU6, linear) and that have their own
    quantizer are covered: ``{quantizer name: (min, max)}`` (see :func:`batchnorm_range`).
    """
    ranges = {}
    for wrapper in _bn_wrappers(qmodel):
        q = wrapper.output_quantizer
        if q is None or q.mode == "fixed" or wrapper.activation not in ("linear", "relu", "relu6"):
            continue
        beta, gamma = _bn_vectors(wrapper)
        ranges[q.name] = batchnorm_range(beta, gamma, wrapper.activation, num_std)
    return ranges


def synthesize_step(qmodel, ctx):
    """The ``data_free`` method's ``"calibration_inputs"`` step (:mod:`tfq.core.ptq_methods`): inputs
    synthesized from BatchNorm statistics (the recipe's ``num_calibration_samples``, default :data:`NUM_SAMPLES`)."""
    r = ctx.recipe
    return synthesize_inputs(qmodel, r.num_calibration_samples or NUM_SAMPLES, seed=r.seed)


def ranges_step(qmodel, ctx) -> dict:
    """The ``data_free`` method's ``"ranges"`` step: BatchNorm ranges with ``data_free="bn_statistics"``."""
    return batchnorm_ranges(qmodel) if ctx.recipe.data_free_method == "bn_statistics" else {}
