"""CUDA kernels for Persimmon's two custom ONNX ops, and their TensorRT plugin definitions.

The op names are those of the exported ONNX nodes (domain `persimmon`), so TensorRT's ONNX
parser swaps a registered plugin in for the node's function body.
"""

from persimmon_runtime.manifest import CUSTOM_OP_DOMAIN as NAMESPACE  # noqa: F401 (the ONNX domain)

QK_LAYERNORM_OP = "PersimmonQKLayerNorm"
ROTARY_OP = "PersimmonPartialRotary"

# op -> (kernel source in kernels/, kernel function per storage dtype)
KERNELS = {
    QK_LAYERNORM_OP: ("qk_layernorm.cu", {"float16": "persimmon_qk_layernorm_f16",
                                          "float32": "persimmon_qk_layernorm_f32"}),
    ROTARY_OP: ("partial_rotary.cu", {"float16": "persimmon_partial_rotary_f16",
                                      "float32": "persimmon_partial_rotary_f32"}),
}
