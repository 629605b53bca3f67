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
