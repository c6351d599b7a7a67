"""Triton python model: OUTPUT0 is INPUT0 (FP16, any length)."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """FP16 identity."""

    def execute(self, requests: list) -> list:
        """Echo INPUT0 as OUTPUT0."""
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
