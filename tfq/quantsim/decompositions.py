"""Built-in decompositions: layers and ops rewritten as sequences of ops with int8 TFLite kernels.

Each function computes a layer's (or a ``keras.ops`` operation's) output from its symbolic inputs
with ``keras.ops`` only, so that the rewrite can give every intermediate tensor a fake-quant range
chosen by tfq's calibration — the ranges the TFLite converter then writes. They are registered in
:mod:`tfq.quantsim.registry`; the rewrite checks on probe data that each computes what the layer does.

* :func:`layer_normalization` — without the NEG the converter leaves float in its own lowering.
* :func:`dot_product_attention` — the fused attention op as scores, softmax and context.
* :func:`lstm`, :func:`gru`, :func:`simple_rnn` — unrolled over a static number of time steps
  (the converter's while loop has no int8 kernel, and fails on Keras's default RNNs).
* :func:`bidirectional` — a Bidirectional RNN as its two recurrent layers (unrolled as above) and the merge.
* :func:`masked_softmax` — a Softmax layer called with a mask (attention's), the masked logits in a range
  of their own.
* :func:`transformer_decoder` — keras-hub's ``TransformerDecoder`` (GPT-2 style) with its causal mask a
  constant of the static sequence length (the layer's own call builds it with RANGE and float ops).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from tfq.quantsim.layers import Statistic, activation_name

__all__ = ["bidirectional", "dot_product_attention", "gru", "layer_normalization", "lstm", "masked_softmax",
           "simple_rnn", "transformer_decoder"]


def _reduction_axes(layer, rank: int) -> list[int]:
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axis)


def layer_normalization(layer: keras.layers.LayerNormalization, x, **kwargs):
    """LayerNormalization as MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD — all int8 in TFLite::
        μ = mean(x)            d = x − μ            v = mean(d · d)
        y = d · rsqrt(v + ε) · γ + β

    With ``rms_scaling``: ``y = x · rsqrt(mean(x · x) + ε) · γ``. Each line's results are
    separate int8 tensors, so the normalisation has no float op (the converter's own lowering
    keeps a NEG float). The statistics (μ, d·d, v, v + ε, its rsqrt) are calibrated by MinMax
    whatever the method (see :class:`~tfq.quantsim.layers.Statistic`).
    """
    if kwargs.get("mask") is not None:
        raise ValueError("masked LayerNormalization is not decomposed")
    axes = _reduction_axes(layer, len(x.shape))
    if getattr(layer, "rms_scaling", False):
        d = x
    else:
        d = ops.subtract(x, Statistic()(ops.mean(x, axis=axes, keepdims=True)))
    variance = Statistic()(ops.mean(Statistic()(ops.multiply(d, d)), axis=axes, keepdims=True))
    y = ops.multiply(d, Statistic()(ops.rsqrt(Statistic()(ops.add(variance, layer.epsilon)))))
    if layer.scale:
        y = ops.multiply(y, _broadcastable(layer.gamma, axes, len(x.shape)))
    if layer.center and not getattr(layer, "rms_scaling", False):
        y = ops.add(y, _broadcastable(layer.beta, axes, len(x.shape)))
    return y


def _broadcastable(variable, axes: list[int], rank: int):
    """γ/β as the op's operand: the variable itself when it already broadcasts (last axes)."""
    if axes == list(range(rank - len(variable.shape), rank)):
        return variable
    shape = [1] * rank
    for a, d in zip(axes, variable.shape):
        shape[a] = d
    return ops.reshape(variable, shape)


def dot_product_attention(op, query, key, value, bias=None, mask=None, scale=None, **kwargs):
    """``keras.ops.dot_product_attention`` (inputs ``(B, T, N, H)``) as TFLite runs attention::
        q' = q · scale                      (MUL)
        s  = einsum(q', k)                  (BATCH_MATMUL, logits B×N×T×S)
        p  = softmax(where(mask, s, −∞))    (SOFTMAX, output range [0, 1) fixed by TFLite)
        o  = einsum(p, v)                   (BATCH_MATMUL)

    Each result is an int8 tensor with its own range. Logit soft-capping is not decomposed.
    """
    if getattr(op, "attn_logits_soft_cap", None) is not None or kwargs:
        raise ValueError("soft-capped attention is not decomposed")
    head_dim = query.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    logits = ops.einsum("btnh,bsnh->bnts", ops.multiply(query, scale), key)
    if bias is not None:
        logits = ops.add(logits, bias)
    if getattr(op, "is_causal", False):
        t, s = query.shape[1], key.shape[1]
        if t is None or s is None:
            raise ValueError("causal attention needs static sequence lengths")
        causal = ops.tril(ops.ones((t, s), dtype="bool"))
        mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)
    if mask is not None:
        logits = _masked_logits(logits, ops.cast(mask, "bool"), axis=-1)
    probs = ops.softmax(logits, axis=-1)
    return ops.einsum("bnts,bsnh->btnh", probs, value)


def _mask_margin(length: int) -> float:
    """How far below a row's smallest logit the masked ones are put: their total weight after the
    softmax, at most ``length · e^−margin``, stays below 1e-5 (``margin = ln(length · 10⁵)``)."""
    return math.log(max(int(length), 1) * 1e5)


def _masked_logits(logits, mask, axis: int):
    """``where(mask, logits, min(logits) − margin)``, the minimum taken along ``axis`` (the softmax's)::
        m = min_axis(logits)     (REDUCE_MIN: the logits' scale)
        f = m − margin           (SUB)
        s = where(mask, logits, f)   (SELECT_V2, its own range: the logits' widened by the margin)

    Keras fills masked logits with −1e9; in int8 that value is clamped to the logits' minimum, next to
    the others in a row of small logits, and the masked positions keep much of the weight (12 dB SQNR
    on a GPT-2 block). Here the int8 range spans only ``margin`` more than the logits; the minimum and
    the result are calibrated by MinMax (a clipped tail would unmask them).
    """
    length = logits.shape[axis] or (mask.shape[axis] if len(mask.shape) == len(logits.shape) else None)
    if length is None:
        raise ValueError("a masked softmax needs a static length along its axis")
    fill = ops.subtract(Statistic()(ops.min(logits, axis=axis, keepdims=True)), _mask_margin(length))
    return Statistic()(ops.where(mask, logits, fill))


def masked_softmax(layer: keras.layers.Softmax, inputs, mask=None, **kwargs):
    """A Softmax layer called with a mask (attention inside MultiHeadAttention), as Keras computes it —
    masked logits out, softmax, masked outputs zeroed — with the masked logits of
    :func:`_masked_logits` instead of −1e9. Without a mask it is one SOFTMAX and not decomposed."""
    if mask is None or kwargs or isinstance(layer.axis, (list, tuple)) and len(layer.axis) > 1:
        raise ValueError("only a masked softmax over one axis is decomposed")
    axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else layer.axis
    if str(mask.dtype) != "bool":
        mask = ops.greater(mask, 0.5)
    probs = ops.softmax(_masked_logits(inputs, mask, axis), axis=axis)
    return ops.where(mask, probs, 0.0)


# -- recurrent layers -----------------------------------------------------------------------------
def _steps(layer, sequences, mask) -> int:
    """Time steps of a recurrent layer that can be unrolled (static length, no mask, not stateful)."""
    if mask is not None:
        raise ValueError("masked sequences are not unrolled")
    if getattr(layer, "stateful", False):
        raise ValueError("stateful recurrent layers are not unrolled")
    steps = sequences.shape[1]
    if steps is None:
        raise ValueError("a sequence of unknown length cannot be unrolled")
    return int(steps)


def _fixed_dense(name: str, kernel, bias):
    """A Dense layer holding ``kernel`` (and ``bias``), built: a matmul tfq quantizes per channel."""
    dense = keras.layers.Dense(kernel.shape[-1], use_bias=bias is not None, name=name)
    dense.build((None, kernel.shape[0]))
    dense.set_weights([ops.convert_to_numpy(kernel)] + ([ops.convert_to_numpy(bias)] if bias is not None else []))
    return dense


def _input_steps(layer, sequences, kernel, bias, steps: int) -> list:
    """``x_t·W + b`` for each step (one shared FULLY_CONNECTED), after the layer's input dropout."""
    dropout = getattr(layer.cell, "dropout", 0.0)
    if dropout:
        # The cell drops the same input features at every step of a sequence.
        sequences = keras.layers.Dropout(dropout, noise_shape=(None, 1, sequences.shape[-1]),
                                         name="input_dropout")(sequences)
    dense = _fixed_dense("input_kernel", kernel, bias)
    return [dense(sequences[:, t, :]) for t in range(steps)]


def _activation(fn, name: str):
    return keras.layers.Activation(activation_name(fn), name=name)


def _finish(layer, outputs: list, states: list):
    y = ops.stack(outputs, axis=1) if layer.return_sequences else outputs[-1]
    return [y, *states] if layer.return_state else y


def _initial_states(initial_state, count: int) -> list:
    if initial_state is None:
        return [None] * count
    states = list(initial_state) if isinstance(initial_state, (list, tuple)) else [initial_state]
    if len(states) != count:
        raise ValueError(f"expected {count} initial states")
    return states


def _gates(z, count: int) -> list:
    """``z`` cut along its last axis into ``count`` gates, one STRIDED_SLICE each. (The converter
    quantizes a SPLIT of a fake-quantized tensor unreliably: from one run to the next, the same
    graph gave an int8 or a float SPLIT.)"""
    size = z.shape[-1] // count
    return [z[..., k * size:(k + 1) * size] for k in range(count)]


def _order(layer, steps: int):
    return range(steps - 1, -1, -1) if layer.go_backwards else range(steps)


def lstm(layer, sequences, initial_state=None, mask=None, training=None):
    """An LSTM unrolled over its (static) time steps, one int8 op per step and gate::
        z = x_t·W + h·U + b   → i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)
        c = f·c + i·g         h = o·tanh(c)

    The matmuls are FULLY_CONNECTED with per-channel weights (the input one for all steps at
    once); every other op is a shared layer, so each quantity (gates, cell, hidden state) has one
    range over all steps. TFLite has no int8 kernel for the while loop the converter would make
    otherwise. ``recurrent_dropout`` is not applied in training (input dropout is).
    """
    cell = layer.cell
    steps = _steps(layer, sequences, mask)
    xw = _input_steps(layer, sequences, cell.kernel, cell.bias if cell.use_bias else None, steps)
    recurrent = _fixed_dense("recurrent_kernel", cell.recurrent_kernel, None)
    add_gates = keras.layers.Add(name="gates")
    gate, candidate = _activation(cell.recurrent_activation, "gate"), _activation(cell.activation, "candidate")
    forget_cell, input_cell = keras.layers.Multiply(name="forget_cell"), keras.layers.Multiply(name="input_cell")
    add_cell, cell_out = keras.layers.Add(name="cell"), _activation(cell.activation, "cell_activation")
    hidden = keras.layers.Multiply(name="hidden")
    h, c = _initial_states(initial_state, 2)
    outputs = []
    for t in _order(layer, steps):
        z = xw[t] if h is None else add_gates([xw[t], recurrent(h)])
        zi, zf, zg, zo = _gates(z, 4)
        i, f, g, o = gate(zi), gate(zf), candidate(zg), gate(zo)
        c = input_cell([i, g]) if c is None else add_cell([forget_cell([f, c]), input_cell([i, g])])
        h = hidden([o, cell_out(c)])
        outputs.append(h)
    return _finish(layer, outputs, [h, c])


def gru(layer, sequences, initial_state=None, mask=None, training=None):
    """A GRU unrolled over its (static) time steps (Keras gate order z, r, h)::
        z = σ(x_z + h·U_z + b_z)     r = σ(x_r + h·U_r + b_r)
        h̃ = act(x_h + r·(h·U_h + b_h))   (reset_after; else act(x_h + (r·h)·U_h))
        h = z·h + (1 − z)·h̃

    At the first step (``h = 0``) the recurrent terms are the recurrent bias. Ops are shared
    layers across steps, as in :func:`lstm`.
    """
    cell = layer.cell
    steps = _steps(layer, sequences, mask)
    units = cell.units
    input_bias, recurrent_bias = None, None
    if cell.use_bias:
        if cell.reset_after:
            input_bias, recurrent_bias = cell.bias[0], cell.bias[1]
        else:
            input_bias = cell.bias
    xw = _input_steps(layer, sequences, cell.kernel, input_bias, steps)
    u = cell.recurrent_kernel
    recurrent_zr = _fixed_dense("recurrent_kernel", u[:, : 2 * units],
                                None if recurrent_bias is None else recurrent_bias[: 2 * units])
    recurrent_h = _fixed_dense("recurrent_candidate_kernel", u[:, 2 * units:],
                               None if recurrent_bias is None else recurrent_bias[2 * units:])
    zero_state_bias = None if recurrent_bias is None else ops.convert_to_numpy(recurrent_bias)
    add_zr, add_h = keras.layers.Add(name="gates"), keras.layers.Add(name="candidate_input")
    gate, candidate = _activation(cell.recurrent_activation, "gate"), _activation(cell.activation, "candidate")
    reset = keras.layers.Multiply(name="reset")
    keep, update = keras.layers.Multiply(name="keep"), keras.layers.Multiply(name="update")
    add_hidden = keras.layers.Add(name="hidden")
    (h,) = _initial_states(initial_state, 1)
    outputs = []
    for t in _order(layer, steps):
        xz, xr, xh = _gates(xw[t], 3)
        if h is None:  # h = 0: the recurrent matmuls give their bias only
            if zero_state_bias is not None:
                xz = ops.add(xz, zero_state_bias[:units])
                xr = ops.add(xr, zero_state_bias[units: 2 * units])
            z, r = gate(xz), gate(xr)
            rh = None if zero_state_bias is None else ops.multiply(r, zero_state_bias[2 * units:])
            h = update([ops.subtract(1.0, z), candidate(xh if rh is None else add_h([xh, rh]))])
        else:
            rz, rr = _gates(recurrent_zr(h), 2)
            z, r = gate(add_zr([xz, rz])), gate(add_zr([xr, rr]))
            rh = reset([r, recurrent_h(h)]) if cell.reset_after else recurrent_h(reset([r, h]))
            hh = candidate(add_h([xh, rh]))
            h = add_hidden([keep([z, h]), update([ops.subtract(1.0, z), hh])])
        outputs.append(h)
    return _finish(layer, outputs, [h])


def simple_rnn(layer, sequences, initial_state=None, mask=None, training=None):
    """A SimpleRNN unrolled over its (static) time steps: ``h = act(x_t·W + h·U + b)``."""
    cell = layer.cell
    steps = _steps(layer, sequences, mask)
    xw = _input_steps(layer, sequences, cell.kernel, cell.bias if cell.use_bias else None, steps)
    recurrent = _fixed_dense("recurrent_kernel", cell.recurrent_kernel, None)
    add, act = keras.layers.Add(name="pre_activation"), _activation(cell.activation, "hidden")
    (h,) = _initial_states(initial_state, 1)
    outputs = []
    for t in _order(layer, steps):
        h = act(xw[t] if h is None else add([xw[t], recurrent(h)]))
        outputs.append(h)
    return _finish(layer, outputs, [h])


def bidirectional(layer, sequences, initial_state=None, mask=None, training=None):
    """A Bidirectional recurrent layer as its two recurrent layers (each then unrolled by its own
    decomposition) and the merge: ``merge(forward(x), flip(backward(x)))`` where ``backward`` reads
    the sequence from its end (``go_backwards``) and the flip puts its outputs back in time order
    when it returns sequences. The merge is ``concat``, ``sum``, ``ave`` (sum, then ·½) or ``mul``."""
    if mask is not None or initial_state is not None:
        raise ValueError("masked sequences or initial states are not unrolled")
    if layer.return_state or layer.merge_mode not in ("concat", "sum", "ave", "mul"):
        raise ValueError("return_state and merge_mode=None are not unrolled")
    y = layer.forward_layer(sequences)
    y_rev = layer.backward_layer(sequences)
    if layer.return_sequences:
        # Back in time order: the steps restacked (UNPACK, PACK: int8, same scale) rather than a REVERSE_V2,
        # whose int8 export after the stacked steps lost 15 dB here.
        y_rev = ops.stack([y_rev[:, t] for t in range(y_rev.shape[1] - 1, -1, -1)], axis=1)
    if layer.merge_mode == "concat":
        return ops.concatenate([y, y_rev], axis=-1)
    if layer.merge_mode == "sum":
        return y + y_rev
    if layer.merge_mode == "ave":
        return (y + y_rev) * 0.5
    return y * y_rev


# -- keras-hub ------------------------------------------------------------------------------------
# The sublayers of keras-hub's TransformerDecoder (decoder-only), by the names its weights' paths carry.
_DECODER_SUBLAYERS = ("self_attention", "self_attention_layer_norm", "feedforward_intermediate_dense",
                      "feedforward_output_dense", "feedforward_layer_norm")


def _relative_path(path: str) -> str | None:
    """A decoder weight's path from its sublayer's name on (``self_attention/query/kernel``), or None."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part in _DECODER_SUBLAYERS:
            return "/".join(parts[i:])
    return None


def _decoder_sublayers(layer, hidden_dim: int) -> dict:
    """tfq's own sublayers of a ``TransformerDecoder``, built from its public config and holding its weights.

    The layers are those ``TransformerDecoder.build`` makes (keras-hub 0.32): attention of
    ``num_heads`` heads of ``hidden_dim // num_heads``, two layer norms of ``layer_norm_epsilon``, the
    feed-forward ``Dense(intermediate_dim, activation)`` then ``Dense(hidden_dim)``, dropouts of
    ``dropout``. Each weight is taken from the layer's weight of the same path (``layer.weights``, e.g.
    ``.../self_attention/query/kernel``), or, when the paths differ, in ``layer.weights``' order if
    every shape agrees. Raises ValueError when the config or the weights do not match (the layer is then
    kept whole).
    """
    config = layer.get_config()
    missing = [k for k in ("num_heads", "intermediate_dim", "activation", "layer_norm_epsilon", "normalize_first")
               if k not in config]
    if missing:
        raise ValueError(f"its config has no {', '.join(missing)} (a keras-hub version tfq does not know)")
    if config.get("encoder_sequence_shape"):
        raise ValueError("cross-attention and caches are not decomposed")
    num_heads = int(config["num_heads"])
    if not 0 < num_heads <= hidden_dim:
        raise ValueError(f"num_heads={num_heads} does not divide hidden_dim={hidden_dim} into heads")
    rate = float(config.get("dropout") or 0.0)
    epsilon = float(config["layer_norm_epsilon"])
    activation = config["activation"]
    activation = (keras.activations.deserialize(activation) if isinstance(activation, dict)
                  else keras.activations.get(activation))
    dtype = layer.dtype_policy
    head_dim = hidden_dim // num_heads
    sub = {
        "self_attention": keras.layers.MultiHeadAttention(num_heads, key_dim=head_dim, dropout=rate, dtype=dtype,
                                                          name="self_attention"),
        "self_attention_layer_norm": keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype,
                                                                     name="self_attention_layer_norm"),
        "feedforward_intermediate_dense": keras.layers.Dense(int(config["intermediate_dim"]), activation=activation,
                                                             dtype=dtype, name="feedforward_intermediate_dense"),
        "feedforward_output_dense": keras.layers.Dense(hidden_dim, dtype=dtype, name="feedforward_output_dense"),
        "feedforward_layer_norm": keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype,
                                                                  name="feedforward_layer_norm"),
    }
    shape = (None, None, hidden_dim)
    sub["self_attention"].build(query_shape=shape, value_shape=shape)
    sub["self_attention_layer_norm"].build(shape)
    sub["feedforward_intermediate_dense"].build(shape)
    sub["feedforward_output_dense"].build((None, None, int(config["intermediate_dim"])))
    sub["feedforward_layer_norm"].build(shape)
    theirs = list(layer.weights)
    ours = [w for name in _DECODER_SUBLAYERS for w in sub[name].weights]
    if len(theirs) != len(ours):
        raise ValueError(f"it has {len(theirs)} weights where its config makes {len(ours)} "
                         "(a keras-hub version tfq does not know)")
    by_path = {_relative_path(w.path): w for w in theirs}
    pairs = [(w, by_path.get(_relative_path(w.path))) for w in ours]
    if any(t is None or tuple(t.shape) != tuple(w.shape) for w, t in pairs):
        pairs = list(zip(ours, theirs))  # paths of another keras-hub version: the creation order
        if any(tuple(t.shape) != tuple(w.shape) for w, t in pairs):
            raise ValueError("its weights match neither by path nor by order the layers its config makes "
                             "(a keras-hub version tfq does not know)")
    for w, t in pairs:
        w.assign(keras.ops.convert_to_numpy(t))
    sub["self_attention_dropout"] = keras.layers.Dropout(rate, dtype=dtype, name="self_attention_dropout")
    sub["feedforward_dropout"] = keras.layers.Dropout(rate, dtype=dtype, name="feedforward_dropout")
    return sub


def transformer_decoder(layer, decoder_sequence, decoder_padding_mask=None, decoder_attention_mask=None,
                        use_causal_mask=True, training=None, **kwargs):
    """keras-hub's ``TransformerDecoder`` (decoder-only, no cache) as Keras layers and a constant causal mask::
        mask = min(padding[:, None, :], attention_mask, tril(1_{T×T}))      (int32; the last a constant)
        x = x + dropout(attention(ln₁(x), mask))      (ln after the sum when not normalize_first)
        x = x + dropout(dense₂(dense₁(ln₂(x))))

    The layer's own call computes the causal mask from the sequence's shape at run time (RANGE, a
    float comparison) and passes its attention an argument that Keras cannot trace symbolically; with
    a static length ``T`` the mask is known when tracing. Follows ``TransformerDecoder.call`` of
    keras-hub 0.32 through public surface only: the sublayers are tfq's own, built from the layer's
    ``get_config()`` and given its weights by their paths; the rewrite checks on probe data that the
    result computes what the layer does, and keeps the layer whole otherwise (with a warning).
    Cross-attention and caches are not decomposed.
    """
    if any(v is not None for v in kwargs.values()):
        raise ValueError("cross-attention and caches are not decomposed")
    length = decoder_sequence.shape[1]
    if length is None:
        raise ValueError("a causal mask needs a static sequence length")
    sub = _decoder_sublayers(layer, int(decoder_sequence.shape[-1]))
    normalize_first = bool(layer.get_config()["normalize_first"])
    mask = None
    if decoder_padding_mask is not None:
        mask = ops.expand_dims(ops.cast(decoder_padding_mask, "int32"), axis=1)
    if decoder_attention_mask is not None:
        attention = ops.cast(decoder_attention_mask, "int32")
        mask = attention if mask is None else ops.minimum(mask, attention)
    if use_causal_mask:
        causal = np.tril(np.ones((1, length, length), dtype="int32"))
        mask = causal if mask is None else ops.minimum(mask, causal)

    def block(x, norm, compute):
        y = compute(norm(x) if normalize_first else x)
        y = ops.add(y, x)
        return y if normalize_first else norm(y)

    x = block(decoder_sequence, sub["self_attention_layer_norm"], lambda h: sub["self_attention_dropout"](
        sub["self_attention"](query=h, value=h, attention_mask=mask, training=training), training=training))
    return block(x, sub["feedforward_layer_norm"], lambda h: sub["feedforward_dropout"](
        sub["feedforward_output_dense"](sub["feedforward_intermediate_dense"](h)), training=training))
