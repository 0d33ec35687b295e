"""Runware- and OpenAI-compatible HTTP API in front of a gateway (`triptych serve http`). Torch-free: it calls
ImageService.Generate over gRPC with the Python client, as any other caller does."""
