"""Models as users bring them: loading files (Keras 3, tf_keras, SavedModel), Keras 2 interop, reading a
model's layer graph, and the example models built on the packaged digits."""
