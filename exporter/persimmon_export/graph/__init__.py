"""The ONNX step graph: attention, weight formats, classifier heads, fp16 range measurement."""
