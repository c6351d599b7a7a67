"""Compatibility shim: lets an existing Triton python-backend `model.py` that does
`import triton_python_backend_utils as pb_utils` run unchanged on shardserve."""

from serving.python_model import (
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_START,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    InferenceRequest,
    InferenceResponse,
    Logger,
    ResponseSender,
    Tensor,
    TritonError,
    TritonModelException,
    get_input_config_by_name,
    get_input_tensor_by_name,
    get_output_config_by_name,
    get_output_tensor_by_name,
    triton_string_to_numpy,
    using_decoupled_model_transaction_policy,
)
from serving.tensor_config import config_type_of as _config_type_of
from serving.tensor_config import numpy_dtype as _numpy_dtype

InferenceResponseSender = ResponseSender


def numpy_to_triton_type(data_type: type) -> str:
    """numpy.float32 -> "TYPE_FP32" (Triton's helper, without the TYPE_ prefix removed)."""
    return _config_type_of(data_type)


def triton_to_numpy_type(data_type: str) -> type:
    return _numpy_dtype(data_type).type


__all__ = [
    "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END", "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START",
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL", "InferenceRequest", "InferenceResponse",
    "InferenceResponseSender", "Logger", "ResponseSender", "Tensor", "TritonError",
    "TritonModelException", "get_input_config_by_name", "get_input_tensor_by_name",
    "get_output_config_by_name", "get_output_tensor_by_name", "numpy_to_triton_type",
    "triton_string_to_numpy", "triton_to_numpy_type", "using_decoupled_model_transaction_policy",
]
