"""The custom ONNX ops' identity, defined once.

The exporter emits nodes with these names in this domain, the plugins register TensorRT plugins
under the same namespace and names (TensorRT's ONNX parser swaps a registered plugin in for a
node whose plugin_namespace and op name match), and the manifest records which ops a graph uses.
Plain constants, free of torch and TensorRT, so that the exporter, the plugins and the runtime
all import them from here.
"""

CUSTOM_OP_DOMAIN = "persimmon"     # ONNX domain of the custom nodes; also the TensorRT plugin namespace
CUSTOM_OP_VERSION = 1              # version of the `persimmon` opset the graph imports
PLUGIN_VERSION = "1"               # the nodes' plugin_version: tensorrt.plugin registers its plugins as "1"
QK_LAYERNORM_OP = "PersimmonQKLayerNorm"   # per-head LayerNorm of q and k (models with qk_layernorm)
ROTARY_OP = "PersimmonPartialRotary"       # rotary embedding on the first rotary_dims of each head
CUSTOM_OPS = (QK_LAYERNORM_OP, ROTARY_OP)
