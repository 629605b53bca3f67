"""The layer graph of one level of a Functional model, read from its public config.

``model.get_config()`` lists, for every layer, the tensors each call consumed
(``keras_history = [layer name, node index, tensor index]``). :class:`ModelGraph` turns that into
producers and consumers, so the weight methods (:mod:`tfq.ptq.equalization`,
:mod:`tfq.ptq.bias_correction`, :mod:`tfq.ptq.data_free`) can follow a tensor from one layer to the next
without touching private Keras attributes and without calling (and so changing) the caller's
layers. A nested model is one node here: each level is read on its own.

Example:
    >>> graph = ModelGraph(model)                          # doctest: +SKIP
    >>> [n.name for n in graph.consumers_of(graph.node("conv1").output)]   # doctest: +SKIP
    ['bn1']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from tfq.quantsim.rewrite import _as_functional

__all__ = ["GraphNode", "ModelGraph", "as_functional", "TensorKey"]

TensorKey = tuple  # (layer name, node index, tensor index)


@dataclass(eq=False)
class GraphNode:
    """One call of a layer (or ``keras.ops`` operation) in a model.

    Attributes:
        name: the layer's name in its model.
        node_index: which call of the layer this is (0 for layers called once).
        layer: the layer object (None for an input or an operation that is not a layer).
        class_name: the class name from the config.
        inputs: the tensors the call consumed, args first, in order.
        first_input: the first positional tensor (None if there is none).
        shapes: the shapes of ``inputs`` as the config records them.
        calls: how many times the layer is called in this model (0 for an input).
    """

    name: str
    node_index: int
    layer: object
    class_name: str
    inputs: tuple = ()
    first_input: TensorKey | None = None
    shapes: tuple = ()
    calls: int = 1

    @property
    def output(self) -> TensorKey:
        """The call's first output tensor."""
        return (self.name, self.node_index, 0)


def _tensor_refs(value, out: list) -> None:
    """Collects ``(keras_history, shape)`` of every serialized tensor in a call's args."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            config = value.get("config", {})
            history = config.get("keras_history")
            if history is not None:
                out.append((tuple(history), tuple(config.get("shape") or ())))
            return
        for v in value.values():
            _tensor_refs(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensor_refs(v, out)


def as_functional(model: keras.Model) -> keras.Model:
    """A Functional view of a Sequential or Functional model (the same layers, not copies).

    Raises:
        ValueError: an unbuilt Sequential or a subclassed model (no graph to read).
    """

    return _as_functional(model)


@dataclass
class ModelGraph:
    """Producers and consumers of the tensors of one model level (nested models are single nodes).

    Args:
        model: a Functional or built Sequential model.
    """

    model: keras.Model
    nodes: list = field(default_factory=list)

    def __post_init__(self):
        self.model = as_functional(self.model)
        config = self.model.get_config()
        by_name = {op.name: op for op in getattr(self.model, "operations", self.model.layers)}
        self._consumers: dict[TensorKey, list[GraphNode]] = {}
        self._nodes: dict[tuple[str, int], GraphNode] = {}
        for entry in config.get("layers", []):
            name = entry.get("name") or entry.get("config", {}).get("name")
            inbound = entry.get("inbound_nodes") or []
            layer = by_name.get(name)
            if not inbound:
                node = GraphNode(name, 0, layer, entry.get("class_name", ""), calls=0)
                self._nodes[(name, 0)] = node
                self.nodes.append(node)
                continue
            for index, call in enumerate(inbound):
                first: list = []
                _tensor_refs(call.get("args", []) if isinstance(call, dict) else call, first)
                refs = list(first)
                if isinstance(call, dict):
                    _tensor_refs(call.get("kwargs", {}), refs)
                node = GraphNode(
                    name, index, layer, entry.get("class_name", ""),
                    inputs=tuple(r[0] for r in refs), first_input=first[0][0] if first else None,
                    shapes=tuple(r[1] for r in refs), calls=len(inbound),
                )
                self._nodes[(name, index)] = node
                self.nodes.append(node)
                for key in node.inputs:
                    self._consumers.setdefault(key, []).append(node)
        outputs = config.get("output_layers", [])
        if outputs and not isinstance(outputs[0], (list, tuple)):
            outputs = [outputs]
        self.outputs = {tuple(o) for o in outputs}

    def node(self, name: str, node_index: int = 0) -> GraphNode:
        """The node of a layer's call (``KeyError`` if the layer is not in this level)."""
        return self._nodes[(name, node_index)]

    def producer(self, key: TensorKey) -> GraphNode | None:
        """The node whose call made the tensor ``key``."""
        return self._nodes.get((key[0], key[1]))

    def consumers_of(self, key: TensorKey) -> list[GraphNode]:
        """The nodes that consume ``key`` (a model output is not a node: see :meth:`only_consumer`)."""
        return list(self._consumers.get(key, []))

    def only_consumer(self, key: TensorKey) -> GraphNode | None:
        """The single node consuming ``key`` once, if ``key`` is not also a model output."""
        consumers = self._consumers.get(key, [])
        if key in self.outputs or len(consumers) != 1 or consumers[0].inputs.count(key) != 1:
            return None
        return consumers[0]
