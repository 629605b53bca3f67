"""Loading and recognising models: Keras 3, tf_keras, files on disk, tfq QAT models."""

from __future__ import annotations

import os
import re
from pathlib import Path

import keras

from tfq.quantsim.rewrite import quantizers_of

__all__ = ["load_model", "is_keras3_model", "is_tf_keras_model", "is_quantized_model", "SavedModelPath",
           "check_saved_model_complete"]


class SavedModelPath(str):
    """A path to a TensorFlow SavedModel directory (converted by the TFLite converter directly)."""


def check_saved_model_complete(path) -> None:
    """Before TensorFlow reads a SavedModel: one line if ``variables/`` is missing (TensorFlow writes
    ``variables/variables.index`` even for a model without variables; without it the reader fails
    with a two-line FileNotFoundError about a TensorSliceReader)."""
    path = Path(path)
    if not (path / "variables" / "variables.index").is_file():
        raise ValueError(f"SavedModel {str(path)!r} is incomplete: it has saved_model.pb but no "
                         f"variables/variables.index. Copy the whole SavedModel directory (variables/ included), "
                         f"or export it again.")


def is_keras3_model(model) -> bool:
    return isinstance(model, keras.Model)


def is_tf_keras_model(model) -> bool:
    """A model built with tf_keras (Keras 2), recognised without importing tf_keras."""
    return any(cls.__module__.startswith("tf_keras") for cls in type(model).__mro__) and hasattr(model, "layers")


def is_quantized_model(model) -> bool:
    """Whether ``model`` is a tfq-rewritten (QAT or calibrated) model."""

    return is_keras3_model(model) and bool(quantizers_of(model))


def load_model(model):
    """Returns a Keras model (or a :class:`SavedModelPath`) from a model or a path.

    Args:
        model: a Keras 3 / tf_keras model, a ``.keras``/``.h5`` file or a SavedModel directory.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a model Keras can read.
        TypeError: anything else.
    """
    if is_keras3_model(model) or is_tf_keras_model(model):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a Keras model or a path to a .keras/.h5 file or SavedModel directory. "
            f"Received: {type(model).__name__}"
        )
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {str(path)!r}. Check the path (a .keras file or a SavedModel directory).")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ValueError(f"{str(path)!r} is a directory without saved_model.pb: not a SavedModel. Pass a .keras file.")
        return SavedModelPath(str(path))
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ValueError(f"unsupported model file {str(path)!r}: expected .keras, .h5 or a SavedModel directory.")
    _check_archive(path)
    import tfq.quantsim.layers  # noqa: F401 - registers tfq's serializable classes
    if path.suffix == ".keras" and _saved_by_keras2(path):
        return _load_tf_keras(path)

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as err:  # keras raises many types for unreadable files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "File not found" in first:  # what Keras says of an archive it cannot read: the file is there
            first = "Keras cannot read the archive"
        tfmot_layer = re.search(r"Unknown layer: '(QuantizeWrapper(?:V2)?|QuantizeLayer)'", first)
        if tfmot_layer:  # a tfmot QAT model saved by tf_keras: a Keras 2 path
            from tfq.models.interop import KERAS2_EXTRA, missing_keras2

            missing = missing_keras2()
            raise ValueError(
                f"model {str(path)!r} is a tfmot QAT model (layer class {tfmot_layer.group(1)!r}), which Keras 3 "
                f"cannot load: load it with tf_keras inside tfmot.quantization.keras.quantize_scope() and pass "
                f"the model to tfq" + (f" (needs {' and '.join(missing)}: pip install '{KERAS2_EXTRA}')" if missing
                                       else "") + ".") from None
        raise ValueError(f"could not load model {str(path)!r}: {first[:300]}. Is the file complete and a Keras "
                         f"model?") from None


def _saved_by_keras2(path: Path) -> bool:
    """Whether a ``.keras`` archive was written by tf_keras (Keras 2): its metadata says ``keras_version`` 2.x.
    Keras 3 reads such an archive wrongly or not at all (its config and weights layout are Keras 2's)."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return False
    return str(metadata.get("keras_version", "")).startswith("2.")


def _load_tf_keras(path: Path):
    """A ``.keras`` archive saved by tf_keras, loaded by tf_keras (tfq then rebuilds it in Keras 3)."""
    try:
        import tf_keras
    except ImportError:
        raise ValueError(f"model file {str(path)!r} was saved by tf_keras (Keras 2), which is not installed: "
                         f"pip install tf_keras, or save the model as .h5.") from None
    try:
        return tf_keras.models.load_model(path, compile=False)
    except Exception as err:  # tf_keras raises many types for archives it cannot read
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load model {str(path)!r} saved by tf_keras (Keras 2): {first}. Is the file "
                         f"complete, and are its custom classes importable?") from None


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_archive(path: Path) -> None:
    """A ``.keras`` file is a zip archive, a ``.h5`` file an HDF5 file: a one-line error otherwise."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if path.suffix == ".keras":
            ok = zipfile.is_zipfile(path)
            kind = "a .keras archive (a zip file)"
        else:
            ok = head == _HDF5_SIGNATURE
            kind = "an HDF5 file"
    except OSError as err:
        raise ValueError(f"could not read model {str(path)!r}: {err.strerror or err}.") from None
    if not ok:
        size = path.stat().st_size
        raise ValueError(f"model file {str(path)!r} ({size} bytes) is not {kind}: it is corrupt or truncated. "
                         f"Save the model again (model.save({path.name!r})).")
