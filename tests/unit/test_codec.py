import pytest
import torch

from triptych.runtime.codec import ALIGN, aligned_bytes, all_finite, decode_tensor, encode_tensor
from triptych.serving import shm
from triptych.serving.errors import InvalidArgument


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64])
def test_round_trip_is_bit_identical(dtype):
    source = (torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    if dtype.is_floating_point:
        source.view(-1)[:3] = torch.tensor([-0.0, 1e-30, -7.25], dtype=dtype)
    message = encode_tensor(source)
    assert len(message.data) == source.numel() * source.element_size()
    back = decode_tensor(message, "x")
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back.view(torch.uint8), source.contiguous().view(torch.uint8))


def test_non_contiguous_and_empty_tensors():
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(decode_tensor(encode_tensor(source), "x"), source)
    assert decode_tensor(encode_tensor(torch.empty(0, 4)), "x").shape == (0, 4)


def test_byte_length_mismatch_names_the_field():
    message = encode_tensor(torch.ones(2, 2))
    message.data = message.data[:-1]
    with pytest.raises(InvalidArgument) as raised:
        decode_tensor(message, "positive.prompt_embeds")
    assert raised.value.violations[0][0] == "positive.prompt_embeds.data"


def test_unknown_dtype_and_non_finite_values_are_rejected():
    message = encode_tensor(torch.ones(2))
    message.dtype = 0
    with pytest.raises(InvalidArgument, match="dtype"):
        decode_tensor(message, "t")
    with pytest.raises(InvalidArgument, match="NaN"):
        decode_tensor(encode_tensor(torch.tensor([1.0, float("nan")])), "t")
    assert decode_tensor(encode_tensor(torch.tensor([float("inf")])), "t", allow_non_finite=True).isinf().all()


def test_decoded_tensors_start_on_a_64_byte_boundary_whatever_the_message_bytes():
    """MKL's sgemm sums some shapes in another order for operands that are not 64-byte aligned (e.g. a [2, 1280]
    input at a 4-byte offset, measured here), so every tensor from the wire is aligned like torch's own."""
    values = torch.arange(1280 * 2, dtype=torch.float32).reshape(2, 1280)
    raw = values.view(torch.uint8).reshape(-1)
    padded = torch.zeros(raw.numel() + 64, dtype=torch.uint8)
    for offset in range(0, 64, 4):
        padded[offset : offset + raw.numel()] = raw
        view = memoryview(padded.numpy())[offset : offset + raw.numel()]
        flat = aligned_bytes(view)
        assert flat.data_ptr() % ALIGN == 0
        assert (flat.data_ptr() == padded.data_ptr()) == (offset == 0), "a view when aligned, a copy otherwise"
        assert torch.equal(flat, raw)
    for size in range(1, 40):  # protobuf bytes objects start wherever the allocator puts them
        message = encode_tensor(torch.ones(size, 3))
        decoded = decode_tensor(message, "t")
        assert decoded.data_ptr() % ALIGN == 0 and torch.equal(decoded, torch.ones(size, 3))


def test_a_shared_memory_tensor_is_read_into_aligned_memory():
    region = shm.OwnedRegion(4096)
    try:
        values = torch.randn(5, 7)
        with shm.Writer(region.slice(64, 1024), "t") as writer:
            message = encode_tensor(values, into=writer)
        assert message.HasField("shared_memory")
        decoded = decode_tensor(message, "t")
        assert decoded.data_ptr() % ALIGN == 0 and torch.equal(decoded, values)
    finally:
        region.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_at_the_edges_of_each_dtype(dtype):
    big = torch.finfo(dtype).max
    # Many of the largest finite values: their sum overflows the dtype itself, but they are all finite.
    assert all_finite(torch.full((4096,), big, dtype=dtype))
    assert all_finite(torch.tensor([big, -big, torch.finfo(dtype).tiny], dtype=dtype))
    for bad in ([1.0, float("nan")], [float("inf")], [-float("inf"), 2.0], [float("inf"), -float("inf")]):
        assert not all_finite(torch.tensor(bad, dtype=dtype)), bad
    assert all_finite(torch.empty(0, dtype=dtype))
