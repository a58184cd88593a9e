"""Triton python-backend model: an exported denoiser graph run by ONNX Runtime.

Written into a model repository by bypass_kernels (``write_model_repository(..., backend="python")``)
for servers without Triton's onnxruntime backend. Needs numpy and onnxruntime (onnxruntime-gpu for
CUDA) in the python backend's environment. Triton's dynamic batcher hands over several requests at
once: they run as one batch, each with its own rows of ``bypass_schedule``.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        graph = os.path.join(args["model_repository"], args["model_version"], params.get("graph", "model.onnx"))
        wanted = params.get("providers", "CUDAExecutionProvider,CPUExecutionProvider").split(",")
        providers = [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if "intra_op_threads" in params:
            options.intra_op_num_threads = int(params["intra_op_threads"])
        self.session = ort.InferenceSession(graph, options, providers=providers)
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        feeds, groups = [], {}
        for index, request in enumerate(requests):
            feed = {}
            for name, rank in self.ranks.items():
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                array = tensor.as_numpy()
                feed[name] = array.reshape(-1) if rank == 1 else array  # [batch, 1] from clients: [batch]
            feeds.append(feed)
            # requests join only where every other dimension agrees (image size, text length)
            key = tuple((name, array.shape[1:]) for name, array in sorted(feed.items()))
            groups.setdefault(key, []).append(index)
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                joined = {name: np.concatenate([feeds[i][name] for i in members]) for name in self.ranks}
                results = self.session.run(self.outputs, joined)
            except Exception as exc:  # the clients get the reason; the model stays up
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            start = 0
            for i in members:
                rows = len(next(iter(feeds[i].values())))  # every input carries the request's batch first
                parts = [np.ascontiguousarray(result[start : start + rows]) for result in results]
                tensors = [pb_utils.Tensor(name, part) for name, part in zip(self.outputs, parts, strict=True)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses
