"""Decoupled "llm-like" Triton python model: echoes the words of text_input, one response per word
(at most max_tokens words), then the final flag alone. Special texts: "fail" sends the word "fail",
then an error response with the final flag; "params" / "inputs" send one response with the request
parameters JSON / the received inputs as JSON; "" (no words) sends only the final flag."""
import json

import numpy as np

import triton_python_backend_utils as pb_utils


def _value(tensor: "pb_utils.Tensor") -> list:
    """A received tensor as a JSON-able list (bytes decoded)."""
    return [v.decode() if isinstance(v, bytes) else v.item() for v in tensor.as_numpy().reshape(-1)]


def _words(request: "pb_utils.InferenceRequest") -> list[str]:
    """The pieces to send for a request."""
    text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
    text = text.decode() if isinstance(text, bytes) else str(text)
    if text.strip() == "params":
        return [request.parameters()]
    if text.strip() == "inputs":
        return [json.dumps({t.name(): _value(t) for t in request.inputs()}, sort_keys=True)]
    words = text.split()
    mt = pb_utils.get_input_tensor_by_name(request, "max_tokens")
    if mt is not None:
        words = words[: int(mt.as_numpy().reshape(-1)[0])]
    return words


class TritonPythonModel:
    """Word-by-word echo over the response sender."""

    def execute(self, requests: list) -> None:
        """Send one text_output response per word, then the final flag."""
        for request in requests:
            sender = request.get_response_sender()
            words = _words(request)
            for w in words:
                out = pb_utils.Tensor("text_output", np.array([w.encode()], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            if words == ["fail"]:
                err = pb_utils.TritonError("model failed mid-stream")
                sender.send(pb_utils.InferenceResponse(error=err),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
