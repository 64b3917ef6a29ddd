"""nearest_embedding against a dense argmin: the chosen row, ties, shapes, errors, registration.

Every test runs on the CPU and, where a GPU and the CUDA kernels are present, on CUDA (float16
too there; the references run on the same device). Inputs are drawn on the CPU and moved.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moediffuseq.ops import nearest_embedding, nearest_embedding_ref
from utils import DEVICE_DTYPES, DEVICES, skip_unless_ready


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_embedding_matches_dense_argmin(device):
    skip_unless_ready(device)

    # V up to 9000: several vocabulary chunks on either device; N past a row block of either
    # (512 rows on the CPU, 4096 on CUDA)
    rows = st.integers(1, 700) if device == "cpu" else st.one_of(st.integers(1, 700), st.sampled_from([4097, 5000]))

    @given(N=rows, V=st.integers(1, 9000),
           d=st.sampled_from([1, 16, 33]), dtype=st.sampled_from(DEVICE_DTYPES[device]),
           seed=st.integers(0, 2**31 - 1))
    def matches(N, V, d, dtype, seed):
        check_nearest_embedding(N, V, d, dtype, seed, device)

    matches()


def check_nearest_embedding(N, V, d, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, d, generator=g).to(dtype)
    pick = torch.randint(0, V, (N,), generator=g)
    x = (emb[pick].float() + 0.01 * torch.randn(N, d, generator=g)).to(dtype)  # well-separated nearest rows
    x, emb = x.to(device), emb.to(device)
    got = nearest_embedding(x, emb)
    ref = nearest_embedding_ref(x, emb)
    sq = torch.cdist(x.double(), emb.double()).square()
    # the chosen row is at the minimum squared distance, up to the float32 rounding of
    # ||e||^2 - 2 x.e (which may then pick another row at the same distance)
    scale = 1 + x.double().square().sum(-1, keepdim=True) + emb.double().square().sum(-1).max()
    assert (sq.gather(1, got[:, None]) - sq.gather(1, ref[:, None]) <= 1e-6 * scale).all()


def test_nearest_embedding_ties_and_shape(device):
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], device=device)
    x = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]], device=device)
    assert nearest_embedding(x, emb).tolist() == [[0, 0]]
    with pytest.raises(RuntimeError, match="x contains NaN"):
        nearest_embedding(torch.tensor([[float("nan"), 0.0]], device=device), emb)
    with pytest.raises(RuntimeError, match=r"emb must be \(V, d\) with d = 3, got shape \[3, 2\]"):
        nearest_embedding(torch.randn(4, 3, device=device), emb)


def test_nearest_embedding_ties_across_vocabulary_chunks(device):
    """An equal row in a later chunk (past 8192 rows) never replaces the first one."""
    emb = torch.randn(9000, 4, generator=torch.Generator().manual_seed(0)).to(device)
    emb[8500] = emb[3]
    assert nearest_embedding(emb[3:4].clone(), emb).tolist() == [3]


def test_nearest_embedding_opcheck(device):
    args = (torch.randn(37, 8, device=device), torch.randn(50, 8, device=device))
    torch.library.opcheck(torch.ops.moediffuseq.nearest_embedding.default, args)


def test_nearest_embedding_with_zero_width_is_a_clear_error():
    with pytest.raises(RuntimeError, match="embedding width d must be >= 1"):
        nearest_embedding(torch.randn(3, 0), torch.randn(5, 0))
    with pytest.raises(RuntimeError, match=r"emb must be \(V, d\)"):
        nearest_embedding(torch.randn(3, 2), torch.randn(2))
