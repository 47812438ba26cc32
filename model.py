"""FLASH video U-Net: SD-1.5 U-Net + AnimateDiff motion modules + FLASH cross-frame attention.

FLASH (arXiv 2503.00276) Sec. 3.1 / A3.2: spatial self-attention (attn1) takes keys and values from the first
and the current frame; Sec. 3.2: hooks for the Motion Alignment Module (`align_tau` on motion modules, `share_qk`
on attn1). Architecture as diffusers' UNet2DConditionModel (SD-1.5) and AnimateDiff's motion_module.py
(guoyww/AnimateDiff): module names equal checkpoint keys, so weights load with a short renaming rule.
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_heads: int = 8  # SD's config calls this "attention_head_dim"; it is the number of heads
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    down_attention: tuple = (True, True, True, False)  # CrossAttnDownBlock2D x3, DownBlock2D (up blocks mirror it)
    motion_modules: bool = True  # AnimateDiff temporal transformers after every resnet(+attention)
    motion_mid_block: bool = True  # v2 has a mid-block motion module; v1/v3 do not
    motion_max_len: int = 32  # positional-encoding length: 24 (v1) or 32 (v2, v3)
    motion_heads: int = 8
    motion_window: tuple = ()  # per down block (up blocks mirror, mid = last): k x k neighbourhood of the temporal
    # attention's keys; () or 1 = AnimateDiff (frames at one position). Not in AnimateDiff; the toy's switch
    frame_pooled_norm: bool = False  # v1: resnet GroupNorm statistics pooled over all frames
    cross_frame: bool = True  # FLASH attn1: k, v = [first frame ; current frame] tokens


# ----------------------------------------------------------------------------- building blocks

def attention(q, k, v, causal=False, chunk=0):
    """The one attention entry point (U-Net, motion modules, VAE, detail decoder, CLIP): softmax(q k^T / sqrt(hs)) v
    over q, k, v (..., L, hs) through PyTorch's SDPA, which picks the flash / memory-efficient kernels on a GPU.
    chunk > 0 (not with causal): the queries in slices of `chunk` rows, one SDPA call each, so at most chunk x L_k
    scores per head exist at once whichever kernel SDPA picks (its math fallback materialises them, the fused
    kernels never do); the result is the same up to float rounding.
    Meta tensors (memory.py's estimate) have no kernel choice and SDPA would take its math path with L x L scores:
    they run the memory-efficient kernel's op instead, whose meta version allocates what the GPU's does (O(L))."""
    if q.is_meta:  # the one estimate hook
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, torch.is_grad_enabled(),
                                                                      is_causal=causal)[0]
    if causal or chunk <= 0 or q.shape[-2] <= chunk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(chunk, dim=-2)], dim=-2)


def maybe_checkpoint(on, module, *args):
    """module(*args); with `on` (gradient checkpointing, while training) its activations are recomputed in backward
    instead of kept. The U-Net's and the VAE decoder's switch."""
    if on and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def group_norm(norm, x, frames, pooled):
    """GroupNorm per frame, or with statistics pooled over the frames of each video (AnimateDiff v1)."""
    if not pooled:
        return norm(x)
    bf, c, h, w = x.shape
    x = x.view(bf // frames, frames, c, h, w).transpose(1, 2)  # B C F H W
    return norm(x).transpose(1, 2).reshape(bf, c, h, w)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, temb_dim, groups, pooled=False):
        super().__init__()
        self.pooled = pooled
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb, frames):
        h = self.conv1(F.silu(group_norm(self.norm1, x, frames, self.pooled)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(group_norm(self.norm2, h, frames, self.pooled)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention (SDPA). attn1 of the spatial transformers is FLASH's cross-frame attention."""

    def __init__(self, dim, heads, context_dim=None, cross_frame=False):
        super().__init__()
        self.heads, self.cross_frame, self.share_qk = heads, cross_frame, False
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, frames=1):
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        if self.cross_frame and frames > 1:
            k, v = first_frame_kv(k, frames), first_frame_kv(v, frames)
        if self.share_qk:  # FLASH correspondence alignment: augmented half uses the original half's Q and K
            n = q.shape[0] // 2
            q, k = torch.cat([q[:n], q[:n]]), torch.cat([k[:n], k[:n]])
        return self.attend(q, k, v)

    def attend(self, q, k, v):
        n, L, c = q.shape
        q, k, v = (a.view(n, -1, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))  # N nh L hs
        out = attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(n, L, c))


def first_frame_kv(k, frames):
    """(B F) N C -> (B F) 2N C: each frame's keys are the first frame's tokens followed by its own."""
    bf, n, c = k.shape
    k = k.view(bf // frames, frames, n, c)
    return torch.cat([k[:, :1].expand(-1, frames, -1, -1), k], dim=2).view(bf, 2 * n, c)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, cross_frame):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, cross_frame=cross_frame)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, frames):
        x = self.attn1(self.norm1(x), frames=frames) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """SD spatial transformer: GN -> 1x1 conv -> tokens -> block -> 1x1 conv, residual."""

    def __init__(self, dim, heads, context_dim, groups, cross_frame):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, context_dim, cross_frame)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context, frames):
        bf, c, h, w = x.shape
        r = x
        x = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bf, h * w, c)  # (B F) (H W) C
        x = self.transformer_blocks[0](x, context, frames)
        return self.proj_out(x.view(bf, h, w, c).permute(0, 3, 1, 2).contiguous()) + r  # NCHW again: no layout mix


# ----------------------------------------------------------------------------- AnimateDiff motion module

def sinusoid_pe(length, dim):
    """AnimateDiff PositionalEncoding: interleaved sin (even channels) / cos (odd channels)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim, max_len):
        super().__init__()
        self.register_buffer("pe", sinusoid_pe(max_len, dim), persistent=False)  # regenerated, never loaded


class TemporalAttention(Attention):
    """VersatileAttention: self-attention over frames; the PE is added to the normed input (q, k and v see it).
    window k > 1 (UNetConfig.motion_window; not AnimateDiff, no extra weights): each position's frames attend to the
    frames of its k x k neighbourhood, every neighbour's offset marked by a fixed sinusoid (positions after the
    temporal PE's), so a moving object's evidence in other frames reaches it directly (docs/demo.md)."""

    def __init__(self, dim, heads, max_len, window=1):
        super().__init__(dim, heads)
        self.pos_encoder = PositionalEncoding(dim, max_len)
        self.window = window
        if window > 1:
            self.register_buffer("offset_pe", sinusoid_pe(max_len + window ** 2, dim)[0, max_len:, None],
                                 persistent=False)  # k*k 1 C

    def forward(self, x, hw=None):  # x: (B H W) F C
        x = x + self.pos_encoder.pe[:, : x.shape[1]].to(x.dtype)
        if self.window == 1:
            return super().forward(x)
        f, off = x.shape[1], self.offset_pe.to(x.dtype)  # the gather after the (linear) projections: k*k x cheaper
        k, v = (neighbourhood(p(x), *hw, self.window) + p(off).repeat(1, f, 1).flatten(0, 1)
                for p in (self.to_k, self.to_v))
        return self.attend(self.to_q(x), k, v)


def neighbourhood(x, h, w, k):
    """(B H W) F C -> (B H W) (k*k F) C: every position's tokens of the k x k positions around it (edges replicated)"""
    bhw, f, c = x.shape
    b, r = bhw // (h * w), k // 2
    x = x.view(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, h, w)  # (B F) C H W
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = torch.stack([x[..., i:i + h, j:j + w] for i in range(k) for j in range(k)], 1)  # (B F) K C H W
    return x.view(b, f, k * k, c, h, w).permute(0, 4, 5, 2, 1, 3).reshape(bhw, k * k * f, c)  # (B H W) (K F) C


class TemporalBlock(nn.Module):
    def __init__(self, dim, heads, max_len, window=1):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len, window) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x, hw=None):
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), hw) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, dim, heads, groups, max_len, window=1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)  # per frame, as AnimateDiff (diffusers pools frames)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(dim, heads, max_len, window)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, frames):
        bf, c, h, w = x.shape
        b = bf // frames
        r = x
        x = self.norm(x).view(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)  # (B H W) F C
        x = self.proj_out(self.transformer_blocks[0](self.proj_in(x), (h, w)))
        x = x.view(b, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)  # (B F) C H W
        return x + r


class MotionModule(nn.Module):
    """AnimateDiff VanillaTemporalModule, plus FLASH's motion feature alignment on its output when training."""

    def __init__(self, dim, heads, groups, max_len, window=1):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(dim, heads, groups, max_len, window)
        self.align_tau = None  # set by train.py: percentile tau of FLASH motion feature alignment, None = off
        self.skip = None  # set by sample.motion_skipped: (B,) bool, True = that clip passes through (STG's weak model)

    def forward(self, x, frames):
        y = self.temporal_transformer(x, frames)
        y = y if self.align_tau is None else motion_align(y, frames, self.align_tau)
        return y if self.skip is None else torch.where(self.skip.repeat_interleave(frames).view(-1, 1, 1, 1), x, y)


def motion_align(x, frames, tau=90.0, eps=1e-5):
    """FLASH Sec. 3.2, Eq. 2. Batch = [original clips ; augmented clips]. Normalise each clip's features over
    frames; in the augmented clips, the channels whose temporal std (averaged over h, w) of the ORIGINAL clip lies
    in the top (100 - tau) % take the original's normalised features; de-normalise with the augmented statistics."""
    bf, c, h, w = x.shape
    v = x.view(2, bf // frames // 2, frames, c, h, w)  # ori|aug, B, F, C, H, W
    mu = v.mean(2, keepdim=True)
    sd = (v.var(2, unbiased=False, keepdim=True) + eps).sqrt()
    norm = (v - mu) / sd
    k = max(1, round(c * (100 - tau) / 100))
    top = sd[0].mean((-1, -2)).squeeze(1).topk(k, dim=-1).indices  # (B, k) motion channels of the original
    mask = torch.zeros(top.shape[0], c, dtype=torch.bool, device=x.device).scatter_(1, top, True)
    aug = torch.where(mask[:, None, :, None, None], norm[0], norm[1]) * sd[1] + mu[1]
    return torch.cat([v[0], aug]).view(bf, c, h, w)


# ----------------------------------------------------------------------------- U-Net

def timestep_embedding(t, dim):
    """Sinusoidal embedding as diffusers with flip_sin_to_cos=True, freq_shift=0: [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """forward(x (B,4,F,H,W), t (B,) or scalar, context (B,77,768)) -> predicted noise (B,4,F,H,W).
    unet.gradient_checkpointing = True recomputes every resnet, transformer and motion module in backward."""

    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        self.gradient_checkpointing = False
        ch, L, g, heads = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups, cfg.attention_heads
        temb = 4 * ch[0]
        self.info = {}  # filled by load_unet: formats and motion-module version
        res = lambda cin, cout: ResnetBlock(cin, cout, temb, g, cfg.frame_pooled_norm)
        attn = lambda c: Transformer2D(c, heads, cfg.cross_attention_dim, g, cfg.cross_frame)
        mm = lambda c, k: MotionModule(c, cfg.motion_heads, g, cfg.motion_max_len, k)
        win = cfg.motion_window or (1,) * len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            blk, last = nn.Module(), i == len(ch) - 1
            blk.resnets = nn.ModuleList([res(ch[max(i - 1, 0)] if j == 0 else c, c) for j in range(L)])
            if cfg.down_attention[i]:
                blk.attentions = nn.ModuleList([attn(c) for _ in range(L)])
            if cfg.motion_modules:
                blk.motion_modules = nn.ModuleList([mm(c, win[i]) for _ in range(L)])
            if not last:
                blk.downsamplers = nn.ModuleList([Downsample(c)])
            self.down_blocks.append(blk)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])])
        self.mid_block.attentions = nn.ModuleList([attn(ch[-1])])
        if cfg.motion_modules and cfg.motion_mid_block:
            self.mid_block.motion_modules = nn.ModuleList([mm(ch[-1], win[-1])])
        self.up_blocks = nn.ModuleList()
        rch, rattn = ch[::-1], cfg.down_attention[::-1]
        for i, c in enumerate(rch):
            blk, last = nn.Module(), i == len(ch) - 1
            prev, skip_in = rch[max(i - 1, 0)], rch[min(i + 1, len(ch) - 1)]
            blk.resnets = nn.ModuleList(
                [res((prev if j == 0 else c) + (skip_in if j == L else c), c) for j in range(L + 1)])
            if rattn[i]:
                blk.attentions = nn.ModuleList([attn(c) for _ in range(L + 1)])
            if cfg.motion_modules:
                blk.motion_modules = nn.ModuleList([mm(c, win[::-1][i]) for _ in range(L + 1)])
            if not last:
                blk.upsamplers = nn.ModuleList([Upsample(c)])
            self.up_blocks.append(blk)
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _layer(self, blk, j, x, temb, ctx, frames):
        """resnet j of a block, then its spatial transformer and motion module when present."""
        x = self._call(blk.resnets[j], x, temb, frames)
        if hasattr(blk, "attentions"):
            x = self._call(blk.attentions[j], x, ctx, frames)
        if hasattr(blk, "motion_modules"):
            x = self._call(blk.motion_modules[j], x, frames)
        return x

    def _call(self, module, *args):
        return maybe_checkpoint(self.gradient_checkpointing and self.training, module, *args)

    def forward(self, x, t, context):
        b, _, frames, h, w = x.shape
        if self.config.motion_modules and frames > self.config.motion_max_len:
            raise ValueError(f"{frames} frames requested but the motion module's positional encoding holds "
                             f"{self.config.motion_max_len}; use --frames {self.config.motion_max_len} or fewer")
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(dtype))
        temb = temb.repeat_interleave(frames, 0)
        ctx = context.to(dtype).repeat_interleave(frames, 0)
        x = x.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * frames, -1, h, w)  # B C F H W -> (B F) C H W
        x = self.conv_in(x)
        skips = [x]
        for blk in self.down_blocks:
            for j in range(len(blk.resnets)):
                x = self._layer(blk, j, x, temb, ctx, frames)
                skips.append(x)
            if hasattr(blk, "downsamplers"):
                x = blk.downsamplers[0](x)
                skips.append(x)
        mid = self.mid_block
        x = self._call(mid.resnets[0], x, temb, frames)
        x = self._call(mid.attentions[0], x, ctx, frames)
        if hasattr(mid, "motion_modules"):
            x = self._call(mid.motion_modules[0], x, frames)
        x = self._call(mid.resnets[1], x, temb, frames)
        for blk in self.up_blocks:
            for j in range(len(blk.resnets)):
                x = self._layer(blk, j, torch.cat([x, skips.pop()], dim=1), temb, ctx, frames)
            if hasattr(blk, "upsamplers"):
                x = blk.upsamplers[0](x, skips[-1].shape[-2:])
        x = F.silu(group_norm(self.conv_norm_out, x, frames, self.config.frame_pooled_norm))
        x = self.conv_out(x)
        return x.view(b, frames, -1, h, w).permute(0, 2, 1, 3, 4)  # (B F) C H W -> B C F H W


# ----------------------------------------------------------------------------- dtypes, checkpoint loading

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the one map from flag to dtype


def autocast_dtype(name, device):
    """--dtype value (None/"auto" = bf16 on a CUDA GPU that has it, else fp16; fp32 on CPU) -> torch dtype"""
    if name not in (None, "auto"):
        return DTYPES[name] if isinstance(name, str) else name
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def read_json(path):
    """A JSON file (config.json, settings.json, vocab.json) -> dict; a corrupt one is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: want a JSON object, found {type(out).__name__}")
    return out


def load_state_dict_file(path):
    """Tensors from .safetensors (preferred) or .ckpt/.pt/.bin via torch.load(weights_only=True). A truncated or
    corrupt file (an interrupted download) and a pickle that would run code are errors naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # safetensors' own error type: a short header, a cut-off file, not safetensors at all
            raise ValueError(f"{path}: not a readable .safetensors file, truncated or corrupt (an interrupted "
                             f"download?): {str(e).splitlines()[0][:120]}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt (an interrupted download?): "
                             f"{msg}") from None
        raise ValueError(f"{path}: refused: it pickles Python objects, and torch.load(weights_only=True) runs none "
                         f"({msg}). If you trust this file, convert it once to safetensors: "
                         f"python -c \"import torch,safetensors.torch as s; d=torch.load('{path}',weights_only=False)"
                         f"; d=d.get('state_dict',d); s.save_file({{k:v.contiguous() for k,v in d.items() "
                         f"if torch.is_tensor(v)}}, 'converted.safetensors')\"") from None
    for key in ("state_dict", "model", "module"):  # wrappers: Lightning's; DeiT/VideoMAE-style training checkpoints'
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a dict of weights")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def load_checked(module, sd, what, keys=None):
    """Copy sd into module: every expected key (default: all of module's) must be present with its shape, and
    sd must hold nothing else. Errors name the offending keys."""
    own = module.state_dict()
    keys = set(own) if keys is None else set(keys)
    missing, unexpected = sorted(keys - set(sd)), sorted((set(sd) - keys) | (set(sd) - set(own)))
    keys -= set(unexpected)
    shapes = [f"{k} {tuple(sd[k].shape)} != expected {tuple(own[k].shape)}" for k in sorted(keys & set(sd))
              if sd[k].shape != own[k].shape]
    errs = [f"{n} {name} key(s): {', '.join(ks[:6])}{' ...' if len(ks) > 6 else ''}" for name, ks, n in
            (("missing", missing, len(missing)), ("unexpected", unexpected, len(unexpected)),
             ("mis-shaped", shapes, len(shapes))) if ks]
    if errs:
        raise ValueError(f"{what}: " + "; ".join(errs))
    module.load_state_dict({k: sd[k] for k in keys}, strict=False)


RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
LDM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "out.0": "conv_norm_out", "out.2": "conv_out", "middle_block.0": "mid_block.resnets.0",
           "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1"}


def ldm_to_diffusers_unet(sd, layers_per_block=2):
    """Rename CompVis/LDM single-file U-Net keys (model.diffusion_model.*) to diffusers names; other keys
    (VAE, text encoder, EMA copies, DDPM buffers) are dropped."""
    n, out, prefix = layers_per_block + 1, {}, "model.diffusion_model."
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        m = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.*)", k)
        if m:
            kind, idx, sub, rest = m[1], int(m[2]), int(m[3]), m[4]
            i, j = divmod(idx - 1 if kind == "input" else idx, n)
            if kind == "input" and idx == 0:
                k = f"conv_in.{rest}"
            elif kind == "input" and j == n - 1:  # input_blocks.{3,6,9}.0.op
                k = f"down_blocks.{i}.downsamplers.0.conv.{rest[len('op.'):]}"
            elif kind == "output" and rest.startswith("conv."):  # output_blocks.{2,5,8}.{1,2}.conv
                k = f"up_blocks.{i}.upsamplers.0.{rest}"
            else:
                k = f"{'down' if kind == 'input' else 'up'}_blocks.{i}.{['resnets', 'attentions'][sub]}.{j}.{rest}"
        else:
            head = ".".join(k.split(".")[:2])
            k = LDM_TOP.get(head, head) + k[len(head):]
        if ".resnets." in k:
            for a, b in RESNET_LDM.items():
                k = k.replace(f".{a}.", f".{b}.")
        out[k] = v
    return out


MOTION_DIFFUSERS = [(".transformer_blocks.0.norm1.", ".transformer_blocks.0.norms.0."),
                    (".transformer_blocks.0.norm2.", ".transformer_blocks.0.norms.1."),
                    (".transformer_blocks.0.norm3.", ".transformer_blocks.0.ff_norm."),
                    (".transformer_blocks.0.attn1.", ".transformer_blocks.0.attention_blocks.0."),
                    (".transformer_blocks.0.attn2.", ".transformer_blocks.0.attention_blocks.1.")]


def read_motion_module(path):
    """AnimateDiff motion module (original or diffusers MotionAdapter layout, file or folder) ->
    (state dict in AnimateDiff names without `pe`, config overrides, info)."""
    path = str(path)
    adapter_cfg = {}
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            adapter_cfg = read_json(os.path.join(path, "config.json"))
        files = [os.path.join(path, f) for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise FileNotFoundError(f"{path}: no diffusion_pytorch_model.safetensors/.bin in motion-module folder")
        path = files[0]
    sd = {k: v for k, v in load_state_dict_file(path).items() if "motion_modules." in k}
    if not sd:
        raise ValueError(f"{path}: no 'motion_modules.' keys; not an AnimateDiff motion module")
    pe = [v for k, v in sd.items() if k.endswith(("pos_encoder.pe", "pos_embed.pe"))]
    fmt = "animatediff" if any(".temporal_transformer." in k for k in sd) else "diffusers-motion-adapter"
    out = {}
    for k, v in sd.items():
        if k.endswith(("pos_encoder.pe", "pos_embed.pe")):
            continue
        if fmt != "animatediff":
            head, tail = k.split("motion_modules.", 1)
            j, rest = tail.split(".", 1)
            k = f"{head}motion_modules.{j}.temporal_transformer.{rest}"
            for a, b in MOTION_DIFFUSERS:
                k = k.replace(a, b)
        out[k] = v
    max_len = pe[0].shape[1] if pe else adapter_cfg.get("motion_max_seq_length", 32)
    mid = any(k.startswith("mid_block.") for k in out)
    version = "v2" if mid else ("v1" if max_len == 24 else "v3")
    cfg = dict(motion_modules=True, motion_mid_block=mid, motion_max_len=max_len, frame_pooled_norm=version == "v1")
    if "motion_num_attention_heads" in adapter_cfg:
        cfg["motion_heads"] = adapter_cfg["motion_num_attention_heads"]
    return out, cfg, {"motion_format": fmt, "motion_version": version, "motion_file": path}


def read_unet_config(folder):
    c = read_json(os.path.join(folder, "config.json"))
    if "block_out_channels" not in c or "down_block_types" not in c:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: not a U-Net config (no block_out_channels / "
                         f"down_block_types)")
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    return dict(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                block_out_channels=tuple(c["block_out_channels"]), layers_per_block=c.get("layers_per_block", 2),
                attention_heads=heads, cross_attention_dim=c.get("cross_attention_dim", 768),
                norm_num_groups=c.get("norm_num_groups", 32), motion_window=tuple(c.get("motion_window", ())),
                down_attention=tuple("CrossAttn" in t for t in c["down_block_types"]))


def find_weights(folder, names):
    for n in names:
        if os.path.isfile(os.path.join(folder, n)):
            return os.path.join(folder, n)
    raise FileNotFoundError(f"{folder}: none of {', '.join(names)} found")


def load_unet(path, motion_module=None, **overrides):
    """path: SD-1.5 diffusers folder (or its unet/ folder) or single-file LDM checkpoint (.safetensors/.ckpt);
    motion_module: AnimateDiff file (original layout) or diffusers MotionAdapter file/folder, or None."""
    path = str(path)
    cfg, info = {}, {}
    if os.path.isdir(path):
        folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{path}: not an SD diffusers folder (no unet/config.json)")
        cfg = read_unet_config(folder)
        sd = load_state_dict_file(find_weights(folder, ["diffusion_pytorch_model.safetensors",
                                                        "diffusion_pytorch_model.bin"]))
        info["unet_format"] = "diffusers"
    elif os.path.isfile(path):
        sd = load_state_dict_file(path)
        if not any(k.startswith("model.diffusion_model.") for k in sd):
            raise ValueError(f"{path}: no 'model.diffusion_model.' keys; not an SD single-file checkpoint")
        sd = ldm_to_diffusers_unet(sd, overrides.get("layers_per_block", 2))
        info["unet_format"] = "ldm-single-file"
    else:
        raise FileNotFoundError(f"U-Net weights not found: {path}")
    mm_sd = {}
    if motion_module is not None:
        mm_sd, mm_cfg, mm_info = read_motion_module(motion_module)
        cfg.update(mm_cfg)
        info.update(mm_info)
    else:
        cfg["motion_modules"] = False
    cfg.update(overrides)
    unet = UNet(UNetConfig(**cfg))
    own = unet.state_dict()
    load_checked(unet, sd, f"U-Net ({path})", [k for k in own if "motion_modules." not in k])
    if motion_module is not None:
        load_checked(unet, mm_sd, f"motion module ({motion_module})", [k for k in own if "motion_modules." in k])
    unet.info = info
    return unet


def save_unet(unet, folder):
    """Write the spatial U-Net in diffusers layout (config.json + diffusion_pytorch_model.safetensors)."""
    c = unet.config
    os.makedirs(folder, exist_ok=True)
    types = [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in c.down_attention]
    config = {"_class_name": "UNet2DConditionModel", "in_channels": c.in_channels, "out_channels": c.out_channels,
              "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
              "attention_head_dim": c.attention_heads, "cross_attention_dim": c.cross_attention_dim,
              "norm_num_groups": c.norm_num_groups, "down_block_types": types,
              "up_block_types": [t.replace("Down", "Up") for t in types[::-1]], "sample_size": 64}
    if any(k > 1 for k in c.motion_window):  # not a diffusers key: the toy's motion modules' neighbourhood (UNetConfig)
        config["motion_window"] = list(c.motion_window)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items() if "motion_modules." not in k}
    save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def save_motion_module(unet, path):
    """Write the motion modules in the original AnimateDiff layout (pos_encoder.pe included, as AnimateDiff does)."""
    sd = {k: v.contiguous() for k, v in unet.state_dict().items() if "motion_modules." in k}
    for name, m in unet.named_modules():
        if isinstance(m, PositionalEncoding):
            sd[name + ".pe"] = m.pe.contiguous()
    save_file(sd, str(path))
