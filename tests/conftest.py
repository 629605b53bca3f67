"""Shared fixtures: a trained digits CNN and a MobileNet-style model, built once per test session."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def background_python(script: str):
    """For a fixture (``yield from``): ``script`` in a new CPU-only Python in the repository, started
    at once so it runs while other tests do; yields the ``Popen`` and kills it at teardown if it still runs."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="session")
def digits():
    from tfq.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """The packaged-digits CNN trained 10 epochs: (model, float test accuracy)."""
    import keras

    from tfq.examples import digits_cnn, train_model

    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)  # the initial weights too, so every run trains the same model
    model = digits_cnn(input_shape=x_train.shape[1:])
    train_model(model, x_train, y_train, epochs=10, seed=0)
    accuracy = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    return model, accuracy


@pytest.fixture(scope="session")
def trained_mobilenet():
    """MobileNet-style (depthwise-separable, BN, ReLU6) on 32×32 digits, 15 epochs, as in the benchmark:
    ``(model, (x_train, y_train), (x_test, y_test), float test accuracy)``."""
    import keras

    from tfq.datasets import load_digits
    from tfq.examples import mobilenet_style, train_model

    (x_train, y_train), (x_test, y_test) = load_digits(image_size=32, seed=0)
    keras.utils.set_random_seed(0)
    model = mobilenet_style(input_shape=x_train.shape[1:])
    train_model(model, x_train, y_train, epochs=15, seed=0)
    accuracy = float((model.predict(x_test, verbose=0).argmax(1) == y_test).mean())
    return model, (x_train, y_train), (x_test, y_test), accuracy


def tflite_accuracy(content, x, y):
    """Accuracy of a TFLite model through LiteRT's interpreter, sample by sample (independent path)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    correct = 0
    for sample, label in zip(x, y):
        v = sample[None]
        if inp["dtype"] != np.float32:
            scale, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            v = np.clip(np.round(v / scale) + zp, info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], v)
        interp.invoke()
        correct += int(interp.get_tensor(out["index"]).argmax() == label)
    return correct / len(y)


def save_audio_saved_model(path) -> str:
    """Writes the audio-like SavedModel the front-end and tune tests share (a tf.Module, no Keras): 1024
    samples → 8 frames of 128 → |STFT| / (max + 1e-6), the normalising DIV that fails on silence in INT8 →
    log(· + 1e-6) → Dense(4). Returns the directory."""
    import tensorflow as tf

    class Audio(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(3)
            self.w = tf.Variable((rng.normal(size=(65, 4)) / 8.0).astype("float32"))
            self.b = tf.Variable(np.full((4,), 0.1, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 1024], tf.float32, name="audio")])
        def __call__(self, audio):
            mag = tf.abs(tf.signal.stft(audio, frame_length=128, frame_step=128, fft_length=128))
            norm = mag / (tf.reduce_max(mag, axis=[-2, -1], keepdims=True) + 1e-6)  # the normalising DIV
            return tf.matmul(tf.math.log(norm + 1e-6), self.w) + self.b

    module = Audio()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return str(path)
