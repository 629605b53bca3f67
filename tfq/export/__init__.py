"""Export: the `tfq.convert` facade (every mode, tfq's ranges baked into fake-quant nodes) and the
converter built from one traced graph."""
