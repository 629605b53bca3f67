"""What each integer op of a TFLite model computes: scales, multipliers, accumulators, saturation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tfq.reference.executor import Execution, as_graph, execute
from tfq.reference.graph import Graph, Operator
from tfq.reference.kernels import Requantization

__all__ = ["OpExplanation", "Trace", "explain_ops", "format_table"]


def _qp(graph: Graph, index: int) -> dict:
    t = graph.tensors[index]
    return {
        "tensor": t.name, "dtype": t.type_name.lower(), "shape": list(t.shape),
        "scale": [float(s) for s in t.scale] if t.per_channel else (float(t.scale[0]) if t.is_quantized else None),
        "zero_point": (int(t.zero_point[0]) if t.zero_point.size else 0) if t.is_quantized else None,
    }


@dataclass
class OpExplanation:
    """The integer arithmetic of one op.

    For an op that requantizes an int32 accumulator (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED,
    TRANSPOSE_CONV, BATCH_MATMUL, ADD, SUB, MUL, MEAN, …)::

        acc = Σ (q_in − Z_in)·(q_w − Z_w) + bias            (int32; bias at scale S_in·S_w)
        M   = S_in·S_w / S_out ≈ M0 · 2^−n,   M0 ∈ [2^30, 2^31)
        q_out = clamp(round(acc·M) + Z_out, lo, hi)

    Attributes:
        index, type: the op's position in the graph and its builtin type.
        inputs, outputs: per tensor its name, dtype, shape, scale and zero point.
        weights: the weight tensor's entry (per-channel scales as a list), or None.
        real_multiplier: ``M`` (one per output channel for per-channel weights).
        m0, n: the fixed-point form ``M ≈ M0·2^−n`` (``n = 31 − shift``; TFLite's ``shift``
            is a left shift when positive).
        accumulator_bounds: worst-case int32 accumulator range over every possible input (from the
            weights and bias).
        observed_accumulator: ``(min, max)`` of the accumulator on the data given to explain.
        clamp: the int range of the output after the fused activation.
        saturated: outputs whose requantized value fell outside the output dtype's range
            (int32 → int8 saturation) on the data, and ``saturated_fraction`` their share.
        activation_clamped: outputs clamped by the fused activation (e.g. ReLU's lower bound) that
            were inside the dtype range.
        note: how this op's kernel differs from the formula above, if it does.
    """

    index: int
    type: str
    inputs: list[dict]
    outputs: list[dict]
    weights: dict | None = None
    real_multiplier: list[float] | None = None
    m0: list[int] | None = None
    n: list[int] | None = None
    accumulator_bounds: tuple[int, int] | None = None
    observed_accumulator: tuple[int, int] | None = None
    clamp: tuple[int, int] | None = None
    saturated: int | None = None
    saturated_fraction: float | None = None
    activation_clamped: int | None = None
    num_outputs: int | None = None
    note: str = ""

    @property
    def requantizes(self) -> bool:
        return self.real_multiplier is not None

    @property
    def int32_overflow(self) -> bool:
        """Whether the accumulator can leave the int32 range on some input (worst case)."""
        if self.accumulator_bounds is None:
            return False
        lo, hi = self.accumulator_bounds
        return lo < -(2**31) or hi > 2**31 - 1

    def to_dict(self) -> dict:
        return {
            "index": self.index, "type": self.type, "inputs": self.inputs, "outputs": self.outputs,
            "weights": self.weights, "real_multiplier": self.real_multiplier, "m0": self.m0, "n": self.n,
            "accumulator_bounds": list(self.accumulator_bounds) if self.accumulator_bounds else None,
            "observed_accumulator": list(self.observed_accumulator) if self.observed_accumulator else None,
            "int32_overflow": self.int32_overflow, "clamp": list(self.clamp) if self.clamp else None,
            "saturated": self.saturated, "saturated_fraction": self.saturated_fraction,
            "activation_clamped": self.activation_clamped, "num_outputs": self.num_outputs, "note": self.note,
        }

    def __str__(self) -> str:
        def scale_text(entry):
            if entry is None or entry["scale"] is None:
                return "float"
            s = entry["scale"]
            if isinstance(s, list):
                return f"S∈[{min(s):.4g}, {max(s):.4g}] ({len(s)} ch), Z={entry['zero_point']}"
            return f"S={s:.6g}, Z={entry['zero_point']}"

        lines = [f"op {self.index} {self.type}"]
        for i, entry in enumerate(self.inputs):
            if self.weights is not None and entry["tensor"] == self.weights["tensor"]:
                continue
            lines.append(f"  in{i}:  {entry['dtype']} {entry['shape']} {scale_text(entry)}")
        if self.weights is not None:
            lines.append(f"  weights: {self.weights['dtype']} {self.weights['shape']} {scale_text(self.weights)}")
        for entry in self.outputs:
            lines.append(f"  out:  {entry['dtype']} {entry['shape']} {scale_text(entry)}")
        if self.requantizes:
            m, m0, n = self.real_multiplier, self.m0, self.n
            if len(m) == 1:
                lines.append(f"  M = {m[0]:.9g} ≈ M0·2^-n with M0={m0[0]}, n={n[0]}")
            else:
                lines.append(f"  M ∈ [{min(m):.6g}, {max(m):.6g}] over {len(m)} channels; "
                             f"n ∈ [{min(n)}, {max(n)}]")
        if self.accumulator_bounds is not None:
            lo, hi = self.accumulator_bounds
            lines.append(f"  int32 accumulator worst case [{lo}, {hi}]"
                         + (" — CAN OVERFLOW int32" if self.int32_overflow else f" ({_bits(lo, hi)} bits)"))
        if self.observed_accumulator is not None:
            lo, hi = self.observed_accumulator
            lines.append(f"  accumulator observed [{lo}, {hi}]")
        if self.saturated is not None:
            lines.append(f"  saturated {self.saturated}/{self.num_outputs} outputs "
                         f"({100 * self.saturated_fraction:.2f}%); clamped by the activation {self.activation_clamped}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _bits(lo: int, hi: int) -> int:
    return max(int(abs(lo)).bit_length(), int(abs(hi)).bit_length()) + 1


_WEIGHT_INPUT = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1}


def _explain_op(graph: Graph, op: Operator, details: dict | None) -> OpExplanation:
    inputs = [_qp(graph, i) for i in op.inputs if i >= 0]
    outputs = [_qp(graph, i) for i in op.outputs]
    weights = None
    w_index = _WEIGHT_INPUT.get(op.type)
    if w_index is not None and w_index < len(op.inputs) and op.inputs[w_index] >= 0:
        weights = _qp(graph, op.inputs[w_index])
    entry = OpExplanation(index=op.index, type=op.type, inputs=inputs, outputs=outputs, weights=weights)
    requant: Requantization | None = (details or {}).get("requantization")
    if requant is not None:
        entry.real_multiplier = [float(v) for v in requant.real_multiplier]
        entry.m0 = [int(v) for v in requant.m0]
        entry.n = [31 - int(v) for v in requant.shift]
        entry.accumulator_bounds = requant.worst_case
        entry.clamp = requant.clamp
        entry.note = requant.note
        if requant.accumulator is not None and requant.accumulator.size:
            entry.observed_accumulator = (int(requant.accumulator.min()), int(requant.accumulator.max()))
        if requant.unclamped is not None:
            info = np.iinfo(graph.tensors[op.outputs[0]].dtype)
            u = requant.unclamped
            # Saturation: clipped by the dtype's range where the fused activation alone would not have clipped.
            act_lo, act_hi = requant.activation
            low = (u < info.min) if act_lo is None else (u < info.min) & (u >= act_lo)
            high = (u > info.max) if act_hi is None else (u > info.max) & (u <= act_hi)
            saturated = int(np.count_nonzero(low | high))
            lo, hi = requant.clamp
            entry.saturated = saturated
            entry.num_outputs = int(u.size)
            entry.saturated_fraction = saturated / max(u.size, 1)
            entry.activation_clamped = int(np.count_nonzero((u < lo) | (u > hi))) - saturated
    elif "lut" in (details or {}):
        entry.note = "a 256-entry lookup table built from the float function (LiteRT's LUTPopulate)"
    elif "softmax" in (details or {}):
        entry.note = f"gemmlowp fixed point: {details['softmax']}"
    return entry


@dataclass
class Trace:
    """Every tensor of one run of the reference executor.

    Attributes:
        tensors: tensor index → its array (integer tensors hold the raw int values).
        names: tensor index → name.
        ops: one :class:`OpExplanation` per op, with the accumulators and saturation observed.
        outputs: the model's outputs.
    """

    tensors: dict[int, np.ndarray]
    names: dict[int, str]
    ops: list[OpExplanation]
    outputs: list[np.ndarray]
    accumulators: dict[int, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key) -> np.ndarray:
        """A tensor by index or by (a substring of) its name."""
        if isinstance(key, (int, np.integer)):
            return self.tensors[int(key)]
        for index, name in self.names.items():
            if key in name and index in self.tensors:
                return self.tensors[index]
        raise KeyError(f"no traced tensor name contains {key!r}")

    def to_dict(self) -> dict:
        return {"tensors": {self.names[i]: v.tolist() for i, v in self.tensors.items()},
                "ops": [op.to_dict() for op in self.ops]}


def explain_ops(graph: Graph, execution: Execution | None, ops=None) -> list[OpExplanation]:
    chosen = graph.operators if ops is None else [graph.find_op(o) for o in ops]
    if execution is None:
        # The multipliers and worst-case bounds need no data: run one all-zero-point sample.
        execution = _static_execution(graph)
    return [_explain_op(graph, op, execution.details[op.index] if execution else None) for op in chosen]


def _static_execution(graph: Graph) -> Execution | None:
    arrays = []
    for index in graph.inputs:
        t = graph.tensors[index]
        shape = (1,) + tuple(max(d, 1) for d in t.shape[1:])
        fill = t.qparams()[1] if t.is_quantized else 0
        arrays.append(np.full(shape, fill, dtype=t.dtype))
    execution = execute(graph, arrays)
    for d in execution.details:  # nothing was observed
        r = d.get("requantization")
        if r is not None:
            r.accumulator = None
            r.unclamped = None
    return execution


def format_table(entries: list[OpExplanation]) -> str:
    """One line per op: type, output scale/zero point, multiplier, accumulator bounds, saturation."""
    header = (f"{'#':>3} {'op':<20} {'out S':>10} {'Z':>5} {'M (min..max)':>23} {'n':>7} "
              f"{'acc worst case':>25} {'acc observed':>25} {'saturated':>9}")
    lines = [header, "-" * len(header)]
    for e in entries:
        out = e.outputs[0] if e.outputs else None
        s = out["scale"] if out else None
        s_text = "float" if s is None else (f"{s:.4g}" if not isinstance(s, list) else "per-ch")
        z_text = "" if not out or out["zero_point"] is None else str(out["zero_point"])
        if e.requantizes:
            m = e.real_multiplier
            m_text = f"{m[0]:.4g}" if len(m) == 1 else f"{min(m):.3g}..{max(m):.3g}"
            n_text = str(e.n[0]) if len(set(e.n)) == 1 else f"{min(e.n)}..{max(e.n)}"
        else:
            m_text = n_text = ""
        wc = "" if e.accumulator_bounds is None else f"[{e.accumulator_bounds[0]}, {e.accumulator_bounds[1]}]"
        if e.int32_overflow:
            wc += "!"
        ob = "" if e.observed_accumulator is None else f"[{e.observed_accumulator[0]}, {e.observed_accumulator[1]}]"
        sat = "" if e.saturated is None else str(e.saturated)
        lines.append(f"{e.index:>3} {e.type:<20} {s_text:>10} {z_text:>5} {m_text:>23} {n_text:>7} "
                     f"{wc:>25} {ob:>25} {sat:>9}")
    return "\n".join(lines)


def build_trace(execution: Execution) -> Trace:
    graph = execution.graph
    ops = [_explain_op(graph, op, execution.details[op.index]) for op in graph.operators]
    accumulators = {}
    for op, d in zip(graph.operators, execution.details):
        r = d.get("requantization")
        if r is not None and r.accumulator is not None:
            accumulators[op.index] = r.accumulator
    names = {t.index: t.name for t in graph.tensors}
    tensors = {i: v for i, v in execution.values.items() if graph.tensors[i].data is None}
    return Trace(tensors=tensors, names=names, ops=ops, outputs=execution.outputs, accumulators=accumulators)


def as_execution(tflite, inputs) -> Execution:
    return execute(as_graph(tflite), inputs)
