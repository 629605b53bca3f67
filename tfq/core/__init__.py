"""What to do: recipes, the registries of export modes and calibration methods, representative data,
and the small utilities every stage shares (messages, atomic file writes, input order).

Imports nothing from the rest of tfq; TensorFlow only where a function needs it."""
