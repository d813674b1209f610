"""Stage 3, engine: device and precision, training, validation, metrics, the official Cityscapes
evaluation and the measurements (latency, FLOPs, size, CPU)."""
