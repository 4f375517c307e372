"""ONNX runtimes shared by the serving processes and the trainer (which checks models as served)."""
