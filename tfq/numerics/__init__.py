"""Quantization numerics on arrays and tensors: the maths (`ops`), observers that turn statistics into
ranges, and the outlier-sample test. Never takes a Keras layer."""
