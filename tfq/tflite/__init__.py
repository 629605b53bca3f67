"""The TFLite side: running the converter quietly, LiteRT's interpreter (batched, quantized I/O), and
reading a .tflite file (ops, dtypes, quantization, size)."""
