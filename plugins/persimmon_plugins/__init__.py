"""CUDA kernels for Persimmon's two custom ONNX ops, and their TensorRT plugin definitions.

The ops' identity (domain = plugin namespace, names, plugin version) is defined once, in
`persimmon_runtime.custom_ops`, which the exporter imports too: TensorRT's ONNX parser swaps a
registered plugin in for the node of the same namespace and name instead of its function body.
"""

from persimmon_runtime.custom_ops import QK_LAYERNORM_OP, ROTARY_OP

# op -> (kernel source in kernels/, kernel function per storage dtype)
KERNELS = {
    QK_LAYERNORM_OP: ("qk_layernorm.cu", {"float16": "persimmon_qk_layernorm_f16",
                                          "float32": "persimmon_qk_layernorm_f32"}),
    ROTARY_OP: ("partial_rotary.cu", {"float16": "persimmon_partial_rotary_f16",
                                      "float32": "persimmon_partial_rotary_f32"}),
}
