"""Device and dtype discipline of the training and generation paths, checked on a CPU machine.

The CUDA half cannot run here, so the bugs a GPU run would hit first are caught by proxies:
- the ``meta`` device refuses to mix with CPU tensors much as CUDA does, so a training step with
  the model and batch on ``meta`` fails wherever a CPU table is indexed by device steps;
- the dtypes each fused op receives are recorded with a dispatch mode (below autocast), under
  CPU bf16 autocast and on the generation and validation paths.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moediffuseq.data import Seq2SeqDataset, TextTokenizer
from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.losses import diffusion_loss
from moediffuseq.generate import GenerationConfig, generate, generation_dtype
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.nn import MoEFeedForward
from moediffuseq.train import TrainConfig, Trainer

SMALL = dict(vocab_size=64, max_len=24, d_emb=16, d_model=32, n_layers=1, n_heads=2, window=4, num_experts=4,
             top_k=2, d_expert=32, d_ff=64, dropout=0.0, diffusion_steps=50)


class OpDtypes(TorchDispatchMode):
    """Records, per fused op, the dtypes of its floating tensor arguments (after autocast)."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, list[tuple]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "moediffuseq":
            dtypes = tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args)
            self.seen.setdefault(func._opname, []).append(dtypes)
        return func(*args, **kwargs)


def batch(cfg: MoEDiffuSeqConfig, B: int, device="cpu"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (B, cfg.max_len), generator=g)
    ids[:, 0] = 1
    target = torch.zeros(B, cfg.max_len, dtype=torch.bool)
    target[:, cfg.max_len // 2:] = True
    return ids.to(device), target.to(device)


def test_training_step_on_meta_device_mixes_no_cpu_tensor():
    """Model, batch and steps on ``meta``: any CPU table indexed by the steps raises here, as it
    would on CUDA (the schedule tables, the time steps, MoE statistics)."""
    for ffn, attention in (("moe", "sparse"), ("dense", "dense")):
        cfg = MoEDiffuSeqConfig(**SMALL, ffn=ffn, attention=attention)
        model = MoEDiffuSeq(cfg).to("meta")
        schedule = NoiseSchedule.create(cfg.schedule, cfg.diffusion_steps)
        ids, target = batch(cfg, 3, "meta")
        t = torch.tensor([0, 7, 49]).to("meta")
        terms = diffusion_loss(model, schedule, ids, target, t, weights=torch.ones(3, device="meta"))
        assert terms.loss.device.type == "meta" and terms.per_example.shape == (3,)
        terms.loss.backward()
        assert model.word_embedding.weight.grad is not None
        assert model.word_embedding.weight.grad.device.type == "meta"


def test_moe_statistics_on_meta_device():
    layer = MoEFeedForward(16, 32, 4, 2, capacity_factor=1.0).to("meta")
    y, aux = layer(torch.empty(10, 16, device="meta"))
    assert y.shape == (10, 16) and aux.expert_counts.shape == (4,) and aux.dropped.shape == ()


def test_moe_statistics_match_counting():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 32, 4, 2, capacity_factor=0.5)
    _, aux = layer(torch.randn(37, 16))
    assert int(aux.expert_counts.sum()) + int(aux.dropped) == 37 * 2
    assert aux.expert_counts.dtype == torch.int64 and aux.dropped.dtype == torch.int64
    assert int(aux.expert_counts.max()) <= -(-0.5 * 37 * 2 // 4)


def test_fused_ops_get_the_autocast_dtype_and_the_router_stays_fp32():
    """Under bf16 autocast: attention and the experts in bf16 (the kernels' fast path), the
    router logits and the routing weights in fp32."""
    cfg = MoEDiffuSeqConfig(**SMALL)
    torch.manual_seed(0)
    model = MoEDiffuSeq(cfg)
    ids, target = batch(cfg, 2)
    x = torch.randn(2, cfg.max_len, cfg.d_emb)
    with OpDtypes() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        x0_hat, aux = model(x, torch.tensor([3, 9]), model.positions(ids, target))
    (x0_hat.float().square().mean() + aux).backward()
    q, k, v = rec.seen["block_sparse_attention"][0][:3]
    assert (q, k, v) == (torch.bfloat16,) * 3
    assert rec.seen["moe_topk_softmax"][0][0] == torch.float32
    x_dtype, weights_dtype, _, w1_dtype, w2_dtype = rec.seen["moe_ffn"][0][:5]
    assert (x_dtype, w1_dtype, w2_dtype) == (torch.bfloat16,) * 3 and weights_dtype == torch.float32
    layer = model.layers[0].ffn
    assert layer.w1.grad is not None and layer.w1.grad.dtype == torch.float32  # the parameter stays fp32
    assert layer.router.weight.grad is not None


def test_router_logits_are_fp32_under_autocast():
    layer = MoEFeedForward(16, 32, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(torch.randn(5, 16))
    assert logits.dtype == torch.float32


def test_autocast_rules_keep_the_results_and_gradients():
    """The autocast kernels only cast: the result equals the op on pre-cast inputs."""
    from moediffuseq.ops import block_sparse_attention, moe_ffn, moe_topk_softmax

    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_sparse_attention(q, k, v, window=3)
    expected = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), window=3)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32

    logits = torch.randn(9, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx = moe_topk_softmax(logits, 2)
    w_ref, idx_ref = moe_topk_softmax(logits.float(), 2)
    assert torch.equal(w, w_ref) and torch.equal(idx, idx_ref)

    x, w1, w2 = torch.randn(9, 8), torch.randn(4, 8, 12), torch.randn(4, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_ffn(x, w_ref, idx_ref, w1, w2)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, moe_ffn(x.bfloat16(), w_ref, idx_ref, w1.bfloat16(), w2.bfloat16()))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu"] * 4
    return TextTokenizer.train(texts, vocab_size=60, kind="wordpiece")


def test_generation_dtype_policy():
    """bf16 on CUDA (the attention kernels run in bf16/fp16 only), fp32 on CPU; a request wins."""
    assert generation_dtype(torch.device("cuda"), None) == torch.bfloat16
    assert generation_dtype(torch.device("cuda", 1), None) == torch.bfloat16
    assert generation_dtype(torch.device("cpu"), None) == torch.float32
    assert generation_dtype(torch.device("cuda"), "fp16") == torch.float16
    assert generation_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert generation_dtype(torch.device("cuda"), "fp32") == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        generation_dtype(torch.device("cpu"), "int8")


def _generation_op_dtypes(model, tokenizer, cfg):
    with OpDtypes() as rec:
        outputs = generate(model, tokenizer, ["alpha beta", "iota kappa lambda"], cfg, target_len=8)
    assert len(outputs) == 2
    return rec.seen


def test_generate_runs_the_ops_in_the_generation_dtype(tokenizer, monkeypatch):
    cfg = MoEDiffuSeqConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    model = MoEDiffuSeq(cfg)
    seen = _generation_op_dtypes(model, tokenizer, GenerationConfig(dtype="bf16", batch_size=2))
    assert all(d[:3] == (torch.bfloat16,) * 3 for d in seen["block_sparse_attention"])
    assert all(d[0] == torch.bfloat16 for d in seen["moe_ffn"])
    # the default follows the model's device through generation_dtype (bf16 on a CUDA model)
    monkeypatch.setattr("moediffuseq.generate.generation_dtype",
                        lambda device, requested: torch.bfloat16 if requested is None else torch.float32)
    seen = _generation_op_dtypes(model, tokenizer, GenerationConfig(batch_size=2))
    assert all(d[:3] == (torch.bfloat16,) * 3 for d in seen["block_sparse_attention"])
    # fp32 on request, and nothing left of autocast afterwards
    seen = _generation_op_dtypes(model, tokenizer, GenerationConfig(dtype="fp32", batch_size=2))
    assert all(d[:3] == (torch.float32,) * 3 for d in seen["block_sparse_attention"])


def test_trainer_validation_runs_in_the_training_dtype(tokenizer, tmp_path):
    """A bf16 run validates (loss and BLEU sampling) with bf16 kernels, as it would on CUDA."""
    from moediffuseq.data.jsonl import Example

    cfg = MoEDiffuSeqConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    examples = [Example("alpha beta gamma", "gamma beta alpha"), Example("iota kappa", "kappa iota")] * 4
    data = Seq2SeqDataset(examples, tokenizer, cfg.max_len)
    train_cfg = TrainConfig(steps=1, batch_size=4, bf16=True, eval_batches=1, bleu_examples=2, progress=False)
    trainer = Trainer(MoEDiffuSeq(cfg), tokenizer, data, data, train_cfg, tmp_path / "run")
    with OpDtypes() as rec:
        trainer.validation_loss()
        trainer.validation_bleu()
    attention = rec.seen["block_sparse_attention"]
    assert len(attention) > cfg.n_layers and all(d[:3] == (torch.bfloat16,) * 3 for d in attention)


def test_trainer_on_cuda_refuses_fp32_sparse_attention_before_touching_the_gpu(tokenizer, tmp_path):
    from moediffuseq.data.jsonl import Example

    cfg = MoEDiffuSeqConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size})
    data = Seq2SeqDataset([Example("alpha beta", "beta alpha")] * 4, tokenizer, cfg.max_len)
    with pytest.raises(ValueError, match="run in bf16/fp16: train with bf16 autocast"):
        Trainer(MoEDiffuSeq(cfg), tokenizer, data, None, TrainConfig(steps=1, bf16=False), tmp_path, "cuda")


def test_cli_bf16_defaults_on_for_cuda_and_dtype_reaches_generation(tokenizer, monkeypatch, tmp_path):
    import moediffuseq.generate_files
    from moediffuseq.cli import build_parser, main, train_configs

    parser = build_parser()
    for argv, device, expected in ((["--data", "d", "--out", "o"], "cuda:0", True),
                                   (["--data", "d", "--out", "o"], "cpu", False),
                                   (["--data", "d", "--out", "o", "--no-bf16"], "cuda", False),
                                   (["--data", "d", "--out", "o", "--bf16"], "cpu", True)):
        args = parser.parse_args(["train", *argv])
        _, train_cfg = train_configs(args, tokenizer.vocab_size, tokenizer.special, device)
        assert train_cfg.bf16 is expected, (argv, device)

    seen = []
    monkeypatch.setattr(moediffuseq.generate_files, "generate_file", lambda *a, **k: seen.append(a[3]) or 0)
    main(["generate", "--model", "m", "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o.jsonl"),
          "--dtype", "bf16", "--device", "cpu"])
    assert seen[0].dtype == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--input", "i", "--output", "o", "--dtype", "int8"])


def test_moe_layer_compiles_as_one_graph():
    """Routing, the experts and the statistics trace as one graph, with and without capacity."""
    torch.manual_seed(0)
    for capacity_factor in (None, 1.0):
        layer = MoEFeedForward(16, 32, 4, 2, capacity_factor=capacity_factor)
        x = torch.randn(2, 9, 16)
        y, aux = torch.compile(layer, backend="eager", fullgraph=True)(x)
        y_ref, aux_ref = layer(x)
        assert torch.equal(y, y_ref) and torch.equal(aux.expert_counts, aux_ref.expert_counts)
        assert torch.equal(aux.loss, aux_ref.loss)
