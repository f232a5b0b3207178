"""Classifier graphs: Persimmon's sequence- and token-classification heads, without a KV cache.

The decoder is the step graph's own (`export.build_graph`), not a copy: a classifier reads each
text whole, which is a step at first_slot 0 over an empty cache. With the `whole` cache layout
that step's caches are exactly the new keys/values, so each layer's cache write (TensorScatter)
becomes an Identity of its new keys/values, `first_slot` becomes zeros, and the cache inputs and
outputs go. Attention then reads the text's own keys causally, skipping masked slots, as
transformers does; positions are 0..seq-1 (transformers' default; rotary is relative, so left
padding does not change the logits of real tokens).

The head reads the final LayerNorm's output:
- sequence classification: `score` (no bias) at each row's rightmost token that is not
  pad_token_id (transformers' rule, left or right padding); without a pad_token_id, at the last
  token (transformers then refuses batches > 1: so does the runtime) -> logits [batch, num_labels];
- token classification: `score` (with bias) at every token (dropout is identity in inference)
  -> logits [batch, seq, num_labels].
Logits are fp32 (cast from the build's dtype, as the LM's are).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from persimmon_runtime.custom_ops import CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, QK_LAYERNORM_OP, ROTARY_OP
from persimmon_runtime.manifest import (
    CAUSAL_LM,
    CLASSIFIER_INPUTS,
    NO_CACHE,
    PROBLEM_TYPES,
    TASKS,
    ClassifierSection,
    CustomOps,
    GraphSection,
    TensorSpec,
)

from ..config import PersimmonConfig
from ..progress import Steps
from ..reference.model import PersimmonForSequenceClassification, PersimmonForTokenClassification
from .export import (
    DATA_FILE,
    MODEL_FILE,
    ONNX_DTYPES,
    DataWriter,
    ExportError,
    Relu2Scales,
    build_graph,
    save_model,
    value_info,
    write_tensors,
)

log = logging.getLogger(__name__)
SEQUENCE, TOKEN = "sequence-classification", "token-classification"
# config.json `architectures` -> task; the first known entry decides
ARCHITECTURES = {"PersimmonForCausalLM": CAUSAL_LM, "PersimmonForSequenceClassification": SEQUENCE,
                 "PersimmonForTokenClassification": TOKEN}
MODEL_CLASSES = {SEQUENCE: PersimmonForSequenceClassification, TOKEN: PersimmonForTokenClassification}


def read_task(checkpoint: str) -> str:
    """The task config.json's `architectures` names (causal-lm when it names none we know)."""
    raw = _raw_config(checkpoint)
    names = raw.get("architectures") or []
    if not isinstance(names, list):
        raise ExportError(f"{os.path.join(checkpoint, 'config.json')}: architectures={names!r} must be a list of "
                          f"class names")
    return next((ARCHITECTURES[name] for name in names if name in ARCHITECTURES), CAUSAL_LM)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ExportError(f"--task {task!r} is not one of {tuple(TASKS)}")
    return task


def classifier_section(checkpoint: str, config: PersimmonConfig) -> ClassifierSection:
    """Labels, problem type and pad token from config.json, as transformers reads them."""
    path = os.path.join(checkpoint, "config.json")
    raw = _raw_config(checkpoint)
    id2label = raw.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ExportError(f"{path}: id2label must be an object {{\"0\": \"label\", ...}}, got {id2label!r}")
    labels = [f"LABEL_{i}" for i in range(config.num_labels)]  # transformers' names when none are given
    for key, name in id2label.items():
        index = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= index < config.num_labels or not isinstance(name, str):
            raise ExportError(f"{path}: id2label entry {key!r}: {name!r} must map an index in 0..{config.num_labels - 1} "
                              f"(num_labels) to a label name")
        labels[index] = name
    problem_type = raw.get("problem_type")
    duplicate = next((name for name, count in collections.Counter(labels).items() if count > 1), None)
    if duplicate is not None:
        raise ExportError(f"{path}: id2label names {duplicate!r} for more than one index; give each label its own "
                          f"name (their scores would merge)")
    if problem_type is None:  # transformers decides at training time from the labels; inference by num_labels
        problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
    if problem_type not in PROBLEM_TYPES:
        raise ExportError(f"{path}: problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")
    return ClassifierSection(labels=labels, problem_type=problem_type, pad_token_id=config.pad_token_id)


def _raw_config(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:  # PersimmonConfig read it already
        return json.load(f)


def classifier_graph_section(config: PersimmonConfig, dtype: str, task: str) -> GraphSection:
    """The manifest's `onnx` section of a classifier graph: no cache, logits per text or per token."""
    per_token = ["batch", "seq"] if task == TOKEN else ["batch"]
    ops = [QK_LAYERNORM_OP, ROTARY_OP] if config.qk_layernorm else [ROTARY_OP]
    return GraphSection(file=MODEL_FILE, data_file=DATA_FILE, cache_layout=NO_CACHE,
                        custom_ops=CustomOps(CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, ops),
                        inputs=[TensorSpec(name, "int64", ["batch", "seq"]) for name in CLASSIFIER_INPUTS],
                        outputs=[TensorSpec("logits", "float32", [*per_token, config.num_labels])],
                        cache_aliases={})


def build_classifier_graph(config: PersimmonConfig, dtype: str, max_text_tokens: int, task: str,
                           pad_token_id: int | None) -> onnx.GraphProto:
    """The classifier graph (initializers left out): the step graph's decoder over an empty cache,
    then the task's head."""
    step = build_graph(config, dtype, max_text_tokens, cache_layout="whole")
    # the LM's own `logits` (its head) is replaced by the classifier's
    nodes = [_without_cache_write(node) for node in step.node if "logits" not in node.output]
    final = next((n for n in nodes if n.op_type == "LayerNormalization" and "model.final_layernorm.weight" in n.input),
                 None)
    if final is None or not any(n.op_type == "TensorScatter" for n in step.node):
        raise ExportError("the step graph has changed shape (no final LayerNorm or no cache write): "
                          "classify.build_classifier_graph must follow export.build_graph")
    head = _head(config, dtype, task, pad_token_id, final.output[0])
    first_slot = [helper.make_node("Shape", ["input_ids"], ["classifier_input_shape"]),
                  helper.make_node("Constant", [], ["classifier_axis0"], value_ints=[0]),
                  helper.make_node("Gather", ["classifier_input_shape", "classifier_axis0"], ["classifier_batch"]),
                  helper.make_node("ConstantOfShape", ["classifier_batch"], ["first_slot"],
                                   value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]))]
    kept = _needed(first_slot + nodes + head, "logits")
    section = classifier_graph_section(config, dtype, task)
    return helper.make_graph(kept, f"persimmon_{task.replace('-', '_')}", [value_info(s) for s in section.inputs],
                             [value_info(s) for s in section.outputs])


def _without_cache_write(node: onnx.NodeProto) -> onnx.NodeProto:
    """A cache write into an empty `whole` cache at slot 0 gives the new keys/values themselves."""
    if node.op_type != "TensorScatter":
        return node
    return helper.make_node("Identity", [node.input[1]], list(node.output), name=node.name)


def _head(config: PersimmonConfig, dtype: str, task: str, pad_token_id: int | None, hidden32: str) -> list:
    """Nodes from the final LayerNorm's fp32 output to fp32 `logits`."""
    half = dtype != "float32"
    nodes = []
    hidden = hidden32
    if half:  # the head runs in the build's dtype, as transformers' score Linear does
        nodes.append(helper.make_node("Cast", [hidden32], ["cls_hidden"], to=ONNX_DTYPES[dtype]))
        hidden = "cls_hidden"
    if task == SEQUENCE:
        nodes += _last_token(pad_token_id)
        nodes.append(helper.make_node("GatherND", [hidden, "last_token"], ["pooled"], batch_dims=1))  # [B, hidden]
        nodes.append(helper.make_node("MatMul", ["pooled", "score.weight"], ["cls_logits"]))
    else:
        nodes.append(helper.make_node("MatMul", [hidden, "score.weight"], ["cls_scores"]))
        nodes.append(helper.make_node("Add", ["cls_scores", "score.bias"], ["cls_logits"]))
    nodes.append(helper.make_node("Cast", ["cls_logits"], ["logits"], to=TensorProto.FLOAT) if half
                 else helper.make_node("Identity", ["cls_logits"], ["logits"]))
    return nodes


def _last_token(pad_token_id: int | None) -> list:
    """`last_token` [B, 1]: transformers' argmax(arange(seq) * (input_ids != pad)), the rightmost
    non-pad token (0 for a row of pads); without a pad token, the last position."""
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(value, np.int64)))

    nodes = [const("cls_zero", 0), const("cls_one", 1), const("cls_axis1", [1]),
             helper.make_node("Shape", ["input_ids"], ["cls_shape"]),
             helper.make_node("Gather", ["cls_shape", "cls_one"], ["cls_seq"], axis=0)]
    if pad_token_id is None:  # [B, 1] of seq - 1
        return nodes + [const("cls_axes01", [0, 1]), const("cls_axis0", [0]),
                        helper.make_node("Sub", ["cls_seq", "cls_one"], ["cls_last"]),
                        helper.make_node("Unsqueeze", ["cls_last", "cls_axes01"], ["cls_last11"]),
                        helper.make_node("Gather", ["cls_shape", "cls_axis0"], ["cls_batch"], axis=0),
                        helper.make_node("Concat", ["cls_batch", "cls_axis1"], ["cls_b1"], axis=0),
                        helper.make_node("Expand", ["cls_last11", "cls_b1"], ["last_token"])]
    return nodes + [
        const("cls_pad", pad_token_id),
        helper.make_node("Equal", ["input_ids", "cls_pad"], ["cls_is_pad"]),
        helper.make_node("Not", ["cls_is_pad"], ["cls_real"]),
        helper.make_node("Cast", ["cls_real"], ["cls_real_i"], to=TensorProto.INT64),
        helper.make_node("Range", ["cls_zero", "cls_seq", "cls_one"], ["cls_slots"]),
        helper.make_node("Mul", ["cls_real_i", "cls_slots"], ["cls_real_slots"]),
        helper.make_node("ArgMax", ["cls_real_slots"], ["last_token"], axis=1, keepdims=1)]


def _needed(nodes: list, output: str) -> list:
    """The nodes `output` depends on, in their order (the step graph's caches and LM head go)."""
    producers = {name: node for node in nodes for name in node.output}
    wanted, stack = set(), [output]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            stack.extend(node.input)
    return [node for node in nodes if id(node) in wanted]


def export_classifier(config: PersimmonConfig, tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str, task: str,
                      dtype: str = "float16", max_text_tokens: int = 4096, pad_token_id: int | None = None
                      ) -> tuple[GraphSection, dict]:
    """Write out_dir/model.onnx + model.onnx.data for a classifier; return the manifest's `onnx`
    section and the files written. The decoder's weights are stored as the LM build stores them
    (relu^2 scales in float16, chosen from the weights alone), the head's `score` as [in, out]."""
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(ONNX_DTYPES)}")
    graph = build_classifier_graph(config, dtype, max_text_tokens, task, pad_token_id)
    writer = DataWriter(os.path.join(out_dir, DATA_FILE))
    per_layer = 16 if config.qk_layernorm else 12
    step = Steps(log, "weights", 3 + (1 if task == SEQUENCE else 2) + per_layer * config.num_hidden_layers,
                 "tensors", every=25)
    relu2 = Relu2Scales(config, dtype)
    try:
        write_tensors(graph, writer, tensors, dtype, relu2, step)
    finally:
        step.close()
        writer.close()
    return save_model(graph, out_dir, writer, classifier_graph_section(config, dtype, task))
