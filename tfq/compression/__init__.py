"""Compression: magnitude pruning, weight clustering (sharing `common`'s layer walk), and distillation."""
