"""The compiled extension loads and reports how it was built."""
import torch

import moediffuseq


def test_build_info_fields():
    info = moediffuseq.build_info()
    assert info.cpu_isa in ("avx512_bf16", "avx512", "avx2", "default")
    assert isinstance(info.has_cuda, bool)
    assert info.torch_version == torch.__version__
    if info.has_cuda:
        assert info.cuda_archs and info.cutlass_version
    else:
        assert info.cuda_archs == () and info.cutlass_version == ""


def test_ops_registered_under_namespace():
    for name in ("block_sparse_attention", "block_sparse_attention_backward"):
        assert hasattr(torch.ops.moediffuseq, name), name
