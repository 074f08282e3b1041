"""codes.py: sign with straight-through gradient, bit packing, Hamming / cosine / masked cosine (DESIGN §2)."""

import numpy as np
import pytest
import torch

from brcd_dist.codes import (
    code_cosine,
    hamming_distance,
    masked_cosine,
    pack_codes,
    probs_and_codes,
    sign_ste,
    unpack_codes,
)


def random_codes(n, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, bits), generator=g).float() * 2 - 1


def test_sign_ste_forward_is_exactly_plus_minus_one_with_zero_to_plus_one():
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert sign_ste(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_sign_ste_gradient_is_identity_including_at_zero():
    x = torch.tensor([-2.0, 0.0, 0.5], requires_grad=True)
    w = torch.tensor([3.0, -5.0, 7.0])
    (sign_ste(x) * w).sum().backward()
    assert x.grad.tolist() == [3.0, -5.0, 7.0]


def test_probs_and_codes_gives_sigmoid_probabilities_and_codes_of_p_minus_half():
    logits = torch.tensor([[-3.0, 0.0, 2.0]], requires_grad=True)
    p, s = probs_and_codes(logits)
    assert torch.equal(p, torch.sigmoid(logits))
    assert s.tolist() == [[-1.0, 1.0, 1.0]]  # logit 0 -> p = 0.5 -> +1
    s.sum().backward()  # the STE gradient reaches the logits through σ: dσ/dx = p(1 − p)
    assert torch.allclose(logits.grad, (p * (1 - p)).detach())


@pytest.mark.parametrize("bits", [8, 24, 64])
def test_pack_unpack_round_trip(bits):
    codes = random_codes(5, bits)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (5, bits // 8)
    assert np.array_equal(unpack_codes(packed, bits), codes.numpy())
    assert np.array_equal(pack_codes(codes.numpy()), packed)  # numpy input, same bytes


def test_pack_puts_the_first_bit_in_the_most_significant_position():
    code = torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1, -1, -1, -1, -1]])
    assert pack_codes(code).tolist() == [[0b10000001, 0b01000000]]


def test_hamming_distance_matches_a_naive_count():
    a, b = random_codes(4, 32, seed=1), random_codes(6, 32, seed=2)
    naive = [[sum(int(x != y) for x, y in zip(ra.tolist(), rb.tolist())) for rb in b] for ra in a]
    d = hamming_distance(a, b)
    assert d.dtype == torch.int64 and d.tolist() == naive


def test_code_cosine_is_one_minus_twice_hamming_over_bits():
    a, b = random_codes(4, 32, seed=3), random_codes(5, 32, seed=4)
    assert torch.allclose(code_cosine(a, b), 1 - 2 * hamming_distance(a, b).float() / 32)


def test_masked_cosine_hand_value():
    a = torch.tensor([[1.0, 1, -1, 1]])
    b = torch.tensor([[1.0, -1, -1, -1], [1.0, 1, -1, 1]])
    mask = torch.tensor([[1.0, 0, 1, 1]])  # bits 0, 2, 3: products (1, 1, −1) and (1, 1, 1)
    assert torch.allclose(masked_cosine(a, b, mask), torch.tensor([[1 / 3, 1.0]]))


def test_masked_cosine_uses_each_rows_own_mask():
    a = torch.tensor([[1.0, 1], [1.0, 1]])
    b = torch.tensor([[1.0, -1]])
    mask = torch.tensor([[1.0, 0], [0.0, 1]])
    assert masked_cosine(a, b, mask).tolist() == [[1.0], [-1.0]]


def test_masked_cosine_refuses_an_empty_mask_row():
    with pytest.raises(ValueError, match="keeps no bit"):
        masked_cosine(torch.ones(2, 4), torch.ones(3, 4), torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]))
