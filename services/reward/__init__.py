"""The reward service: scores (prompt, completion) pairs with an ONNX reward model."""
