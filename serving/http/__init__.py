"""The HTTP fronts: Triton's KServe v2 REST API, its generate extension and an OpenAI API."""
