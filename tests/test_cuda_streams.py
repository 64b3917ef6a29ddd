"""Every CUDA op runs on the caller's current stream: the same results on a side stream as on
the default one (a kernel launched on the wrong stream races with the work around it). The side
stream spins for about 50 ms (torch.cuda._sleep) before it makes each op's inputs, so a kernel
launched on the default stream instead runs before its inputs exist and reads garbage: the race
is forced, not left to timing."""
import torch

from moediffuseq.ops import (block_sparse_attention, denoise_step, moe_ffn, moe_topk_softmax, nearest_embedding,
                             soft_absorb_q_sample)
from utils import skip_unless_ready


def _run_all(seed: int, pause=lambda: None) -> list[torch.Tensor]:
    """Every op once; ``pause()`` runs before the inputs of each op are made."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16
    pause()
    q, k, v = (torch.randn(2, 2, 300, 64, device=dev, generator=g, dtype=bf16) for _ in range(3))
    glob = torch.rand(2, 300, device=dev, generator=g) < 0.05
    attn = block_sparse_attention(q, k, v, window=16, global_mask=glob)
    pause()
    logits = torch.randn(100, 8, device=dev, generator=g)
    weights, idx = moe_topk_softmax(logits, 2)
    pause()
    x = torch.randn(100, 64, device=dev, generator=g, dtype=bf16)
    w1 = torch.randn(8, 64, 128, device=dev, generator=g, dtype=bf16) / 8
    w2 = torch.randn(8, 128, 64, device=dev, generator=g, dtype=bf16) / 11
    y = moe_ffn(x, weights, idx, w1, w2)
    pause()
    x0 = torch.randn(2, 50, 16, device=dev, generator=g)
    m = torch.randn(16, device=dev, generator=g)
    target = torch.rand(2, 50, device=dev, generator=g) < 0.5
    coef = torch.rand(2, device=dev, generator=g)
    xt = soft_absorb_q_sample(x0, m, target, coef, (1 - coef**2).sqrt(), gamma=0.5,
                              noise=torch.randn(2, 50, 16, device=dev, generator=g),
                              uniform=torch.rand(2, 50, device=dev, generator=g))
    pause()
    step = denoise_step(xt, x0, x0, target, m, coef, 1 - coef)
    pause()
    nearest = nearest_embedding(x0.reshape(-1, 16), torch.randn(97, 16, device=dev, generator=g))
    return [attn, weights, idx, y, xt, step, nearest]


def test_ops_follow_the_current_stream():
    skip_unless_ready("cuda")
    expected = _run_all(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        # before each op's inputs: the side stream is busy, the default stream idle
        got = _run_all(0, pause=lambda: torch.cuda._sleep(_spin_cycles(0.05)))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def _spin_cycles(seconds: float) -> int:
    """GPU clock cycles of about ``seconds`` (the SM clock rate, or 2 GHz when torch does not say)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    rate_khz = getattr(props, "clock_rate", 0) or 2_000_000
    return int(seconds * rate_khz * 1e3)
