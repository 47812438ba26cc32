"""
SD-1.5 VAE (diffusers AutoencoderKL, same module names so its checkpoints load as-is) plus the FLASH
Detail Enhancement Decoder: Warping and Patch Attention branches fused into every decoder scale
(FLASH, arXiv 2503.00276, Sec. 3.3 Eq. 5-7 and App. A2.3). With detail=False, or ref=None, this is
exactly the SD decoder; with fresh detail branches it is too (the fusion layer M starts at zero).
VAEConfig switches: detail_branches (Table A2's warp-only / patch-only / both), detail_full_res (patch attention at
full resolution too, in query chunks through model.attention).
"""
import json
import os
import re
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model import attention, load_checked, load_state_dict_file, maybe_checkpoint, read_json


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2       # decoder blocks have layers_per_block + 1 resnets
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # SD-1.5 latent scale
    detail: bool = False             # add FLASH Detail Enhancement branches (decoder.detail.*)
    detail_branches: tuple = ("warp", "patch")  # Table A2's decoder ablations: ("warp",), ("patch",) or both
    detail_full_res: bool = False    # patch attention also at full resolution (65,536 patch tokens per 512^2 frame)
    detail_attn_chunk: int = 1024    # queries per SDPA call in patch attention (model.attention's chunk)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """single-head self-attention of the VAE mid block"""
    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)[:, None]  # B 1 (H W) C
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h))
        h = self.to_out[0](h[:, 0]).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(ch, groups):
    m = nn.Module()
    m.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
    m.attentions = nn.ModuleList([Attention(ch, groups)])
    return m


def run_mid(m, x):
    return m.resnets[1](m.attentions[0](m.resnets[0](x)))


def warp(x, flow):
    """bilinearly sample x (N,C,H,W) at (q+dx, p+dy); flow (N,2,H,W) = (dx, dy) in pixels (Eq. 5)"""
    N, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
    # pixel centres for align_corners=False; fp32 grid (bf16 cannot address 512 pixels). Zero flow returns x
    # exactly for power-of-two sizes, to ~1e-6 relative otherwise (rounding in the normalised coordinates).
    gx = (2 * (xs + flow[:, 0].float()) + 1) / W - 1
    gy = (2 * (ys + flow[:, 1].float()) + 1) / H - 1
    grid = torch.stack([gx, gy], dim=-1)  # N H W 2
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


class DetailBlock(nn.Module):
    """FLASH Detail Enhancement at one decoder scale (Sec. 3.3, A2.3): h_hat = h + M(h, g~) * (s + t)"""
    def __init__(self, h_ch, g_ch, warping=True, attn=True, width=64, dim=256, heads=4, chunk=0):
        super().__init__()
        self.proj = nn.Conv2d(g_ch, h_ch, 1)  # g~: the "fully connected layer" matching g's channels to h's
        self.warp = nn.Sequential(nn.Conv2d(2 * h_ch, width, 3, padding=1), nn.SiLU(),  # N: 4 convs -> (dx, dy)
                                  nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, 2, 3, padding=1)) if warping else None
        self.fuse = nn.Sequential(nn.Conv2d(2 * h_ch, width, 3, padding=1), nn.SiLU(),  # M: 2 convs -> w
                                  nn.Conv2d(width, h_ch, 3, padding=1))
        nn.init.zeros_(self.fuse[2].weight)  # w = 0 at init: an untrained decoder is the SD decoder, bit-exact
        nn.init.zeros_(self.fuse[2].bias)
        self.heads, self.chunk = heads, chunk
        if attn:  # patch attention A on 2x2 patches (patch size 2, A3.2)
            self.patch_in = nn.Linear(4 * h_ch, dim)  # one FC layer: 2x2 patch of h or g~ -> vector
            self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.to_out = nn.Linear(dim, 4 * h_ch)  # back to a 2x2 patch
        self.attn = attn

    def patch_attention(self, h, g):
        """h (N,C,H,W) queries; g = g~ of h's size (batch 1 or N, only [:1] is used) keys and values -> t"""
        N, C, H, W = h.shape
        if H % 2 or W % 2:  # odd sizes: replicate-pad to even, crop after
            pad = (0, W % 2, 0, H % 2)
            return self.patch_attention(F.pad(h, pad, mode="replicate"), F.pad(g[:1], pad, mode="replicate"))[..., :H, :W]
        Hp, Wp = H // 2, W // 2

        def patches(x):  # B C H W -> B (H/2 W/2) (C 2 2)
            return x.view(x.shape[0], C, Hp, 2, Wp, 2).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], Hp * Wp, 4 * C)

        def split(x):  # B L D -> B nh L hs
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)
        q = split(self.to_q(self.patch_in(patches(h))))
        gp = self.patch_in(patches(g[:1]))  # keys/values from the one reference frame, shared by all N frames
        k, v = split(self.to_k(gp)).expand(N, -1, -1, -1), split(self.to_v(gp)).expand(N, -1, -1, -1)
        t = attention(q, k, v, chunk=self.chunk).transpose(1, 2).reshape(N, Hp * Wp, -1)
        return self.to_out(t).view(N, Hp, Wp, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)

    def forward(self, h, g):
        """h: decoder features (N,C,H,W); g: reference encoder features (1,Cg,Hg,Wg)"""
        if g.shape[-2:] != h.shape[-2:]:
            g = F.interpolate(g, size=h.shape[-2:], mode="bilinear", align_corners=False)
        g = self.proj(g).expand(h.shape[0], -1, -1, -1)  # g~ (N,C,H,W)
        hg = torch.cat([h, g], dim=1)
        s = warp(g, self.warp(hg)) if self.warp is not None else 0  # Warping branch
        t = self.patch_attention(h, g) if self.attn else 0  # Patch Attention branch
        return h + self.fuse(hg) * (s + t)  # Eq. 7


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            blk = nn.Module()
            cin = ch[max(i - 1, 0)]
            blk.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else c, c, g) for j in range(cfg.layers_per_block)])
            blk.downsamplers = nn.ModuleList([Downsample(c)] if i < len(ch) - 1 else [])
            self.down_blocks.append(blk)
        self.mid_block = mid_block(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x, features=False):
        x = self.conv_in(x)
        feats = []
        for blk in self.down_blocks:
            for r in blk.resnets:
                x = r(x)
            feats.append(x)  # last map at each scale, before the downsampler: H, H/2, H/4, H/8
            if features and len(feats) == len(self.down_blocks):
                return feats[::-1]  # coarse to fine = decoder order
            for d in blk.downsamplers:
                x = d(x)
        x = run_mid(self.mid_block, x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        rev, g, n = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = mid_block(rev[0], g)
        self.up_blocks = nn.ModuleList()
        for i, c in enumerate(rev):
            blk = nn.Module()
            cin = rev[max(i - 1, 0)]
            blk.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else c, c, g) for j in range(cfg.layers_per_block + 1)])
            blk.upsamplers = nn.ModuleList([Upsample(c)] if i < n - 1 else [])
            self.up_blocks.append(blk)
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # train.py's decoder stage: every resnet and detail block recomputed
        if cfg.detail:
            # Scale pairing (SD-1.5, image H): detail.i for i < n-1 acts on the INPUT of up_blocks.i (H/8, H/4, H/2),
            # detail.{n-1} on the OUTPUT of the last up block (H, before conv_norm_out); each is paired with the
            # encoder map of equal size (Encoder feats, last map before each downsampler; channels rev[i]).
            # Patch attention at full resolution only with detail_full_res: 512^2 gives 65,536 patch tokens per
            # frame, 4 L^2 dim = 4.4 TFLOP/frame for A alone (the whole SD decoder is 2.5); at H/2, 16,384 tokens
            # (0.27 TFLOP). detail_branches builds only the chosen branches (Table A2); a scale left with neither
            # has no block at all (ModuleDict: the keys stay decoder.detail.{i}.*).
            branches = set(cfg.detail_branches)
            if not branches or branches - {"warp", "patch"}:
                raise ValueError(f"detail_branches {','.join(cfg.detail_branches)}: want warp, patch or warp,patch")
            h_ch = [rev[0]] + rev[:n - 2] + [rev[-1]]
            attn = ["patch" in branches and (i < n - 1 or cfg.detail_full_res) for i in range(n)]
            self.detail = nn.ModuleDict({str(i): DetailBlock(h_ch[i], rev[i], "warp" in branches, attn[i],
                                                             chunk=cfg.detail_attn_chunk)
                                         for i in range(n) if "warp" in branches or attn[i]})

    def forward(self, z, ref=None):
        h = run_mid(self.mid_block, self.conv_in(z))
        n, ckpt = len(self.up_blocks), self.gradient_checkpointing and self.training
        for i, blk in enumerate(self.up_blocks):
            if ref is not None and i < n - 1 and str(i) in self.detail:
                h = maybe_checkpoint(ckpt, self.detail[str(i)], h, ref[i])
            for r in blk.resnets:
                h = maybe_checkpoint(ckpt, r, h)
            for u in blk.upsamplers:
                h = u(h)
        if ref is not None and str(n - 1) in self.detail:
            h = maybe_checkpoint(ckpt, self.detail[str(n - 1)], h, ref[n - 1])
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x, sample=False, generator=None, chunk=8):
        """x (N,3,H,W) in [-1,1] -> scaled latent (N,4,H/8,W/8): posterior mean, or a sample"""
        out = []
        for xc in x.split(chunk):
            mean, logvar = self.quant_conv(self.encoder(xc)).chunk(2, dim=1)
            if sample:
                eps = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
                mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean)
            out.append(mean)
        return torch.cat(out) * self.config.scaling_factor

    def encoder_features(self, x):
        """reference image (1,3,H,W) in [-1,1] -> encoder maps at H/8, H/4, H/2, H (decoder order), for decode(ref=)"""
        return self.encoder(x, features=True)

    def full_res_attention(self, on):
        """Run (True) or skip (False) the full-resolution patch attention of a decoder built with detail_full_res
        (sample.py --no-detail-full-res: saves its cost, but the decoder was trained with it: an approximation)."""
        last = str(len(self.config.block_out_channels) - 1)
        if self.config.detail and self.config.detail_full_res and last in self.decoder.detail:
            self.decoder.detail[last].attn = on

    def decode(self, z, ref=None, chunk=4):
        """scaled latent (N,4,h,w) -> images (N,3,8h,8w) in ~[-1,1]; ref = encoder_features(first frame) or None"""
        if ref is not None and not self.config.detail:
            raise ValueError("decode(ref=...) needs a VAE built with detail=True")
        z = z / self.config.scaling_factor
        return torch.cat([self.decoder(self.post_quant_conv(zc), ref) for zc in z.split(chunk)])


# -----------------------------------------------------------------------------
# checkpoints: diffusers folder / vae folder / single-file LDM (first_stage_model.*), all strict

def ldm_to_diffusers(sd, n):
    """rule-based rename of LDM (CompVis) VAE keys; n = number of resolution levels"""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets.", k)
        k = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"\.up\.(\d+)\.", lambda m: f".up_blocks.{n - 1 - int(m.group(1))}.", k)  # LDM up index reversed
        k = k.replace(".block.", ".resnets.").replace(".upsample.", ".upsamplers.0.").replace("nin_shortcut", "conv_shortcut")
        k = k.replace("mid.block_1.", "mid_block.resnets.0.").replace("mid.block_2.", "mid_block.resnets.1.")
        k = k.replace("mid.attn_1.", "mid_block.attentions.0.").replace("norm_out.", "conv_norm_out.")
        if ".attentions." in k:
            k = re.sub(r"\.(norm|q|k|v|proj_out)\.", lambda m: "." + dict(norm="group_norm", q="to_q", k="to_k", v="to_v",
                                                                         proj_out="to_out.0")[m.group(1)] + ".", k)
            v = v.flatten(1) if v.ndim == 4 else v  # 1x1 conv -> Linear
        out[k] = v
    return out


def load_vae(path, **overrides):
    """SD diffusers folder, its vae/ folder, or a single-file LDM checkpoint -> VAE (fp32, eval)"""
    path, cfg = str(path), {}
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        files = [os.path.join(folder, f"diffusion_pytorch_model.{e}") for e in ("safetensors", "bin")]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise ValueError(f"{path}: no vae/diffusion_pytorch_model.safetensors or .bin found")
        if os.path.isfile(os.path.join(folder, "config.json")):
            cfg = {k: v for k, v in read_json(os.path.join(folder, "config.json")).items()
                   if k in VAEConfig.__dataclass_fields__}
        sd = load_state_dict_file(files[0])
    elif os.path.isfile(path) and path.endswith((".safetensors", ".ckpt", ".pt", ".bin", ".pth")):
        sd = load_state_dict_file(path)
        if any(k.startswith("first_stage_model.") for k in sd):  # full SD checkpoint: keep only the VAE
            sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # LDM training-only discriminator/logvar
    else:
        raise ValueError(f"{path}: not a diffusers (vae) folder or a .safetensors/.ckpt VAE checkpoint")
    cfg = VAEConfig(**{**cfg, **overrides})
    cfg.block_out_channels, cfg.detail_branches = tuple(cfg.block_out_channels), tuple(cfg.detail_branches)
    if any(".down." in k or ".up." in k or ".mid." in k for k in sd):
        sd = ldm_to_diffusers(sd, len(cfg.block_out_channels))
    old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # pre-0.14 diffusers names
    sd = {re.sub(r"\.(query|key|value|proj_attn)\.", lambda m: f".{old[m.group(1)]}.", k): v for k, v in sd.items()}
    vae = VAE(cfg)
    base = [k for k in vae.state_dict() if ".detail." not in k]  # fresh detail branches may be absent
    load_checked(vae, sd, f"VAE ({path})", base + [k for k in sd if ".detail." in k])
    return vae.eval()


def save_vae(vae, folder):
    """diffusers layout: config.json (diffusers names, + our `detail`) and diffusion_pytorch_model.safetensors"""
    os.makedirs(folder, exist_ok=True)
    n = len(vae.config.block_out_channels)
    cfg = {"_class_name": "AutoencoderKL", **asdict(vae.config), "act_fn": "silu", "sample_size": 512,
           "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
