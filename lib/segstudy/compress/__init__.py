"""Stage 4, compression: pruning (torch.nn.utils.prune, Torch-Pruning), int8 quantization (torch
FX) and ONNX export with ONNX Runtime int8."""
