"""Triton python model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (FP32 [4], batched)."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Sum and difference of two FP32 tensors."""

    def execute(self, requests: list) -> list:
        """One response per request with the sum and difference."""
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            out0 = pb_utils.Tensor("OUTPUT0", (a + b).astype(a.dtype))
            out1 = pb_utils.Tensor("OUTPUT1", (a - b).astype(a.dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out0, out1]))
        return responses
