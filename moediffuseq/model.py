"""The MoE-DiffuSeq denoiser (METHOD §2): embeddings, a transformer of block-sparse attention and
mixture-of-experts layers, and the soft absorbing vector m. The diffusion process, the loss and
the samplers live in moediffuseq/diffusion/: the loss calls the model (``forward``, the
denoiser), a sampler takes ``model.condition(input_ids, target_mask)``.

With ``source_isolation`` the source rows attend only to source keys and take no timestep
signal, so every layer's source states depend on the source alone; with a bounded target span
as well, ``condition(..., source_cache=True)`` runs the source through the layers once and
every denoising call only the span's rows, against the cached source keys and values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moediffuseq import fields
from moediffuseq.diffusion.samplers import Conditioning
from moediffuseq.diffusion.schedule import SCHEDULES
from moediffuseq.hub_download import resolve_model_dir
from moediffuseq.limits import MAX_VOCAB_SIZE, read_text
from moediffuseq.nn import BlockSparseSelfAttention, DenseFeedForward, KVCache, MoEFeedForward
from moediffuseq.ops.moe_ffn import ACTIVATIONS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# config.json records the format of the model directory and the library that wrote it; a format
# this library does not know (written by a newer moediffuseq) is refused with that said.
FORMAT_VERSION = 1
FORMAT_KEYS = ("format_version", "library_version")
MODEL_TYPE = "moediffuseq"  # config.json's "model_type", as Hugging Face model directories name theirs


# The largest value of every size field: far beyond any model this library trains, small enough
# that a hostile config.json or --set cannot make a table, a loop or an allocation explode
# before the memory check (moediffuseq.memory) sees the whole model.
CONFIG_MAXIMA = {"vocab_size": MAX_VOCAB_SIZE, "max_len": 1 << 20, "d_emb": 1 << 16, "d_model": 1 << 16,
                 "n_layers": 1024, "n_heads": 1024, "dilation": 1 << 20, "num_experts": 1024, "top_k": 1024,
                 "d_expert": 1 << 18, "d_ff": 1 << 18, "diffusion_steps": 100_000, "window": 1 << 20,
                 "global_target_max": 1 << 20}


@dataclass
class MoEDiffuSeqConfig:
    """Every hyper-parameter of the model and its diffusion process. METHOD's defaults."""

    vocab_size: int = 8192
    max_len: int = 512            # sequence length L, [CLS] src [SEP] trg [SEP] [PAD]...
    target_span: Optional[int] = None  # None: DiffuSeq's layout (every position after the source's [SEP]
    # is target); T: the last T positions are the target span, the source and its padding the rest
    source_isolation: bool = False  # source rows attend to source keys only, take no timestep, are never noised
    d_emb: int = 128              # word embedding width (the diffusion space)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    attention: str = "sparse"     # "sparse" (block-sparse) or "dense"
    window: int = 256
    dilation: int = 1
    global_target_max: int = 512  # the first min(|y|, this) target positions are global
    ffn: str = "moe"              # "moe" or "dense"
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 1536
    d_ff: int = 3072              # width of the dense feed-forward
    activation: str = "gelu"
    capacity_factor: Optional[float] = None
    dropout: float = 0.1
    pre_ln: bool = False
    soft_absorbing: bool = True   # learned m and absorbing replacement (DiffuSeq-v2)
    gamma: float = 0.5
    schedule: str = "sqrt"
    diffusion_steps: int = 2000
    mse_target_only: bool = False  # False: mean over all positions, as the reference code
    nll_target_only: bool = False  # False: the decoder nll over all positions (METHOD, the reference code)
    self_conditioning: bool = False  # the denoiser also sees its previous x0 estimate (trained at 50%)
    load_balance_weight: float = 0.01  # alpha of the MoE load-balancing loss (METHOD §4)
    z_loss_weight: float = 1e-3        # weight of the router z-loss (METHOD §4)
    m_weight: float = 0.01        # weight of ||m||_2 in the loss
    special_ids: tuple = (1, 2)   # token ids that are always global ([CLS], [SEP])
    pad_id: int = 0

    def __post_init__(self) -> None:
        """Every field is checked here (type and range), so a bad value from a config file or a
        ``--set`` is refused with its name before anything is built."""
        for name in ("vocab_size", "d_emb", "d_model", "n_layers", "n_heads", "dilation", "num_experts", "top_k",
                     "d_expert", "d_ff", "diffusion_steps"):
            fields.integer(name, getattr(self, name), 1, CONFIG_MAXIMA[name])
        fields.integer("max_len", self.max_len, 5, CONFIG_MAXIMA["max_len"])  # [CLS] src [SEP] trg [SEP]
        for name in ("window", "global_target_max"):
            fields.integer(name, getattr(self, name), 0, CONFIG_MAXIMA[name])
        fields.choice("attention", self.attention, ("sparse", "dense"))
        fields.choice("ffn", self.ffn, ("moe", "dense"))
        fields.choice("activation", self.activation, ACTIVATIONS)
        fields.choice("schedule", self.schedule, SCHEDULES)
        if self.target_span is not None:
            fields.integer("target_span", self.target_span, 2)
            if self.target_span > self.max_len - 3:
                raise fields.ConfigError("target_span", f"({self.target_span}) must be <= max_len - 3 = "
                                                        f"{self.max_len - 3}: [CLS], one source token and [SEP]")
        for name in ("pre_ln", "soft_absorbing", "mse_target_only", "nll_target_only",
                     "self_conditioning", "source_isolation"):
            fields.boolean(name, getattr(self, name))
        if self.capacity_factor is not None:
            fields.number("capacity_factor", self.capacity_factor, 0.0, above=True)
        fields.number("dropout", self.dropout, 0.0, 1.0, below=True)
        fields.number("gamma", self.gamma, 0.0, 1.0)
        fields.number("m_weight", self.m_weight, 0.0)
        fields.number("load_balance_weight", self.load_balance_weight, 0.0)
        fields.number("z_loss_weight", self.z_loss_weight, 0.0)
        if self.d_model % self.n_heads:
            raise fields.ConfigError("d_model", f"({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.source_isolation and self.ffn == "moe" and self.capacity_factor is not None:
            raise fields.ConfigError("source_isolation", "needs dropless experts (capacity_factor None): with a "
                                     "capacity the target's tokens would push source tokens out of an expert")
        if self.ffn == "moe" and self.top_k > self.num_experts:
            raise fields.ConfigError("top_k", f"({self.top_k}) must be <= num_experts ({self.num_experts})")
        fields.integer("pad_id", self.pad_id, 0)
        if self.pad_id >= self.vocab_size:
            raise fields.ConfigError("pad_id", f"({self.pad_id}) must be < vocab_size ({self.vocab_size})")
        if not isinstance(self.special_ids, (list, tuple)):
            raise fields.ConfigError("special_ids", f"must be a list of token ids, got {self.special_ids!r}")
        for token in self.special_ids:
            fields.integer("special_ids", token, 0)
            if token >= self.vocab_size:
                raise fields.ConfigError("special_ids", f"hold {token}, not < vocab_size ({self.vocab_size})")
        self.special_ids = tuple(self.special_ids)

    @classmethod
    def load(cls, directory: str | Path) -> "MoEDiffuSeqConfig":
        """The ``config.json`` of a model directory, checked."""
        directory = Path(directory)
        try:
            values = json.loads(read_text(directory / CONFIG_FILE, "model config"))
            if not isinstance(values, dict):
                raise TypeError(f"expected a JSON object, got {type(values).__name__}")
            model_type = values.pop("model_type", MODEL_TYPE)  # directories written before it was recorded
            if model_type != MODEL_TYPE:
                raise FormatError(f"{directory / CONFIG_FILE} is the config of a {model_type!r} model, not of a "
                                  f"MoE-DiffuSeq model (model_type {MODEL_TYPE!r})")
            written = {key: values.pop(key) for key in FORMAT_KEYS if key in values}
            if int(written.get("format_version", 1)) > FORMAT_VERSION:
                from moediffuseq import __version__

                raise FormatError(f"{directory / CONFIG_FILE} is in model format {written['format_version']}, "
                                  f"written by moediffuseq {written.get('library_version', '?')}; this moediffuseq "
                                  f"({__version__}) reads format {FORMAT_VERSION}: upgrade moediffuseq")
            return cls(**values)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}") from e
        except FormatError:
            raise
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{directory / CONFIG_FILE} is not a valid MoE-DiffuSeq config: {e}") from e

    @classmethod
    def preset(cls, name: str, **overrides) -> "MoEDiffuSeqConfig":
        """"tiny" (CPU demos and tests), "base" (12 x 768, E=8, k=2, expert width 1536) or
        "diffuseq" (the dense DiffuSeq baseline: dense attention, dense FFN 3072, no soft
        absorbing state), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        fields = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)


PRESETS = {
    "tiny": dict(max_len=128, d_emb=64, d_model=128, n_layers=2, n_heads=4, window=32, num_experts=4,
                 top_k=2, d_expert=128, d_ff=256, dropout=0.1),
    "base": dict(),
    "diffuseq": dict(attention="dense", ffn="dense", d_ff=3072, soft_absorbing=False, gamma=0.0),
}


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, refused with one line when it is a CUDA device this machine
    does not have (a CPU-only torch, no GPU, or fewer GPUs than its index)."""
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {str(device)!r}: CUDA is not available here ({build}, torch "
                             f"{torch.__version__}): use device='cpu' (or 'auto')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


class FormatError(ValueError):
    """A model directory in a format this version of moediffuseq does not read."""


@dataclass
class Positions:
    """What the layers need to know of a packed batch's positions (``MoEDiffuSeq.positions``)."""

    target_mask: Tensor                 # (B, L) bool, the span to generate
    global_mask: Optional[Tensor]       # (B, L) bool, the global tokens (None for dense attention)
    key_padding_mask: Optional[Tensor]  # (B, L) bool, the source's own padding (bounded span), else None
    source_lengths: Optional[Tensor]    # (B,) int64, the isolated source prefix (source_isolation), else None

    def prefix(self, length: int) -> "Positions":
        """The same positions cut to the first ``length`` (the source side of a bounded span)."""
        cut = (lambda m: None if m is None else m[:, :length])
        return Positions(self.target_mask[:, :length], cut(self.global_mask), cut(self.key_padding_mask),
                         None if self.source_lengths is None else self.source_lengths.clamp(max=length))


@dataclass
class SourceCache:
    """The source side of a bounded span, run through every layer once: each layer's keys and
    values of the positions [0, start), the span's rows written after them at every call."""

    layers: list[KVCache]
    start: int  # the first position of the target span


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of integer or real steps t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class DenoiserLayer(nn.Module):
    """Attention then feed-forward, each with a residual and LayerNorm (post-LN by default)."""

    def __init__(self, cfg: MoEDiffuSeqConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = BlockSparseSelfAttention(cfg.d_model, cfg.n_heads, window=cfg.window, dilation=cfg.dilation,
                                             dropout=cfg.dropout, kind=cfg.attention)
        if cfg.ffn == "moe":
            self.ffn = MoEFeedForward(cfg.d_model, cfg.d_expert, cfg.num_experts, cfg.top_k, cfg.activation,
                                      cfg.capacity_factor, cfg.load_balance_weight, cfg.z_loss_weight)
        else:
            self.ffn = DenseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor, positions: Positions, kv_cache: Optional[KVCache] = None,
                offset: int = 0) -> tuple[Tensor, Tensor]:
        """h (B, L, d_model) at the positions [offset, offset + L) of ``positions`` (the cached
        keys and values of the earlier ones in ``kv_cache``)."""
        def attend(x: Tensor) -> Tensor:
            return self.attn(x, positions.global_mask, positions.key_padding_mask,
                             source_lengths=positions.source_lengths, kv_cache=kv_cache, offset=offset)

        if self.pre_ln:
            h = h + attend(self.ln1(h))
            y, aux = self.ffn(self.ln2(h))
            return h + self.dropout(y), aux.loss
        h = self.ln1(h + attend(h))
        y, aux = self.ffn(h)
        return self.ln2(h + self.dropout(y)), aux.loss


class MoEDiffuSeq(nn.Module):
    """The denoiser: ``model(x_t, t, positions) -> (x0_hat, aux_loss)`` (METHOD §2)."""

    def __init__(self, config: MoEDiffuSeqConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.word_embedding = nn.Embedding(cfg.vocab_size, cfg.d_emb)
        nn.init.normal_(self.word_embedding.weight, std=1.0)  # unit-scale embeddings, as DiffuSeq
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # weight tied to the embedding
        self.input_up = nn.Sequential(nn.Linear(cfg.d_emb, cfg.d_model), nn.Tanh(),
                                      nn.Linear(cfg.d_model, cfg.d_model))
        if cfg.self_conditioning:  # the previous x0 estimate, added to the up-projected input
            self.self_cond_up = nn.Linear(cfg.d_emb, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.d_model)
        self.time_embed = nn.Sequential(nn.Linear(cfg.d_emb, 4 * cfg.d_emb), nn.SiLU(),
                                        nn.Linear(4 * cfg.d_emb, cfg.d_model))
        self.ln_in = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DenoiserLayer(cfg) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else nn.Identity()
        self.output_down = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.Tanh(),
                                         nn.Linear(cfg.d_model, cfg.d_emb))
        if cfg.soft_absorbing:  # the learned absorbing vector, N(0, 1/d_emb)
            self.m = nn.Parameter(torch.randn(cfg.d_emb) / math.sqrt(cfg.d_emb))
        else:
            self.register_buffer("m", torch.zeros(cfg.d_emb))

    def embed(self, ids: Tensor) -> Tensor:
        """Emb(w): (B, L) -> (B, L, d_emb)."""
        return self.word_embedding(ids)

    def logits(self, x: Tensor) -> Tensor:
        """lm_head(x) with the tied embedding: (..., d_emb) -> (..., V)."""
        return x @ self.word_embedding.weight.T + self.lm_head_bias

    def global_mask(self, src_ids: Tensor, target_mask: Tensor, target_len: Optional[Tensor] = None) -> Tensor:
        """(B, L) bool: the special tokens of the source, plus the first min(|y|, global_target_max)
        target positions (METHOD §3), whatever the padding after them. |y| is ``target_len`` (B,)
        when given (at generation: the target budget), else the target's tokens that are not
        padding (in training: the real target with its closing [SEP]); a row whose target holds
        only padding (generation without a budget) counts its whole span."""
        special = torch.zeros_like(target_mask)
        for token in self.config.special_ids:
            special |= (src_ids == token) & ~target_mask
        if target_len is None:
            real = (target_mask & (src_ids != self.config.pad_id)).sum(-1)  # (B,)
            target_len = torch.where(real > 0, real, target_mask.sum(-1))
        budget = target_len.to(target_mask.device).clamp(max=self.config.global_target_max)  # (B,)
        rank = target_mask.long().cumsum(-1)  # (B, L) 1-based position within the target span
        return special | (target_mask & (rank <= budget[:, None]))

    def positions(self, input_ids: Tensor, target_mask: Tensor, target_len: Optional[Tensor] = None) -> Positions:
        """The ``Positions`` of a packed batch ``input_ids`` (B, L) with its target span
        ``target_mask`` (B, L); ``target_len`` (B,) as in ``global_mask``."""
        cfg = self.config
        source = ~target_mask
        return Positions(
            target_mask,
            self.global_mask(input_ids, target_mask, target_len) if cfg.attention == "sparse" else None,
            source & (input_ids == cfg.pad_id) if cfg.target_span is not None else None,
            source.sum(-1) if cfg.source_isolation else None,
        )

    def forward(self, x_t: Tensor, t: Tensor, positions: Optional[Positions] = None,
                x0_self: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x0_hat (B, L, d_emb) from x_t (B, L, d_emb) at steps t (B,); and the summed MoE aux loss.
        ``positions``: ``self.positions(input_ids, target_mask)`` (None: no global tokens, no
        padding; refused with source isolation, which needs the target span). With
        ``config.self_conditioning``, ``x0_self`` (B, L, d_emb) is the previous x0 estimate (None:
        zeros, the first call); without, it must be None."""
        B, L, _ = x_t.shape
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.config.max_len}")
        if positions is None:
            if self.config.source_isolation:
                raise ValueError("a source-isolated model needs the positions of the batch (model.positions)")
            positions = Positions(torch.ones(B, L, dtype=torch.bool, device=x_t.device), None, None, None)
        target = positions.target_mask[..., None] if self.config.source_isolation else None  # (B, L, 1)
        h = self._hidden_in(x_t, t, x0_self, 0, target)
        return self._layers(h, positions, None, 0)

    def _hidden_in(self, x_t: Tensor, t: Optional[Tensor], x0_self: Optional[Tensor], start: int,
                   target: Optional[Tensor]) -> Tensor:
        """The first hidden states (B, L, H) of x_t (B, L, d_emb) at the positions [start, start + L):
        up-projection, self-conditioning and timestep (on the rows of ``target`` (B, L, 1) only,
        when given; none without ``t``: a source pass) and the position embedding."""
        L = x_t.shape[1]
        h = self.input_up(x_t)  # (B, L, H)
        if self.config.self_conditioning and t is not None:
            cond = self.self_cond_up(torch.zeros_like(x_t) if x0_self is None else x0_self.to(x_t.dtype))
            h = h + (cond if target is None else cond * target)
        elif x0_self is not None:
            raise ValueError("x0_self given to a model without self_conditioning")
        h = h + self.position_embedding.weight[start:start + L][None]
        if t is not None:
            time = self.time_embed(timestep_embedding(t, self.config.d_emb))[:, None]  # (B, 1, H)
            h = h + (time if target is None else time * target)
        return self.dropout(self.ln_in(h))

    def _layers(self, h: Tensor, positions: Positions, cache: Optional[SourceCache], offset: int
                ) -> tuple[Tensor, Tensor]:
        """Every layer over h (B, L, H) at the positions [offset, offset + L); x0_hat and the aux loss."""
        aux = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, layer_aux = layer(h, positions, None if cache is None else cache.layers[i], offset)
            aux = aux + layer_aux
        return self.output_down(self.ln_out(h)), aux

    def encode_source(self, input_ids: Tensor, positions: Positions) -> SourceCache:
        """Runs the source side [0, L - target_span) of a batch through every layer once and keeps
        each layer's keys and values (a source-isolated model with a bounded span only: its source
        states do not depend on the target or the step). ``denoise_span`` then runs the span."""
        cfg = self.config
        if not cfg.source_isolation or cfg.target_span is None:
            raise ValueError("a source cache needs a model with source_isolation and a target_span; this one has "
                             f"source_isolation={cfg.source_isolation}, target_span={cfg.target_span}")
        L = input_ids.shape[1]
        start = L - cfg.target_span
        cache = SourceCache([KVCache(L) for _ in self.layers], start)
        h = self._hidden_in(self.embed(input_ids[:, :start]), None, None, 0, None)
        source = positions.prefix(start)
        for layer, kv in zip(self.layers, cache.layers):
            h, _ = layer(h, source, kv, 0)
        return cache

    def denoise_span(self, x_t: Tensor, t: Tensor, positions: Positions, cache: SourceCache,
                     x0_self: Optional[Tensor] = None) -> Tensor:
        """x0_hat (B, T, d_emb) of the target span from its x_t (B, T, d_emb) at steps t (B,), the
        source read from ``cache`` (``encode_source``): the span's rows of ``forward``."""
        h = self._hidden_in(x_t, t, x0_self, cache.start, None)
        return self._layers(h, positions, cache, cache.start)[0]

    def condition(self, input_ids: Tensor, target_mask: Tensor, dtype: Optional[torch.dtype] = None,
                  target_len: Optional[Tensor] = None, source_cache: bool = False) -> Conditioning:
        """The batch ``input_ids`` (B, L) with its target span ``target_mask`` (B, L) bound to this
        model, ready for ``moediffuseq.diffusion.samplers.sample``: the embedded source as anchor,
        m, the word embedding, the logits head and ``denoise(x_t, t) -> x0_hat``, which calls the
        model with the batch's positions, under autocast in ``dtype`` when one other than fp32
        is given (the sampler's own state stays in the anchor's dtype). ``target_len`` (B,): the
        target budget that decides the global target positions (``global_mask``).

        ``source_cache`` (a source-isolated model with a bounded span): the source goes through
        the model once, here, and the sampler works on the span alone: the anchor, the target
        mask and x0 are (B, T, ...), the last T positions of the batch."""
        positions = self.positions(input_ids, target_mask, target_len)
        enabled = dtype is not None and dtype != torch.float32
        device_type = input_ids.device.type
        if source_cache:
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                cache = self.encode_source(input_ids, positions)
            span = input_ids[:, cache.start:]  # (B, T)

            def denoise_span(x_t: Tensor, t: Tensor, x0_self: Optional[Tensor] = None) -> Tensor:
                with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    return self.denoise_span(x_t, t, positions, cache, x0_self)

            return Conditioning(denoise_span, self.embed(span), target_mask[:, cache.start:], self.m,
                                self.word_embedding.weight, self.logits, self.config.self_conditioning,
                                self.config.target_span)

        def denoise(x_t: Tensor, t: Tensor, x0_self: Optional[Tensor] = None) -> Tensor:
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                return self(x_t, t, positions, x0_self)[0]

        return Conditioning(denoise, self.embed(input_ids), target_mask, self.m, self.word_embedding.weight,
                            self.logits, self.config.self_conditioning, self.config.target_span)

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (with ``model_type``, the format and library versions) + model.safetensors (no
        pickle)."""
        from moediffuseq import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config), "format_version": FORMAT_VERSION,
                  "library_version": __version__}
        (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        # safetensors creates the file private (0600); a model directory is shared like any other file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(directory / WEIGHTS_FILE, 0o666 & ~umask)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu", revision: Optional[str] = None
                        ) -> "MoEDiffuSeq":
        """Loads ``config.json`` + ``model.safetensors`` from a directory, or from a Hugging Face
        Hub id ("user/name", at ``revision``; moediffuseq.hub_download). The config is checked against
        the tensor shapes in the weights file's header before anything is allocated, and weights
        holding NaN or inf are refused."""
        check_device(map_location)
        directory = resolve_model_dir(directory, revision)
        config = MoEDiffuSeqConfig.load(directory)
        path = directory / WEIGHTS_FILE
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}") from e
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise ValueError(f"{path} is corrupt or not a safetensors file: {e}") from e
        _check_shapes(config, shapes, path)
        model = cls(config)
        try:
            state = load_file(str(path), device=map_location)
        except Exception as e:
            raise ValueError(f"{path} is corrupt or not a safetensors file: {e}") from e
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: tensor {name!r} holds NaN or inf values (weights of a diverged run?)")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # dtype or other mismatches not seen in the header
            raise ValueError(f"{path} does not match the config: {e}") from e
        return model


def _check_shapes(config: MoEDiffuSeqConfig, shapes: dict[str, tuple], path: Path) -> None:
    """The tensor names and shapes a model of ``config`` has, against a weights file's header,
    without allocating: the layer count first (a huge n_layers is refused before any module is
    built), then every shape on the meta device."""
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    in_file = max(layer_ids) + 1 if layer_ids else 0
    if in_file != config.n_layers:
        raise ValueError(f"{path} does not match the config: config.json says n_layers={config.n_layers} "
                         f"but the weights hold {in_file} layers")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoEDiffuSeq(config).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: {shapes[k]} in the file, {expected[k]} for the config" for k in sorted(expected)
             if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {unexpected[:5]}"] if unexpected else [])
        raise ValueError(f"{path} does not match the config: " + "; ".join(parts + wrong[:3]))

