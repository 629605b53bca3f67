"""Running a ``.tflite`` model in a separate process, so that a kernel that aborts cannot take the caller down.

A failed ``TF_LITE_ENSURE`` in a LiteRT kernel raises ``RuntimeError`` ("Node number 4 (DIV) failed to
invoke"), but a failed ``TFLITE_CHECK`` calls ``abort()``: no Python code survives it. :class:`Sandbox`
keeps one worker process (this file run as a script: it imports only numpy and LiteRT, ~0.3 s to start)
and sends it requests; a worker that dies is reported as the failure of the sample it was running and
replaced at the next request (its message names the op when the kernel did not and the file shows it:
an integer ADD/SUB whose requantization multiplier is out of the range LiteRT CHECKs,
:func:`tfq.tflite.info.requantization_aborts`). The worker is started with :func:`prestart` (at the start of a conversion,
so that its start overlaps the conversion) and reused for the life of the process.

Protocol (one JSON line per request on the worker's stdin): ``{"model": path, "inputs": npz path,
"out": npz path}``. The npz holds ``s<i>_<k>`` = input ``k`` (interpreter order) of sample ``i``, each
with its batch axis of 1. The worker prints ``sample -1`` before preparing the model (``allocate_tensors``:
an abort there fails the model, not a sample), ``sample <i>`` before running sample ``i`` and ``done``
at the end; the out npz holds ``o<i>_<k>`` (outputs in interpreter order, dequantized) and a JSON
``meta``: output names (signature keys), the sample that raised and the message, and, for every
sample with a non-finite output or in ``scan``, the indices of the float tensors that were non-finite (from a
second run that keeps every tensor).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading

__all__ = ["Sandbox", "SandboxResult", "prestart"]


class SandboxResult:
    """What one request gave: outputs per sample, or where and how the model failed.

    Attributes:
        outputs: per completed sample, the list of outputs (interpreter order, float).
        output_names: signature output key per output (interpreter order), or None.
        failed_sample: index of the sample the interpreter failed on (None if none failed; -1: preparing the
            model, before any sample).
        message: the interpreter's message (an exception's text, or the dying worker's stderr tail).
        aborted: True when the worker process died (a kernel abort), False for a raised error.
        nonfinite_tensors: sample index → indices of float tensors holding NaN/inf.
    """

    def __init__(self, outputs, output_names, failed_sample=None, message="", aborted=False,
                 nonfinite_tensors=None):
        self.outputs = outputs
        self.output_names = output_names
        self.failed_sample = failed_sample
        self.message = message
        self.aborted = aborted
        self.nonfinite_tensors = nonfinite_tensors or {}


class Sandbox:
    """One worker process running ``.tflite`` models; see the module docstring."""

    def __init__(self):
        self._proc = None
        self._stderr = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Starts the worker if none is alive (non-blocking: it imports LiteRT in the background)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            self._end()  # a worker that died: its pipes and stderr file
            self._stderr = tempfile.TemporaryFile()
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            self._proc = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True)

    def close(self) -> None:
        """Ends the worker (it exits when its stdin closes)."""
        with self._lock:
            self._end()

    def _end(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, content: bytes, samples, scan=(), timeout: float = 300.0) -> SandboxResult:
        """Runs ``samples`` (a list of samples, each a list of arrays with a batch axis of 1) through ``content``.

        Samples in ``scan`` (and any with a non-finite output) run a second time keeping every tensor, to
        find NaN/inf inside the model (a NaN that a QUANTIZE turns into an ordinary integer).
        """
        import numpy as np

        self.start()
        with tempfile.TemporaryDirectory(prefix="tfq_check_") as tmp:
            model_path = os.path.join(tmp, "model.tflite")
            with open(model_path, "wb") as f:
                f.write(content)
            inputs_path, out_path = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "out.npz")
            np.savez(inputs_path, **{f"s{i}_{k}": np.asarray(a) for i, sample in enumerate(samples)
                                     for k, a in enumerate(sample)})
            with self._lock:
                proc, stderr = self._proc, self._stderr
                stderr.seek(0, os.SEEK_END)
                offset = stderr.tell()
                current, finished = None, False
                try:
                    proc.stdin.write(json.dumps({"model": model_path, "inputs": inputs_path, "out": out_path,
                                                 "scan": [int(i) for i in scan]}) + "\n")
                    proc.stdin.flush()
                    timer = threading.Timer(timeout, proc.kill)
                    timer.start()
                    try:
                        for line in proc.stdout:
                            line = line.strip()
                            if line.startswith("sample "):
                                current = int(line.split()[1])
                            elif line == "done":
                                finished = True
                                break
                    finally:
                        timer.cancel()
                except (BrokenPipeError, OSError):
                    pass
                if not finished:
                    proc.wait()
                    stderr.seek(offset)
                    text = stderr.read().decode("utf-8", "replace")
                    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("INFO:")]
                    self._end()
                    message = " ".join(lines[-3:]) or f"the interpreter process died (exit code {proc.returncode})"
                    return SandboxResult([], None, failed_sample=current if current is not None else 0,
                                         message=_named_abort(content, message), aborted=True)
            with np.load(out_path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                outputs = [[z[f"o{i}_{k}"] for k in range(meta["num_outputs"])] for i in range(meta["completed"])]
        return SandboxResult(outputs, meta["output_names"], meta["failed_sample"], meta["message"], False,
                             {int(k): v for k, v in meta["nonfinite"].items()})


def _named_abort(content: bytes, message: str) -> str:
    """``message`` of a worker that died, with the op at fault when the kernel did not say it: an op whose
    requantization multiplier LiteRT's kernel CHECKs out of range, as ``Node number <i> (<TYPE>)``."""
    if "Node number" in message or ".cc" in message:
        return message
    from tfq.tflite.info import inspect_tflite, requantization_aborts

    try:
        found = requantization_aborts(inspect_tflite(content))
    except Exception:  # noqa: BLE001 - a file we cannot read: the message as it is
        return message
    if not found:
        return message
    op, why = found[0]
    return f"Node number {op.index} ({op.type}) aborts: {why}, out of the range its kernel requantizes ({message})"


_SANDBOX = Sandbox()
atexit.register(_SANDBOX.close)


def prestart() -> Sandbox:
    """The process's sandbox, its worker started in the background (it is ready when the conversion is done)."""
    _SANDBOX.start()
    return _SANDBOX


# --------------------------------------------------------------------------------------------
# The worker (this file run as a script): numpy and LiteRT only.
# --------------------------------------------------------------------------------------------


def _interpreter(content, preserve=False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {"model_content": content, "num_threads": 1}
    if preserve:
        kwargs.update(experimental_preserve_all_tensors=True,
                      experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter = Interpreter(**kwargs)
    interpreter.allocate_tensors()
    return interpreter


def _feed(interpreter, sample, np):
    details = interpreter.get_input_details()
    if any(tuple(d["shape"]) != a.shape for d, a in zip(details, sample)):
        for d, a in zip(details, sample):
            interpreter.resize_tensor_input(d["index"], list(a.shape), strict=False)
        interpreter.allocate_tensors()
        details = interpreter.get_input_details()
    for d, a in zip(details, sample):
        dtype = d["dtype"]
        if np.issubdtype(dtype, np.integer) and np.issubdtype(a.dtype, np.floating):
            scale, zero_point = d["quantization"]
            if scale:
                info = np.iinfo(dtype)
                q = np.floor(np.abs(a / scale) + 0.5) * np.sign(a) + zero_point
                a = np.clip(q, info.min, info.max)
        interpreter.set_tensor(d["index"], np.asarray(a).astype(dtype))


def _outputs(interpreter, np):
    out = []
    for d in interpreter.get_output_details():
        y = interpreter.get_tensor(d["index"])
        if np.issubdtype(d["dtype"], np.integer) and d["quantization"][0]:
            scale, zero_point = d["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        out.append(np.asarray(y, np.float32) if np.issubdtype(np.asarray(y).dtype, np.floating) else np.asarray(y))
    return out


def _serve_one(request, np):
    with open(request["model"], "rb") as f:
        content = f.read()
    scan = set(request.get("scan", ()))
    with np.load(request["inputs"]) as z:
        keys = list(z.keys())
        count = 1 + max((int(k[1:].split("_")[0]) for k in keys), default=-1)
        samples = [[z[f"s{i}_{k}"] for k in range(sum(1 for key in keys if key.startswith(f"s{i}_")))]
                   for i in range(count)]
    print("sample -1", flush=True)  # preparing the kernels: an abort here is the model's, not a sample's
    try:
        interpreter = _interpreter(content)
    except (RuntimeError, ValueError) as err:  # a kernel's Prepare failed (allocate_tensors)
        meta = {"output_names": None, "failed_sample": -1, "message": " ".join(str(err).split()), "nonfinite": {},
                "completed": 0, "num_outputs": 0}
        np.savez(request["out"], meta=np.array(json.dumps(meta)))
        return
    names = None
    try:
        runner_outputs = interpreter.get_signature_runner().get_output_details()
        by_index = {d["index"]: name for name, d in runner_outputs.items()}
        names = [by_index.get(d["index"]) for d in interpreter.get_output_details()]
    except (ValueError, RuntimeError, KeyError):
        pass
    meta = {"output_names": names, "failed_sample": None, "message": "", "nonfinite": {}, "completed": 0,
            "num_outputs": len(interpreter.get_output_details())}
    arrays = {}
    for i, sample in enumerate(samples):
        print(f"sample {i}", flush=True)
        try:
            _feed(interpreter, sample, np)
            interpreter.invoke()
        except (RuntimeError, ValueError) as err:
            meta["failed_sample"], meta["message"] = i, " ".join(str(err).split())
            break
        outputs = _outputs(interpreter, np)
        for k, y in enumerate(outputs):
            arrays[f"o{i}_{k}"] = y
        meta["completed"] = i + 1
        if i in scan or any(np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)) for y in outputs):
            debug = _interpreter(content, preserve=True)
            _feed(debug, sample, np)
            debug.invoke()
            bad = []
            for t in debug.get_tensor_details():
                if not np.issubdtype(t["dtype"], np.floating):
                    continue
                try:
                    value = debug.get_tensor(t["index"])
                except ValueError:
                    continue
                if value.size and not np.all(np.isfinite(value)):
                    bad.append(int(t["index"]))
            if bad:
                meta["nonfinite"][str(i)] = bad
    np.savez(request["out"], meta=np.array(json.dumps(meta)), **arrays)


def _main() -> None:
    import ai_edge_litert.interpreter  # noqa: F401  (imported before the first request)
    import numpy as np

    for line in sys.stdin:
        if line.strip():
            _serve_one(json.loads(line), np)
            print("done", flush=True)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # tfq/tflite's modules are not top-level
    _main()
