"""Representative (calibration) data for post-training quantization.

`representative_dataset` turns the usual ways of holding data — numpy arrays, lists or dicts of
them, a `tf.data.Dataset`, a generator function, or another `RepresentativeDataset` — into one
`RepresentativeDataset`: a callable returning a fresh generator of model inputs, the form
`tf.lite.TFLiteConverter.representative_dataset` expects. It checks the data as it streams
(non-numeric values, NaN/Inf, shapes against the model inputs) and fails with the offending input
and sample named, instead of letting the converter fail later with a less helpful message.

Example:
    >>> import numpy as np
    >>> rep = representative_dataset(np.zeros((10, 8, 8, 1)), num_samples=4)
    >>> len(rep), [a.shape for a in next(iter(rep()))]
    (4, [(1, 8, 8, 1)])
"""

from __future__ import annotations

import inspect
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tfq.core.input_order import order_by_name

__all__ = ["RepresentativeDataset", "model_input_specs", "pack_model_inputs", "representative_dataset"]

InputSpec = tuple[str, tuple, str]
"""`(name, shape without the batch axis, dtype name)` of one model input."""

_SHUFFLE_BUFFER_SIZE = 1024

STREAM_SAMPLE_CAP = 100_000
"""Samples read from a source whose end cannot be known in advance (a generator function, a
tf.data dataset of unknown cardinality) when no ``num_samples`` is given: a generator that never
ends stops here, with a warning, instead of hanging the calibration."""
"""Samples held by the shuffle buffer of streaming sources (tf.data, generators)."""

_CHUNK_BYTES = 8 << 20
"""Approximate size of the slices read at a time from in-memory arrays."""

_Item = tuple[Any, "bool | None"]
"""A raw element of a source: (inputs as a list or dict of array-likes, has-batch-axis flag).

The flag is True when the arrays carry a leading batch axis, False when they are single samples,
and None when it is decided per input by comparing ranks with the model inputs.
"""


# --------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------


def _model_name(model: Any) -> str:
    return str(getattr(model, "name", None) or type(model).__name__)


def model_input_specs(model: Any) -> list[InputSpec]:
    """Describes the inputs of a Keras model: name, shape without batch axis, dtype.

    Uses only public attributes (`model.inputs`, each with `.name`, `.shape`, `.dtype`), so it
    works for Keras 3 and `tf_keras` models alike; shapes may be tuples or `tf.TensorShape`,
    dtypes strings or `tf.DType`. Unknown dimensions are `None`.

    Args:
        model: A built Keras model (functional, Sequential with an `Input`, or a subclassed
            model that has been called on data).

    Returns:
        One `(name, shape, dtype)` per model input, in `model.inputs` order, e.g.
        `("pixels", (8, 8, 1), "float32")`.

    Raises:
        ValueError: If the model has no defined inputs yet, or an input has unknown rank.

    Example:
        >>> import keras
        >>> inputs = keras.Input((8, 8, 1), name="pixels")
        >>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        >>> model_input_specs(model)
        [('pixels', (8, 8, 1), 'float32')]
    """
    fix = "build it first, e.g. start it with keras.Input(shape) or call it once on a batch"
    try:
        inputs = model.inputs
    except (AttributeError, ValueError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"model {_model_name(model)!r} has no defined inputs ({first_line}); {fix}"
        ) from None
    if isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    if not inputs:
        raise ValueError(
            f"model {_model_name(model)!r} has no defined inputs (got {inputs!r}); {fix}"
        )
    specs = []
    for index, tensor in enumerate(inputs):
        name = str(getattr(tensor, "name", None) or f"input_{index}").split(":")[0]
        try:
            dims = tuple(None if getattr(d, "value", d) is None else int(getattr(d, "value", d))
                         for d in tensor.shape)
        except (TypeError, ValueError):
            raise ValueError(
                f"model input {name!r} has unknown rank (shape {tensor.shape}); give the model "
                "inputs a fixed rank, e.g. keras.Input(shape=(None, 8))"
            ) from None
        if not dims:
            raise ValueError(
                f"model input {name!r} has shape () without a batch axis; build the model with "
                "keras.Input(shape), which adds the batch axis"
            )
        dtype = tensor.dtype
        specs.append((name, dims[1:], str(getattr(dtype, "name", dtype))))
    return specs


# --------------------------------------------------------------------------------------------
# Helpers on raw elements
# --------------------------------------------------------------------------------------------


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, (list, tuple, Mapping))


def _extract_inputs(element: Any, num_inputs: int | None) -> Any:
    """Drops labels from one element and returns its inputs as a list or a dict.

    Rules: a dict is the inputs by name; a list is the inputs in order (the TFLite
    `representative_dataset` form); a tuple follows Keras `fit`: `(x,)`, `(x, y)` or
    `(x, y, sample_weight)`, whose `x` is taken (and may itself be a list, tuple or dict of
    inputs) — except that a tuple of exactly `num_inputs > 1` plain arrays, or of more than three
    elements, is the inputs themselves. Anything else is a single input.
    """
    if isinstance(element, Mapping):
        return element
    if isinstance(element, list):
        return element
    if isinstance(element, tuple):
        if (
            num_inputs is not None
            and num_inputs > 1
            and len(element) == num_inputs
            and all(_is_leaf(e) for e in element)
        ) or len(element) > 3:
            return list(element)
        if not element:
            return []
        x = element[0]
        if isinstance(x, Mapping):
            return x
        if isinstance(x, (list, tuple)):
            return list(x)
        return [x]
    return [element]


def _tensorflow() -> Any:
    """The `tensorflow` module if it has been imported, else None (tfq.core.representative never imports it)."""
    return sys.modules.get("tensorflow")


def _is_tf_dataset(data: Any) -> bool:
    tf = _tensorflow()
    return tf is not None and isinstance(data, tf.data.Dataset)


def _format_shape(shape: Sequence[int | None]) -> str:
    dims = ["None" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _shape_fix(data_shape: tuple, sample_shape: tuple, expected: tuple) -> str:
    """A hint on how to reshape data whose per-sample shape does not match `expected`."""
    rank, want = len(sample_shape), len(expected)
    if len(data_shape) == want and _dims_match(data_shape, expected):
        return "it looks like a single sample: add a batch axis, e.g. x[np.newaxis]"
    if rank + 1 == want:  # one axis of size 1 missing: find where it goes
        for k in reversed(range(want)):
            if _dims_match(tuple(sample_shape[:k]) + (1,) + tuple(sample_shape[k:]), expected):
                if k == want - 1:
                    return "add a channel axis, e.g. x[..., np.newaxis]"
                return f"add an axis of size 1 at position {k + 1}, e.g. np.expand_dims(x, {k + 1})"
    if rank == want + 1:  # one axis of size 1 too many: find which
        for k in reversed(range(rank)):
            if sample_shape[k] == 1 and _dims_match(tuple(sample_shape[:k]) + tuple(sample_shape[k + 1:]), expected):
                if k == rank - 1:
                    return "drop the trailing axis, e.g. x[..., 0]"
                return f"drop axis {k + 1} (size 1), e.g. np.squeeze(x, axis={k + 1})"
    dims = ", ".join("None" if d is None else str(d) for d in expected)
    return f"reshape the data to (num_samples, {dims})" if dims else "reshape it to (num_samples,)"


def _dims_match(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------
# Sources: callables returning a fresh iterator of raw items
# --------------------------------------------------------------------------------------------


class _ArraySource:
    """Lazily slices in-memory arrays (one per input, samples on the first axis)."""

    def __init__(self, arrays: list[np.ndarray], limit: int | None, shuffle: bool, seed: int):
        self.arrays = arrays
        count = len(arrays[0])
        self.order = None
        if shuffle:
            self.order = np.random.default_rng(seed).permutation(count)[:limit]
        self.length = count if limit is None else min(count, limit)
        sample_bytes = sum(max(1, a[:1].nbytes) for a in arrays)
        self.chunk = max(1, _CHUNK_BYTES // sample_bytes)

    def __call__(self) -> Iterator[_Item]:
        for start in range(0, self.length, self.chunk):
            stop = min(start + self.chunk, self.length)
            if self.order is None:
                yield [a[start:stop] for a in self.arrays], True
            else:
                index = self.order[start:stop]
                yield [a[index] for a in self.arrays], True


class _DatasetSource:
    """Streams a `tf.data.Dataset` through `as_numpy_iterator()`, dropping labels."""

    def __init__(self, dataset: Any, num_inputs: int | None, batched: bool | None):
        self.dataset = dataset
        self.num_inputs = num_inputs
        self.batched = batched

    def __call__(self) -> Iterator[_Item]:
        for element in self.dataset.as_numpy_iterator():
            yield _extract_inputs(element, self.num_inputs), self.batched


class _CallableSource:
    """Calls a generator function (or any callable returning an iterable) on every pass."""

    def __init__(self, function: Callable[[], Iterable[Any]], num_inputs: int | None,
                 batched: bool | None):
        self.function = function
        self.num_inputs = num_inputs
        self.batched = batched
        self.last_iterator: Iterator[Any] | None = None

    def __call__(self) -> Iterator[_Item]:
        items = self.function()
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise TypeError(
                f"representative data function {self.function!r} returned "
                f"{type(items).__name__} {items!r:.80}, not an iterable; make it yield samples, "
                "e.g. `def data(): yield [x[None]]`"
            )
        if isinstance(items, Iterator):
            if items is self.last_iterator:
                raise TypeError(
                    f"representative data function {self.function!r} returned the same "
                    "iterator as on its previous call, which is partly or fully consumed; make "
                    "it create a new one on every call, e.g. `lambda: iter(samples)`"
                )
            self.last_iterator = items
        for item in items:
            yield _extract_inputs(item, self.num_inputs), self.batched


class _RepresentativeSource:
    """Re-reads another RepresentativeDataset (its batches carry a batch axis)."""

    def __init__(self, other: RepresentativeDataset):
        self.other = other

    def __call__(self) -> Iterator[_Item]:
        for arrays in self.other._chunks():
            yield arrays, True


def _shuffle_samples(
    stream: Iterator[list[np.ndarray]], rng: np.random.Generator, buffer_size: int
) -> Iterator[list[np.ndarray]]:
    """Shuffles a stream of batches sample by sample with a bounded buffer (as tf.data does).

    Each incoming sample fills the buffer; once full, a uniformly chosen buffered sample is
    yielded and replaced; at the end the rest is yielded in random order.
    """
    buffer: list[list[np.ndarray]] = []
    for arrays in stream:
        for j in range(len(arrays[0])):
            sample = [a[j : j + 1] for a in arrays]
            if len(buffer) < buffer_size:
                buffer.append(sample)
                continue
            k = int(rng.integers(buffer_size))
            yield buffer[k]
            buffer[k] = sample
    for k in rng.permutation(len(buffer)):
        yield buffer[k]


# --------------------------------------------------------------------------------------------
# RepresentativeDataset
# --------------------------------------------------------------------------------------------


class RepresentativeDataset:
    """Validated, re-iterable calibration data; create it with `representative_dataset()`.

    Calling it returns a fresh generator: every item is a list with one numpy array per model
    input (float32, or the model input's integer dtype), each with a leading batch axis of
    `batch_size` (the last item may be smaller). This is the form
    `tf.lite.TFLiteConverter.representative_dataset` expects, so it can be assigned directly.
    Every call yields the same data in the same order (also when shuffled: the order is fixed by
    the seed).

    Data are read lazily and checked as they stream; the first bad sample raises a `ValueError`
    naming the input and the sample index (counted from 0 in the order yielded).

    Attributes:
        batch_size: Samples per item yielded by `__call__`.
        input_names: Input names (from the model, `input_names` or dict keys), or None.
        input_signature: `(shape without batch axis, dtype name)` per input: the model input
            shapes (None = any size) when a model was given, else the first sample's shapes.

    Example:
        >>> rep = representative_dataset(np.ones((3, 4)), batch_size=2)
        >>> [batch[0].shape for batch in rep()]
        [(2, 4), (1, 4)]
        >>> [batch[0].shape for batch in rep.batches(3)]
        [(3, 4)]
    """

    def __init__(
        self,
        source: Callable[[], Iterator[_Item]],
        *,
        length: int | None,
        limit: int | None,
        batch_size: int,
        shuffle_seed: int | None,
        names: list[str] | None,
        shapes: list[tuple | None] | None,
        dtypes: list[np.dtype] | None,
        expected_by: str | None,
        options: dict[str, Any],
        stream_cap: int | None = None,
    ):
        """Internal: use `representative_dataset()`.

        Args:
            source: Returns a fresh iterator of raw `(inputs, batched)` items.
            length: Number of samples when known without reading the data, else None.
            limit: Cap on the number of samples, or None.
            batch_size: Samples per item yielded by `__call__`.
            shuffle_seed: Seed of the streaming shuffle buffer, or None for no buffer.
            names: Input names, or None until a dict element names them.
            shapes: Per-input expected sample shape (None dims = any), or None to learn them
                from the first sample.
            dtypes: Per-input output dtype, or None for float32 everywhere.
            expected_by: What the shapes come from in messages (e.g. "model 'm'"), or None.
            options: The arguments that built it, to tell whether a re-wrap changes anything.
            stream_cap: With ``limit`` None, the samples read from a source that may never end
                before stopping with a warning (see :data:`STREAM_SAMPLE_CAP`), or None.
        """
        self._source = source
        self._length = length
        self._limit = limit
        self._stream_cap = stream_cap if limit is None else None
        self._batch_size = batch_size
        self._shuffle_seed = shuffle_seed
        self._names = list(names) if names is not None else None
        self._shapes = list(shapes) if shapes is not None else None
        self._dtypes = list(dtypes) if dtypes is not None else None
        self._expected_by = expected_by
        # Shapes given up front (by a model) accept None dims; learned ones must repeat exactly.
        self._shapes_given = self._shapes is not None and all(s is not None for s in self._shapes)
        self._options = options
        # Eager check: read and validate the first batch now, so obvious mistakes fail here.
        stream = self._chunks(shuffle=False)
        try:
            next(stream)
        finally:
            stream.close()

    # ---- public API -------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def input_names(self) -> list[str] | None:
        return list(self._names) if self._names is not None else None

    @property
    def input_signature(self) -> list[tuple[tuple, str]]:
        dtypes = self._dtypes or [np.dtype(np.float32)] * len(self._shapes)
        return [(tuple(shape), np.dtype(dtype).name) for shape, dtype in zip(self._shapes, dtypes)]

    def __call__(self) -> Iterator[list[np.ndarray]]:
        """Returns a fresh generator of input lists, each array with `batch_size` samples."""
        return _rebatch(self._chunks(), self._batch_size, self._label)

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        return self()

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """Yields the same samples in batches of `batch_size` (the last one may be smaller).

        Args:
            batch_size: Samples per batch, a positive integer.

        Returns:
            A generator of lists with one array per input, each of leading size `batch_size`.

        Raises:
            ValueError: If `batch_size` is not a positive integer, or samples of one input have
                different shapes (possible with None dims) and cannot be stacked.

        Example:
            >>> rep = representative_dataset(np.arange(10.0).reshape(5, 2))
            >>> [b[0].shape for b in rep.batches(2)]
            [(2, 2), (2, 2), (1, 2)]
        """
        _check_positive_int("batch_size", batch_size, "pass e.g. batch_size=32")
        return _rebatch(self._chunks(), int(batch_size), self._label)

    def __len__(self) -> int:
        """Number of samples (not items) yielded per pass, after the `num_samples` cap.

        Known without reading for arrays and for unbatched datasets of known cardinality;
        otherwise counted once by streaming through the data (not storing it) and cached.
        """
        if self._length is None:
            self._length = sum(len(arrays[0]) for arrays in self._chunks(shuffle=False))
        return self._length

    def __repr__(self) -> str:
        names = self._names or [f"input_{i}" for i in range(len(self._shapes or []))]
        inputs = ", ".join(
            f"{name}: {_format_shape(shape)} {dtype}"
            for name, (shape, dtype) in zip(names, self.input_signature)
        )
        length = "unknown" if self._length is None else self._length
        return (
            f"RepresentativeDataset(num_samples={length}, batch_size={self._batch_size}, "
            f"inputs=[{inputs}])"
        )

    # ---- streaming pipeline -----------------------------------------------------------------

    def _label(self, index: int) -> str:
        if self._names is not None and index < len(self._names):
            return f"input {self._names[index]!r}"
        return f"input {index}"

    def _chunks(self, shuffle: bool = True) -> Iterator[list[np.ndarray]]:
        """Validated, converted batches of samples (sizes as they come), capped at the limit."""
        stream = self._prepared()
        if shuffle and self._shuffle_seed is not None:
            stream = _shuffle_samples(
                stream, np.random.default_rng(self._shuffle_seed), _SHUFFLE_BUFFER_SIZE
            )
        offset = 0
        limit = self._limit if self._limit is not None else self._stream_cap
        try:
            for arrays in stream:
                count = len(arrays[0])
                if count == 0:
                    continue
                more = False
                if limit is not None and offset + count > limit:
                    count, more = limit - offset, True
                    arrays = [a[:count] for a in arrays]
                yield self._convert(arrays, offset)
                offset += count
                if limit is not None and offset >= limit:
                    if self._limit is None and (more or next(stream, None) is not None):
                        warnings.warn(
                            f"representative data has more than {limit} samples and its end cannot be known in "
                            f"advance (a generator function or a tf.data dataset of unknown cardinality): only the "
                            f"first {limit} are used. Pass num_calibration_samples (convert) or num_samples "
                            f"(calibrate) to choose how many.", stacklevel=2)
                    return
        finally:
            if hasattr(stream, "close"):
                stream.close()
        if offset == 0:
            raise ValueError(
                "representative data is empty: got 0 samples; pass at least one sample (check "
                "that arrays are not empty, a dataset is not exhausted or filtered out, and a "
                "generator function returns a new generator on every call)"
            )

    def _prepared(self) -> Iterator[list[np.ndarray]]:
        start = 0
        for inputs, batched in self._source():
            arrays = self._prepare(inputs, batched, start)
            yield arrays
            start += len(arrays[0])

    def _prepare(self, inputs: Any, batched: bool | None, start: int) -> list[np.ndarray]:
        """Orders inputs, converts them to arrays with a batch axis and checks the shapes."""
        if isinstance(inputs, Mapping):
            leaves = self._order_dict(inputs)
        else:
            leaves = list(inputs)
        if not leaves:
            raise ValueError(
                f"representative data item at sample {start} has no inputs (got an empty "
                f"{type(inputs).__name__}); yield one array per model input, e.g. [x_batch]"
            )
        if self._shapes is None:
            self._shapes = [None] * len(leaves)
        arrays = [self._as_array(leaf, i) for i, leaf in enumerate(leaves)]
        if len(arrays) != len(self._shapes):
            self._raise_count(arrays)
        arrays = [self._with_batch_axis(a, i, batched) for i, a in enumerate(arrays)]
        for i, array in enumerate(arrays):
            self._check_shape(array, i, start)
        counts = [len(a) for a in arrays]
        if len(set(counts)) > 1:
            j = next(i for i, c in enumerate(counts) if c != counts[0])
            raise ValueError(
                f"{self._label(0)} has {counts[0]} samples but {self._label(j)} has {counts[j]} "
                f"(from sample {start}); every input needs exactly one entry per sample"
            )
        return arrays

    def _order_dict(self, inputs: Mapping[str, Any]) -> list[Any]:
        if self._names is None:
            self._names = sorted(str(k) for k in inputs)
        return order_by_name(inputs, self._names, data="representative data",
                             target=self._expected_by or "the first sample",
                             fix="rename the keys to the input names, or pass input_names= in the order of the "
                                 "model inputs")

    def _as_array(self, leaf: Any, index: int) -> np.ndarray:
        try:
            array = np.asarray(leaf)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self._label(index)} cannot be converted to a numeric array "
                f"({_first_line(err)}); pass numeric arrays whose samples all have one shape"
            ) from None
        if array.dtype.kind not in "biuf":
            example = array.flat[0] if array.size else None
            example = example.item() if isinstance(example, np.generic) else example
            raise ValueError(
                f"{self._label(index)} has non-numeric dtype {array.dtype} (e.g. {example!r:.40}); "
                "representative data must be numbers — encode it (e.g. map strings to ids or "
                "floats) first"
            )
        return array

    def _with_batch_axis(self, array: np.ndarray, index: int, batched: bool | None) -> np.ndarray:
        if batched is None:
            expected = self._shapes[index]
            if array.ndim == len(expected) + 1:
                batched = True
            elif array.ndim == len(expected):
                batched = False
            else:
                raise ValueError(
                    f"{self._label(index)} has an element of shape {_format_shape(array.shape)} "
                    f"(rank {array.ndim}) but {self._expected_by} expects samples of shape "
                    f"{_format_shape(expected)} (rank {len(expected)}, or {len(expected) + 1} "
                    f"with a batch axis); "
                    f"{_shape_fix(array.shape, array.shape[1:], expected)}"
                )
        if not batched:
            return array[np.newaxis]
        if array.ndim == 0:
            raise ValueError(
                f"{self._label(index)} is a scalar (shape ()) where a batch was expected; pass "
                "an array whose first axis indexes samples, e.g. np.array([value])"
            )
        return array

    def _check_shape(self, array: np.ndarray, index: int, start: int) -> None:
        sample_shape = array.shape[1:]
        expected = self._shapes[index]
        if expected is None:
            self._shapes[index] = tuple(sample_shape)
            return
        if _dims_match(sample_shape, expected):
            return
        label = self._label(index)
        if not self._shapes_given:
            raise ValueError(
                f"{label} sample {start} has shape {_format_shape(sample_shape)} but earlier "
                f"samples have {_format_shape(expected)}; all samples of an input must have one "
                "shape (pass model= to accept any size along the model's None dimensions)"
            )
        raise ValueError(
            f"{label} sample {start} has shape {_format_shape(sample_shape)} (rank "
            f"{len(sample_shape)}, batch axis excluded) but {self._expected_by} expects "
            f"{_format_shape(expected)} (rank {len(expected)}, None = any size); "
            f"{_shape_fix(array.shape, sample_shape, expected)}"
        )

    def _raise_count(self, arrays: list[np.ndarray]) -> None:
        expected = len(self._shapes)
        got = ", ".join(_format_shape(a.shape) for a in arrays) or "none"
        source = self._expected_by or "the first sample"
        names = f" {self._names}" if self._names else ""
        hint = " (labels are not inputs: pass x, not (x, y))" if len(arrays) > expected else ""
        raise ValueError(
            f"representative data has {len(arrays)} input(s) of shapes [{got}] but {source} has "
            f"{expected} input(s){names}; pass exactly {expected} array(s) per sample, in input "
            f"order{hint}"
        )

    def _convert(self, arrays: list[np.ndarray], start: int) -> list[np.ndarray]:
        """Casts to the output dtypes (always a copy) and rejects NaN, Inf and lossy casts."""
        out = []
        for index, array in enumerate(arrays):
            dtype = self._dtypes[index] if self._dtypes is not None else np.dtype(np.float32)
            label = self._label(index)
            if dtype.kind in "iu":
                if array.dtype.kind == "f":
                    self._check_finite(array, array, index, start)
                    fractional = array != np.round(array)
                    if fractional.any():
                        k = _first_bad_sample(fractional)
                        raise ValueError(
                            f"{label} sample {start + k} has non-integer values but the model "
                            f"input is {dtype.name}; round the data or feed a float input"
                        )
                if array.size:
                    info = np.iinfo(dtype)
                    low, high = array.min().item(), array.max().item()
                    if low < info.min or high > info.max:
                        raise ValueError(
                            f"{label} has values in [{low}, {high}] (samples from {start}) "
                            f"outside the range of the model input dtype {dtype.name}; rescale "
                            "or clip the data"
                        )
                out.append(array.astype(dtype))
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    converted = array.astype(np.float32)
                self._check_finite(converted, array, index, start)
                out.append(converted)
        return out

    def _check_finite(
        self, converted: np.ndarray, original: np.ndarray, index: int, start: int
    ) -> None:
        if converted.dtype.kind != "f":
            return
        bad = ~np.isfinite(converted)
        if not bad.any():
            return
        k = _first_bad_sample(bad)
        position = np.flatnonzero(bad[k])[0]
        value = original[k].reshape(-1)[position].item()
        label = self._label(index)
        if np.isfinite(value):
            raise ValueError(
                f"{label} sample {start + k} has value {value!r} which overflows float32; "
                "rescale the data into the float32 range"
            )
        kind = "NaN" if np.isnan(value) else "Inf"
        raise ValueError(
            f"{label} sample {start + k} contains {kind}; representative data must be finite — "
            "drop or fix that sample (e.g. np.nan_to_num) and check the preprocessing"
        )


def _first_bad_sample(bad: np.ndarray) -> int:
    return int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))


def _rebatch(
    chunks: Iterator[list[np.ndarray]], batch_size: int, label: Callable[[int], str]
) -> Iterator[list[np.ndarray]]:
    """Regroups batches of any sizes into batches of exactly `batch_size` (last may be smaller)."""
    pending: list[list[np.ndarray]] = []
    pending_count = 0

    def flush() -> list[np.ndarray]:
        merged = []
        for i in range(len(pending[0])):
            parts = [p[i] for p in pending]
            try:
                merged.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
            except ValueError:
                shapes = sorted({_format_shape(p.shape[1:]) for p in parts})
                raise ValueError(
                    f"cannot batch samples of {label(i)} with different shapes {shapes}; use "
                    "batch_size=1 or pad the data to one shape"
                ) from None
        return merged

    try:
        for arrays in chunks:
            count = len(arrays[0])
            position = 0
            if pending_count:
                take = min(batch_size - pending_count, count)
                pending.append([a[:take] for a in arrays])
                pending_count += take
                position = take
                if pending_count == batch_size:
                    yield flush()
                    pending, pending_count = [], 0
            while count - position >= batch_size:
                yield [a[position : position + batch_size] for a in arrays]
                position += batch_size
            if position < count:
                pending.append([a[position:] for a in arrays])
                pending_count += count - position
        if pending_count:
            yield flush()
    finally:
        chunks.close()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}; {fix}")


def _is_array_object(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def _input_arrays(data: Any, names: list[str] | None) -> tuple[list[np.ndarray], list[str] | None]:
    """Turns in-memory data (array, list/tuple of arrays, dict) into arrays in input order."""
    if isinstance(data, Mapping):
        keys = [str(k) for k in data]
        order = names if names is not None else sorted(keys)
        if sorted(keys) != sorted(order):
            missing = [n for n in order if n not in keys]
            unexpected = [k for k in keys if k not in order]
            raise ValueError(
                f"representative data has dict keys {sorted(keys)} but the inputs are {order} "
                f"(missing: {missing}, unexpected: {unexpected}); rename the keys to the input "
                "names, or pass input_names= in the order of the model inputs"
            )
        by_name = {str(k): v for k, v in data.items()}
        leaves, names = [by_name[n] for n in order], list(order)
    elif isinstance(data, (list, tuple)) and data and all(_is_array_object(e) for e in data):
        leaves = list(data)
    else:
        leaves = [data]
    arrays = []
    for index, leaf in enumerate(leaves):
        label = f"input {names[index]!r}" if names and index < len(names) else f"input {index}"
        try:
            array = np.asarray(leaf)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{label} cannot be converted to a numeric array ({_first_line(err)}); pass "
                "numeric arrays whose samples all have one shape"
            ) from None
        if array.ndim == 0:
            raise ValueError(
                f"{label} is a scalar (shape ()) but the first axis must index samples; pass an "
                "array of shape (num_samples, ...), e.g. np.array([value])"
            )
        arrays.append(array)
    counts = [len(a) for a in arrays]
    if len(set(counts)) > 1:
        j = next(i for i, c in enumerate(counts) if c != counts[0])
        label0 = f"input {names[0]!r}" if names else "input 0"
        labelj = f"input {names[j]!r}" if names else f"input {j}"
        raise ValueError(
            f"{label0} has {counts[0]} samples but {labelj} has {counts[j]}; every input needs "
            "exactly one entry per sample (first axis)"
        )
    return arrays, names


def _dataset_batched(dataset: Any, num_inputs: int | None, names: list[str] | None) -> bool:
    """Without a model: a dataset is batched iff its first input's static leading dim is None."""
    tf = _tensorflow()
    spec = _extract_inputs(dataset.element_spec, num_inputs)
    if isinstance(spec, Mapping):
        order = names if names is not None and set(names) == set(map(str, spec)) else sorted(spec)
        leaves = [spec[k] for k in order]
    else:
        leaves = list(spec)
    for leaf in leaves:
        if not isinstance(leaf, tf.TensorSpec):
            raise TypeError(
                f"tf.data element component {leaf} is not a dense tensor; representative data "
                "must be dense — convert it first, e.g. dataset.map(lambda x: x.to_tensor())"
            )
    if not leaves:
        return True
    shape = leaves[0].shape
    return shape.rank is not None and shape.rank >= 1 and shape[0] is None


def pack_model_inputs(model: Any, arrays: Sequence[Any]) -> Any:
    """One list of input arrays (in ``model.inputs`` order) in the structure ``model`` is called with.

    A single-input model takes the array itself; a model built on a dict (keras-hub backbones) or
    a list of inputs takes the same structure.

    Example:
        >>> import keras
        >>> a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
        >>> model = keras.Model({"b": b, "a": a}, a)
        >>> sorted(pack_model_inputs(model, [np.zeros((1, 2)), np.ones((1, 3))]))
        ['a', 'b']
    """
    import keras

    structure = model.input
    if not isinstance(structure, (list, tuple, dict)):
        return arrays[0]
    return keras.tree.pack_sequence_as(structure, list(arrays))


def representative_dataset(
    data: Any,
    num_samples: int | None = None,
    *,
    model: Any = None,
    batch_size: int = 1,
    input_names: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> RepresentativeDataset:
    """Wraps calibration data as a validated, re-iterable `RepresentativeDataset`.

    Accepted `data` (labels, if any, are dropped):

    * a numpy array, or anything `np.asarray` takes: one input, first axis = samples;
    * a list or tuple of arrays (objects with `.shape` and `.dtype`): one array per input, in
      model input order; a dict `name -> array`: inputs by name, ordered by the model input
      names, else by `input_names`, else by sorted key;
    * a `tf.data.Dataset` whose elements are `x`, `(x, y)`, `(x, y, w)`, a dict of inputs or a
      tuple of inputs (see below). With a `model`, an element whose rank equals the model input
      rank is a batch, one less is a single sample. Without a model, the dataset counts as
      batched only if the static leading dimension of its (first) input is None — as after
      `.batch(n)`; `.batch(n, drop_remainder=True)` has a static batch size and so reads as
      unbatched: pass `model`, or `.unbatch()` it;
    * a function returning a new iterable of items on every call (like TFLite's own
      representative datasets, e.g. `lambda: ([x[None]] for x in xs)`); items take the forms
      above. Without a model every item must carry a batch axis (TFLite convention); with a
      model it is decided by rank as for datasets;
    * another `RepresentativeDataset`: returned as is when no argument changes it, else re-read
      with the new cap, batch size, model check or shuffle.

    Tuples follow Keras `fit`: `(x,)`, `(x, y)`, `(x, y, sample_weight)` give `x` — except a
    tuple of exactly as many plain arrays as the model (or `input_names`) has inputs, when there
    are several, which is the inputs themselves. A list is always the inputs. At the top level of
    `data` a list or tuple of arrays is always the inputs.

    Nothing is read into memory as a whole: arrays are sliced lazily, datasets and generators
    are streamed. The first batch is checked at construction; the rest as it streams, and the
    first bad sample raises. Numeric data are cast to float32 (or to an integer model input's
    dtype); the yielded arrays are copies.

    Args:
        data: The calibration data, in one of the forms above.
        num_samples: Maximum number of samples to yield (None = all). Required for infinite
            datasets.
        model: Optional Keras model (3 or tf_keras); its inputs fix the input count, order,
            names, ranks, non-None dimensions and integer dtypes that the data must match.
        batch_size: Samples per item yielded by calling the result (TFLite converts with 1).
        input_names: Names of the inputs, in order: used to order dict data and in messages.
            With a model, defaults to the model input names (give one name per model input to
            use other dict keys).
        shuffle: Yield samples in random order: arrays get an exact permutation (so
            `num_samples` picks a random subset); streams go through a 1024-sample buffer.
        seed: Seed of the shuffle; the same seed gives the same order on every call.

    Returns:
        A `RepresentativeDataset`.

    Raises:
        TypeError: If `data` has an unsupported type (e.g. a generator object, which can be
            read only once — pass the function that makes it).
        ValueError: If an argument is invalid or the data are empty, non-numeric, contain NaN
            or Inf, or do not match the model inputs (count, rank, dimensions).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).random((100, 8, 8, 1), dtype=np.float32)
        >>> rep = representative_dataset(x, num_samples=16)
        >>> len(rep), rep.input_signature
        (16, [((8, 8, 1), 'float32')])
        >>> # converter.representative_dataset = rep
    """
    if num_samples is not None:
        _check_positive_int(
            "num_samples", num_samples, "pass e.g. num_samples=100, or None for all"
        )
        num_samples = int(num_samples)
    _check_positive_int("batch_size", batch_size, "pass e.g. batch_size=1")
    batch_size = int(batch_size)
    if not isinstance(shuffle, (bool, np.bool_)):
        raise ValueError(
            f"shuffle must be True or False. Received: shuffle={shuffle!r}; pass a bool"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(
            f"seed must be a non-negative integer. Received: seed={seed!r}; pass e.g. seed=0"
        )
    if input_names is not None:
        if isinstance(input_names, str) or not all(isinstance(n, str) and n for n in input_names):
            raise ValueError(
                f"input_names must be a list of non-empty strings. Received: "
                f"input_names={input_names!r}; pass e.g. input_names=['pixels']"
            )
        input_names = list(input_names)
        if len(set(input_names)) != len(input_names):
            raise ValueError(
                f"input_names must be unique. Received: input_names={input_names!r}; rename the "
                "duplicates"
            )

    options = {
        "num_samples": num_samples,
        "model": model,
        "batch_size": batch_size,
        "input_names": input_names,
        "shuffle": bool(shuffle),
    }

    # Expected inputs.
    names = input_names
    shapes: list[tuple] | None = None
    dtypes: list[np.dtype] | None = None
    expected_by = "input_names" if input_names is not None else None
    if model is not None:
        specs = model_input_specs(model)
        if input_names is not None and len(input_names) != len(specs):
            raise ValueError(
                f"input_names has {len(input_names)} names but model {_model_name(model)!r} has "
                f"{len(specs)} inputs {[s[0] for s in specs]}; pass one name per model input, or "
                "omit input_names"
            )
        names = input_names or [s[0] for s in specs]
        shapes = [s[1] for s in specs]
        dtypes = [
            np.dtype(s[2]) if s[2] in ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                       "uint32", "uint64") else np.dtype(np.float32)
            for s in specs
        ]
        expected_by = f"model {_model_name(model)!r}"
    num_inputs = len(shapes) if shapes is not None else (len(names) if names is not None else None)
    if shapes is None and names is not None:
        shapes = [None] * len(names)

    limit = num_samples
    stream_seed = seed if shuffle else None
    length: int | None = None
    stream_cap: int | None = None

    if isinstance(data, RepresentativeDataset):
        if data._options == options or (
            num_samples is None and model is None and input_names is None and not shuffle
            and batch_size == data.batch_size
        ):
            return data
        if data._limit is not None:
            limit = data._limit if limit is None else min(limit, data._limit)
        if model is None and names is None:
            names = data.input_names
        if shapes is None:
            shapes = [None] * len(data._shapes)
        source: Callable[[], Iterator[_Item]] = _RepresentativeSource(data)
        if data._length is not None:
            length = data._length if limit is None else min(limit, data._length)
        if model is None:
            # Same inputs as `data`: keep its dtypes (e.g. integer model inputs).
            dtypes = data._dtypes
    elif _is_tf_dataset(data):
        tf = _tensorflow()
        batched = None if model is not None else _dataset_batched(data, num_inputs, names)
        cardinality = int(data.cardinality())
        if cardinality == tf.data.UNKNOWN_CARDINALITY:
            stream_cap = STREAM_SAMPLE_CAP
        if cardinality == tf.data.INFINITE_CARDINALITY and limit is None:
            raise ValueError(
                "representative tf.data.Dataset is infinite (cardinality INFINITE); pass "
                "num_samples=... or dataset.take(n)"
            )
        if cardinality == tf.data.INFINITE_CARDINALITY:
            length = limit
        elif cardinality >= 0 and batched is False:
            length = cardinality if limit is None else min(limit, cardinality)
        source = _DatasetSource(data, num_inputs, batched)
    elif inspect.isgenerator(data) or isinstance(data, Iterator):
        raise TypeError(
            f"representative data is an iterator ({type(data).__name__}), which can be read only "
            "once; pass a function that returns a new one on each call, e.g. `lambda: gen()`"
        )
    elif data is None or isinstance(data, (str, bytes)):
        raise TypeError(
            f"representative data must be arrays, a dict or list of arrays, a tf.data.Dataset or "
            f"a generator function. Received: {type(data).__name__} {data!r:.60}; pass e.g. x_train"
        )
    elif callable(data) and not _is_array_object(data):
        source = _CallableSource(data, num_inputs, None if model is not None else True)
        stream_cap = STREAM_SAMPLE_CAP
    else:
        arrays, names = _input_arrays(data, names)
        array_source = _ArraySource(arrays, limit, bool(shuffle), seed)
        source = array_source
        length = array_source.length
        stream_seed = None  # arrays are permuted exactly by the source

    return RepresentativeDataset(
        source,
        length=length,
        limit=limit,
        batch_size=batch_size,
        shuffle_seed=stream_seed,
        names=names,
        shapes=shapes,
        dtypes=dtypes,
        expected_by=expected_by,
        options=options,
        stream_cap=stream_cap,
    )
