import pytest
import torch

from triptych.core.codec import decode_tensor, encode_tensor
from triptych.core.errors import InvalidArgument


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
