"""A bare grpcio KServe v2 server that answers an identity model with no model machinery at all:
the baseline for measuring shardserve's per-request overhead (`bench_batching.py`).

`python -m benchmarks.bare_server --port 0` prints "bare ready: PORT" once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

MODEL = "identity"


def identity_config(dims: int) -> mc.ModelConfig:
    config = mc.ModelConfig(name=MODEL, backend="bare")
    config.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[dims])
    config.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[dims])
    return config


class BareIdentity(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just enough of the protocol for perf_analyzer; ModelInfer echoes INPUT0 as OUTPUT0."""

    def __init__(self, dims: int) -> None:
        self.config = identity_config(dims)
        self.count = 0

    async def ServerLive(self, request, context):  # noqa: N802 (protocol names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name == MODEL)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="bare", version="0")

    async def ModelMetadata(self, request, context):  # noqa: N802
        dims = list(self.config.input[0].dims)
        return pb.ModelMetadataResponse(
            name=MODEL, versions=["1"], platform="bare",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name="INPUT0", datatype="FP32",
                                                            shape=dims)],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name="OUTPUT0", datatype="FP32",
                                                             shape=dims)])

    async def ModelConfig(self, request, context):  # noqa: N802
        return pb.ModelConfigResponse(config=self.config)

    async def ModelStatistics(self, request, context):  # noqa: N802
        stats = pb.ModelStatistics(name=MODEL, version="1", inference_count=self.count,
                                   execution_count=self.count)
        return pb.ModelStatisticsResponse(model_stats=[stats])

    async def ModelInfer(self, request, context):  # noqa: N802
        self.count += 1
        tensor = request.inputs[0]
        out = pb.ModelInferResponse(model_name=MODEL, model_version="1", id=request.id)
        out.outputs.add(name="OUTPUT0", datatype=tensor.datatype, shape=tensor.shape)
        out.raw_output_contents.append(request.raw_input_contents[0])
        return out


async def serve(port: int, dims: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20),
                                      ("grpc.max_send_message_length", 64 * 2**20)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(BareIdentity(dims), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare ready: {bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dims", type=int, default=16)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
