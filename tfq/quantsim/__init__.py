"""Quantization simulation: the fake-quant twin of a Keras model that QAT trains and PTQ calibrates.

`layers` holds the Keras wrappers that insert fake-quant ops where TFLite quantizes, `registry` says
how each layer type is quantized (the single dispatch point), `decompositions` rewrites layers into
ops with int8 kernels, and `rewrite` walks a model and returns its quantized twin."""
