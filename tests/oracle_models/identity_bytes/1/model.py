"""Triton python model: OUTPUT0 is INPUT0 (BYTES, any length)."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """BYTES identity."""

    def execute(self, requests: list) -> list:
        """Echo INPUT0 as OUTPUT0."""
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", data)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
