"""Post-training quantization: calibration (`calibration`), the pipeline of methods around it
(`pipeline`), and one module per method beyond calibration (equalization, data-free ranges, learned
weight rounding, bias correction)."""
