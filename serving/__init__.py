"""The front on rank 0: KServe v2 / Triton gRPC protocol, model repository, backends."""
