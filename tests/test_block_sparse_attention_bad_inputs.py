"""block_sparse_attention refuses bad input with a message that names it (every device, and
the CUDA-only rules on CUDA)."""
import pytest
import torch

from moediffuseq.ops import block_sparse_attention
from utils import make_inputs, skip_unless_ready


def _good():
    q, k, v, _, _, _ = make_inputs(2, 2, 16, 8, torch.float32, seed=11)
    return dict(q=q, k=k, v=v, window=2)


BAD_INPUTS = [
    ("q rank", lambda a: a.update(q=a["q"][0]), r"q must be \(B, H, L, D\)"),
    ("k shorter than q", lambda a: a.update(k=a["k"][:, :, :8]),
     r"k must be \(B, H_kv, L, D\) with L >= L_q = 16, the query rows of q"),
    ("k head dim", lambda a: a.update(k=a["k"][..., :4]), r"k must be \(B, H_kv, L, D\) with the B and D of q"),
    ("v shape", lambda a: a.update(v=a["v"][:1]), r"v must be \(B, H_kv, L, D\) with the B and D of q"),
    ("v heads differ from k", lambda a: a.update(v=a["v"][:, :1]), r"v must have the shape of k"),
    ("H_q not a multiple of H_kv", lambda a: a.update(q=torch.randn(2, 3, 16, 8)),
     r"the query heads H = 3 must be a multiple of the key/value heads H_kv = 2 \(grouped-query attention"),
    ("mismatched layouts: q blhd, k and v bhld",
     lambda a: a.update(q=a["q"].transpose(1, 2).contiguous(), layout="blhd"),
     r'k must be \(B, L, H_kv, D\) with L >= L_q = 16, the query rows of q \[2, 16, 2, 8\] \(layout "blhd"; '
     r"both tensors in the same layout"),
    ("blhd q rank", lambda a: a.update(q=a["q"][0], layout="blhd"), r"q must be \(B, L, H, D\)"),
    ("unknown layout", lambda a: a.update(layout="bshd"), r'layout must be "bhld"'),
    ("k dtype", lambda a: a.update(k=a["k"].double()), r"k must have the dtype of q"),
    ("float64", lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()),
     r"must be float32 or bfloat16"),
    ("float16", lambda a: a.update(q=a["q"].half(), k=a["k"].half(), v=a["v"].half()),
     r"must be float32 or bfloat16"),
    ("window", lambda a: a.update(window=-1), r"window must be >= 0"),
    ("dilation", lambda a: a.update(dilation=0), r"dilation must be >= 1"),
    ("global_mask shape", lambda a: a.update(global_mask=torch.zeros(2, 15, dtype=torch.bool)),
     r"global_mask must have shape \(B, L\)"),
    ("global_mask dtype", lambda a: a.update(global_mask=torch.zeros(2, 16)),
     r"global_mask must be a bool tensor"),
    ("key_padding_mask shape", lambda a: a.update(key_padding_mask=torch.zeros(16, dtype=torch.bool)),
     r"key_padding_mask must have shape \(B, L\)"),
    ("key_padding_mask dtype", lambda a: a.update(key_padding_mask=torch.zeros(2, 16, dtype=torch.int64)),
     r"key_padding_mask must be a bool tensor"),
    ("device", lambda a: a.update(k=a["k"].to("meta")), r"k must be on the device of q"),
    ("empty head dim", lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]),
     r"head dimension D must be positive"),
    ("not a tensor", lambda a: a.update(q=a["q"].tolist()), r"q must be a Tensor"),
    ("source_lengths dtype", lambda a: a.update(source_lengths=torch.tensor([3, 4], dtype=torch.int32)),
     r"source_lengths must be an int64 tensor of shape \(B,\) = \(2,\), got dtype Int"),
    ("source_lengths shape", lambda a: a.update(source_lengths=torch.tensor([[3, 4]])),
     r"source_lengths must be an int64 tensor of shape \(B,\) = \(2,\)"),
    ("source_lengths per batch", lambda a: a.update(source_lengths=torch.tensor([3, 4, 5])),
     r"source_lengths must be an int64 tensor of shape \(B,\) = \(2,\)"),
    ("source_lengths device", lambda a: a.update(source_lengths=torch.tensor([3, 4], device="meta")),
     r"source_lengths must be on the device of q"),
    ("source length negative", lambda a: a.update(source_lengths=torch.tensor([-1, 4])),
     r"source_lengths must lie in \[0, L\] = \[0, 16\] .*got values in \[-1, 4\]"),
    ("source length beyond L", lambda a: a.update(source_lengths=torch.tensor([3, 17])),
     r"source_lengths must lie in \[0, L\] = \[0, 16\] .*got values in \[3, 17\]"),
    ("negative query_offset", lambda a: a.update(q=a["q"][:, :, :4], query_offset=-1),
     r"query_offset must be >= 0, got -1"),
    ("query rows past the keys", lambda a: a.update(q=a["q"][:, :, :4], query_offset=13),
     r"query_offset \+ L_q must be <= L \(the key length\).*got query_offset = 13, L_q = 4, L = 16"),
    ("offset with all rows", lambda a: a.update(query_offset=1),
     r"query_offset \+ L_q must be <= L .*got query_offset = 1, L_q = 16, L = 16"),
    ("q heads differ from k in D", lambda a: a.update(q=torch.randn(2, 2, 4, 6), query_offset=2),
     r"k must be \(B, H_kv, L, D\) with the B and D of q"),
    ("q batch differs from k", lambda a: a.update(q=torch.randn(3, 2, 4, 8), query_offset=2),
     r"k must be \(B, H_kv, L, D\) with the B and D of q"),
    ("q heads not a multiple with an offset", lambda a: a.update(q=torch.randn(2, 3, 4, 8), query_offset=2),
     r"the query heads H = 3 must be a multiple of the key/value heads H_kv = 2"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_named(case, mutate, message):
    args = _good()
    mutate(args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


CUDA_BAD_INPUTS = [
    ("float32 on CUDA", lambda a: a.update(q=a["q"].float(), k=a["k"].float(), v=a["v"].float()),
     r"\(CUDA\): q is float32; the CUDA kernels run in bfloat16/float16: run under "
     r"torch\.autocast\('cuda', dtype=torch\.bfloat16\) or cast the model"),
    ("head dim 40 on CUDA", lambda a: a.update(q=a["q"][..., :40], k=a["k"][..., :40], v=a["v"][..., :40]),
     r"support head dimensions 64 and 128"),
    ("mask on CPU", lambda a: a.update(global_mask=torch.zeros(2, 16, dtype=torch.bool)),
     r"global_mask must be on the device of q"),
    ("source_lengths on CPU", lambda a: a.update(source_lengths=torch.tensor([3, 4])),
     r"source_lengths must be on the device of q"),
    ("source length beyond L on CUDA", lambda a: a.update(source_lengths=torch.tensor([3, 17], device="cuda")),
     r"source_lengths must lie in \[0, L\] = \[0, 16\]"),
]


@pytest.mark.parametrize("case,mutate,message", CUDA_BAD_INPUTS, ids=[c[0] for c in CUDA_BAD_INPUTS])
def test_bad_input_is_named_on_cuda(case, mutate, message):
    skip_unless_ready("cuda")
    q, k, v, _, _, _ = make_inputs(2, 2, 16, 64, torch.bfloat16, seed=11, device="cuda")
    args = dict(q=q, k=k, v=v, window=2)
    mutate(args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
