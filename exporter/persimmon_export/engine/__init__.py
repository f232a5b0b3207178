"""TensorRT (NVIDIA TensorRT or TensorRT-RTX) engines built from the step graph."""
