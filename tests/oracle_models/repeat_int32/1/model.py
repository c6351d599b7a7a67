"""Decoupled Triton python model: for IN = [n] sends n responses OUT = [i] (i = 0..n-1), then the
final flag alone; a negative n sends one response, then an error response."""
import numpy as np

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """N responses per request, then the final flag."""

    def execute(self, requests: list) -> None:
        """Stream n responses per request through its response sender."""
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            if n < 0:
                out = pb_utils.Tensor("OUT", np.array([0], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
                err = pb_utils.TritonError("negative count")
                sender.send(pb_utils.InferenceResponse(error=err),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for i in range(n):
                out = pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
