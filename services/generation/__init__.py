"""The generation service: samples completions from a policy model with ONNX Runtime."""
