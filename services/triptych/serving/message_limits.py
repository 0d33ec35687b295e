"""How big a request each method accepts: sized per method, not one limit for all (issue 15).

gRPC reads a request whole before any handler sees it, up to the server's receive limit: with 256 MiB for every
method, six 250 MB EncodeRequests took an encoder to 2.5 GB. The server's receive limit is now the largest that the
methods it serves need (an encoder's is kilobytes, since an EncodeRequest holds two prompts and some model ids), and
each method's own limit is checked before its request is parsed. Only the methods that carry tensors or images
(Denoise, Decode, Generate) accept `max_message_bytes`.
"""

from __future__ import annotations

from triptych.rules.limits import Limits

# Requests of every method not named below: health checks, List*, GetRuntimeInfo, reflection.
SMALL_REQUEST_BYTES = 64 * 1024
# Room for one model, LoRA or embedding id (a path inside the model store) in a request.
MODEL_ID_BYTES = 4096


def encode_request_bytes(limits: Limits) -> int:
    """The largest valid EncodeRequest, with room to spare: two prompts at max_prompt_chars (UTF-8, at most 4 bytes a
    character), the model's and each LoRA's and embedding's id, and 64 KiB for every other field."""
    ids = 1 + limits.max_loras + limits.max_embeddings
    return 2 * 4 * limits.max_prompt_chars + ids * MODEL_ID_BYTES + SMALL_REQUEST_BYTES


def request_limits(limits: Limits, max_message_bytes: int) -> dict[str, int]:
    """Bytes a request may have, by full method name; a method not named takes SMALL_REQUEST_BYTES."""
    return {
        "/triptych.v1.TextEncoderService/Encode": min(encode_request_bytes(limits), max_message_bytes),
        "/triptych.v1.DenoiserService/Denoise": max_message_bytes,
        "/triptych.v1.DecoderService/Decode": max_message_bytes,
        "/triptych.v1.ImageService/Generate": max_message_bytes,
    }


def request_limit(limits: dict[str, int], method: str) -> int:
    """The limit of one method (full name, `/package.Service/Method`)."""
    return limits.get(method, SMALL_REQUEST_BYTES)


def receive_limit(limits: dict[str, int], service_names: list[str]) -> int:
    """The server's receive limit: the largest request any method of `service_names` accepts."""
    served = [size for method, size in limits.items() if method.split("/")[1] in service_names]
    return max([SMALL_REQUEST_BYTES, *served])
