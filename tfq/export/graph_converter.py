"""A TFLite converter for a Keras model, from one traced graph instead of a SavedModel.

``tf.lite.TFLiteConverter.from_keras_model`` exports a Keras 3 model to a SavedModel on disk
(tracing its call several times), reads it back and converts that: for the fake-quant models
tfq hands to the converter, this export is most of the conversion time (measured on the digits
CNN: 2.3–3.6 s of export for 0.4 s of conversion). :func:`keras_graph_converter` traces the call
once (``training=False``) into a concrete function whose variables the converter freezes into
constants, the path the converter takes for a concrete function without a trackable object.
That path writes no signature into the ``.tflite``, so the converter returned adds the one
``from_keras_model`` writes: ``serving_default``, inputs keyed by the Keras input names, outputs
by ``output_<i>`` (or by the keys of a dict of outputs), in the model's order.

The signature is added by rebuilding the flatbuffer with LiteRT's schema
(``ai_edge_litert.schema_py_generated``), every constant buffer 16-byte aligned as the
converter writes them.

TF 2.21 logs that a concrete function without a trackable object takes a "deprecated
conversion path" (silenced here); ``tf.lite`` as a whole is deprecated (TF #102071). Should the
path go, :func:`keras_graph_converter` is the one place to change back to ``from_keras_model``.

Example:
    >>> converter = keras_graph_converter(model)                           # doctest: +SKIP
    >>> converter.optimizations = [tf.lite.Optimize.DEFAULT]               # doctest: +SKIP
    >>> content = converter.convert()   # has a serving_default signature  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging

import keras
import numpy as np

from tfq.core.representative import pack_model_inputs

__all__ = ["keras_graph_converter", "add_serving_signature"]

_SIGNATURE_KEY = "serving_default"
_BUFFER_ALIGNMENT = 16
# Flatbuffers address at most 2 GiB; larger models keep their weights outside it (buffer offsets).
_MAX_REPACK_BYTES = 1 << 30


def _tf():
    import tensorflow as tf

    return tf


def _input_specs(model: keras.Model) -> list:
    tf = _tf()
    return [tf.TensorSpec(t.shape, dtype=t.dtype, name=t.name) for t in model.inputs]


def _output_keys(model: keras.Model) -> list[str]:
    """Signature keys of the flattened outputs: ``output_<i>``, or the keys of a dict of outputs."""
    structure = model.output
    if isinstance(structure, dict):
        return sorted(structure)  # keras.tree.flatten orders a dict by key
    return [f"output_{i}" for i in range(len(keras.tree.flatten(structure)))]


def keras_graph_converter(model: keras.Model):
    """A ``tf.lite.TFLiteConverter`` (configurable as usual) for ``model`` called with ``training=False``.

    Args:
        model: a Functional or Sequential Keras 3 model (its inputs define the signature).

    Returns:
        A ``tf.lite.TFLiteConverter`` subclass; ``convert()`` returns ``.tflite`` bytes with the serving signature.
    """

    tf = _tf()
    specs = _input_specs(model)

    def serve(*args):
        return keras.tree.flatten(model(pack_model_inputs(model, list(args)), training=False))

    function = tf.function(serve, input_signature=specs, autograph=False)
    concrete = function.get_concrete_function()
    # The converter logs (through absl) that this path, without a trackable object, is deprecated.
    loggers = [logging.getLogger("absl"), tf.get_logger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        converter = _converter_class().from_concrete_functions([concrete])
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    converter.tfq_signature = ([s.name for s in specs], _output_keys(model))
    return converter


@functools.cache
def _converter_class():
    """``tf.lite.TFLiteConverter`` whose ``convert()`` adds the serving signature (built on first use:
    TensorFlow is imported lazily)."""
    tf = _tf()

    class _GraphConverter(tf.lite.TFLiteConverter):
        """``tf.lite.TFLiteConverter`` whose ``convert()`` adds the serving signature."""

        tfq_signature: tuple[list[str], list[str]] | None = None

        def convert(self):
            content = super().convert()
            if self.tfq_signature is None:
                return content
            inputs, outputs = self.tfq_signature
            return add_serving_signature(content, inputs, outputs)

    return _GraphConverter


def add_serving_signature(content: bytes, input_keys: list[str], output_keys: list[str]) -> bytes:
    """``content`` with a ``serving_default`` signature over the main subgraph's inputs and outputs.

    Input ``i`` of the subgraph gets ``input_keys[i]``, output ``i`` gets ``output_keys[i]``.
    A model that already has a signature, or is too large to rebuild in memory, is returned as is.

    Args:
        content: a ``.tflite`` flatbuffer.
        input_keys: one key per subgraph input, in order.
        output_keys: one key per subgraph output, in order.

    Returns:
        The new flatbuffer bytes (deterministic for the same input).

    Raises:
        ValueError: the number of keys does not match the subgraph's inputs or outputs.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    content = bytes(content)
    if len(content) > _MAX_REPACK_BYTES:
        return content
    model = schema.ModelT.InitFromPackedBuf(content, 0)
    if model.signatureDefs:
        return content
    if any(b.offset > 1 for b in (model.buffers or [])):
        return content
    graph = model.subgraphs[0]
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    if len(inputs) != len(input_keys) or len(outputs) != len(output_keys):
        raise ValueError(
            f"signature keys do not fit the model: {len(input_keys)} input and {len(output_keys)} output key(s) for "
            f"{len(inputs)} input and {len(outputs)} output tensor(s)."
        )
    signature = schema.SignatureDefT()
    signature.signatureKey = _SIGNATURE_KEY
    signature.subgraphIndex = 0
    signature.inputs = [_tensor_map(schema, k, i) for k, i in zip(input_keys, inputs)]
    signature.outputs = [_tensor_map(schema, k, i) for k, i in zip(output_keys, outputs)]
    model.signatureDefs = [signature]
    model.buffers = [_AlignedBuffer.of(schema, b) for b in model.buffers or []]
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_map(schema, key: str, index: int):
    tensor_map = schema.TensorMapT()
    tensor_map.name = key
    tensor_map.tensorIndex = int(index)
    return tensor_map


class _AlignedBuffer:
    """A ``BufferT`` packed with its data 16-byte aligned (the converter's layout)."""

    def __init__(self, schema, buffer):
        self.schema = schema
        self.buffer = buffer

    @classmethod
    def of(cls, schema, buffer):
        return cls(schema, buffer)

    def Pack(self, builder):  # noqa: N802 - the flatbuffers Object API name
        data = self.buffer.data
        vector = None
        if data is not None:
            payload = np.asarray(data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            builder.vectorNumElems = len(payload)
            vector = builder.EndVector()
        schema = self.schema
        schema.BufferStart(builder)
        if vector is not None:
            schema.BufferAddData(builder, vector)
        schema.BufferAddOffset(builder, self.buffer.offset)
        schema.BufferAddSize(builder, self.buffer.size)
        return schema.BufferEnd(builder)
