"""Analysis: evaluation of Keras and TFLite variants side by side, its report, and accuracy-aware tuning."""
