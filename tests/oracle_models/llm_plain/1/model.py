"""Non-decoupled "llm-like" Triton python model: text_output is the words of text_input (at most
max_tokens of them) joined by spaces, in one response. Special texts: "fail" answers an error,
"params" answers the request parameters JSON, "inputs" answers the received inputs as JSON."""
import json

import numpy as np

import triton_python_backend_utils as pb_utils


def _value(tensor: "pb_utils.Tensor") -> list:
    """A received tensor as a JSON-able list (bytes decoded)."""
    return [v.decode() if isinstance(v, bytes) else v.item() for v in tensor.as_numpy().reshape(-1)]


def _answer(request: "pb_utils.InferenceRequest") -> str | None:
    """The text to answer for a request, or None to fail."""
    text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
    text = text.decode() if isinstance(text, bytes) else str(text)
    if text.strip() == "fail":
        return None
    if text.strip() == "params":
        return request.parameters()
    if text.strip() == "inputs":
        return json.dumps({t.name(): _value(t) for t in request.inputs()}, sort_keys=True)
    words = text.split()
    mt = pb_utils.get_input_tensor_by_name(request, "max_tokens")
    if mt is not None:
        words = words[: int(mt.as_numpy().reshape(-1)[0])]
    return " ".join(words)


class TritonPythonModel:
    """Whole-text echo."""

    def execute(self, requests: list) -> list:
        """One response per request."""
        responses = []
        for request in requests:
            answer = _answer(request)
            if answer is None:
                err = pb_utils.TritonError("model failed")
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            out = pb_utils.Tensor("text_output", np.array([answer.encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
