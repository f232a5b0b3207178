"""Triton Inference Server model for classifier builds (Python backend, not decoupled).

Input `text_input` (UTF-8 strings, [batch, 1]); outputs `classification` (one JSON object per
text: `label`, `score`, `labels`, `scores` for sequence classification; `tokens`, a list of
{token_id, start, end, text, label, score, scores}, for token classification) and `batch_size`
(how many texts the model ran together in that execution). Triton's dynamic batcher gathers
concurrent requests into one `execute` call (config.pbtxt: max_batch_size = the build's
max_batch, dynamic_batching); every text of every request in it is classified together, in
batches of max_batch. A request with a bad text (not UTF-8, too long) gets its own error
response; the others in the execution are answered.
"""

from __future__ import annotations

import dataclasses
import json
import traceback

import numpy as np

from .classifier import Classifier
from .errors import PersimmonError
from .triton_model import log_to_triton, model_parameters, text_input, triton_error


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        _, build_dir = model_parameters(args)
        log_to_triton(pb_utils)
        self.classifier = Classifier.load(build_dir)
        pb_utils.Logger.log_info(f"persimmon classifier: {build_dir} ({self.classifier.manifest.task})")

    def execute(self, requests):
        checked = []  # per request: (texts, encoded) or the error line
        for request in requests:
            try:
                tensor = self.pb.get_input_tensor_by_name(request, "text_input")
                texts = [text_input([value]) for value in (tensor.as_numpy().reshape(-1) if tensor else [])]
                checked.append((texts, self.classifier.encode(texts)))
            except PersimmonError as e:
                checked.append(str(e))
        ready = [entry for entry in checked if not isinstance(entry, str)]
        batch = sum(len(texts) for texts, _ in ready)
        try:
            logits = iter(self.classifier.logits([ids for _, encoded in ready for ids, _ in encoded]))
        except Exception as e:  # one failure of the run answers every request in it
            if not isinstance(e, PersimmonError):
                self.pb.Logger.log_error(f"persimmon classifier: {traceback.format_exc()}")
            return [self._error(str(e), bad_input=False) for _ in requests]
        responses = []
        for entry in checked:
            if isinstance(entry, str):
                responses.append(self._error(entry))
                continue
            texts, encoded = entry
            results = self.classifier.interpret(texts, encoded, [next(logits) for _ in texts])
            responses.append(self._response(results, batch))
        return responses

    def _response(self, results: list, batch: int):
        documents = [json.dumps({"tokens": [dataclasses.asdict(t) for t in result]} if isinstance(result, list)
                                else dataclasses.asdict(result), ensure_ascii=False) for result in results]
        return self.pb.InferenceResponse([
            self.pb.Tensor("classification", np.array([[d.encode("utf-8")] for d in documents], dtype=object)),
            self.pb.Tensor("batch_size", np.full((len(results), 1), batch, np.int32))])

    def _error(self, message: str, bad_input: bool = True):
        """An error response; bad input is INVALID_ARG (HTTP 400) where the backend has error codes."""
        code = "INVALID_ARG" if bad_input else "INTERNAL"
        return self.pb.InferenceResponse(error=triton_error(self.pb, message, code))

    def finalize(self):
        self.classifier = None
