"""Embedded FLASH demo (arXiv 2503.00276) on a CPU, no downloads: the whole method on a toy world of shapes.
(0) `python demo.py pretrain` builds what a user downloads (shipped in demo_base/): a tiny SD-1.5 (VAE, image U-Net,
    CLIP text encoder) and a tiny AnimateDiff motion module trained the AnimateDiff way (text-to-video, every frame
    noised) on generic motion of every shape and colour (lines, zig-zags, circles, still; never the target action).
(1) `python demo.py`: FLASH Sec. 3.2 (train.train: strong augmentation, motion and correspondence alignment) learns
    "a shape jumps to the right" from 16 clips of red/orange discs on blue, on top of the base; sample.animate then
    animates held-out references (squares and diamonds, colours, backgrounds, positions never in the training clips).
(2) `python demo.py --ablation`: Table 2 (Sec. 4.3) in miniature, variants #1, #2 and #5 from the same base.
Scored by the object's centroid track against the trained motion, and the background's PSNR against the reference.
"""
import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import train as T
from clip_text import CLIPTextConfig, CLIPTextModel, Tokenizer, byte_vocab
from model import UNet, UNetConfig
from data import tqdm, write_video
from sample import (Pipeline, detail_overrides, alphas_cumprod, animate, encode_prompt, load_pipeline, predicted_eps,
                    save_pipeline, video_noise)
from vae import VAE, VAEConfig, load_vae

# ----------------------------------------------------------------------------- demo settings
SIZE, FRAMES, FPS = 64, 16, 8
PROMPT = "a shape jumps to the right"
BASE = Path(__file__).resolve().parent / "demo_base"  # the shipped toy base (python demo.py pretrain writes it)
N_CLIPS, N_REFS = 16, 6  # training clips (FLASH: <= 16), held-out references
VAE_CFG = VAEConfig(block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=1)  # 64x64 -> 4x16x16
LATENT_STD = 1.0  # latent std, as SD's 0.18215 gives
TEXT_CFG = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2)
UNET_CFG = UNetConfig(block_out_channels=(32, 32, 64), layers_per_block=1, attention_heads=2, cross_attention_dim=32,
                      norm_num_groups=8, down_attention=(False, True, True), motion_max_len=32)  # latents 16, 8, 4
# pretraining (python demo.py pretrain): steps, learning rates, batches; the pools it draws from
PRETRAIN = dict(vae=800, unet=1000, motion=3200)
PRETRAIN_FAST = dict(vae=4, unet=4, motion=4)
LR = dict(vae=4e-4, unet=3e-3, motion=1e-3)
BATCH = dict(vae=16, unet=32, motion=4)
MIXED_NOISE = 0.5  # PYoCo's mixed noise prior (alpha = 1): half of each frame's noise variance is shared by all frames
PREDICTION = "epsilon"  # what the U-Net predicts (scheduler_config.json); "v_prediction": rebuild 6, not adopted
I2V_FRACTION = 0.5  # video stage: share of batches in FLASH's image-to-video layout (clean frame 1, cross-frame attn)
SHARED_MEAN = True  # sampling: every frame's initial noise has frame 1's spatial mean (sample.video_noise)
SAMPLE_SHARE = 0.9  # sampling: share of the initial noise common to all frames (sample.py --mixed-noise), above
# the 0.5 the base and FLASH train with: the jitter follows each frame's own part, and with FreeInit the larger share
# costs one action performed in 30 over five seeds, not three (docs/demo.md, section 2)
NOISE = dict(mixed_noise=SAMPLE_SHARE, shared_mean=SHARED_MEAN)  # how every demo video draws its initial noise
T2V_NOISE = dict(NOISE, mixed_noise=MIXED_NOISE)  # gate (b): text-to-video has no frame 1 to anchor a clip, so
# the base samples it with its own prior (at 0.9 its clips score 38 px; docs/demo.md)
POOL, MOTION_POOL = 1024, 1536  # single frames (image stages), generic-motion clips (motion stage)
# FLASH few-shot stage (train.py's flags): the motion modules start from the base's; FLASH favours large t
# (ReVersion's p(t) ∝ 1 - alpha cos(pi t/T)) and the toy takes the strongest alpha: layout and motion are decided at
# large t, where the eps-MSE barely sees them (docs/demo.md)
FLASH = dict(steps=900, lr=1e-3, timestep_alpha=1.0, lr_schedule="constant", ema_decay=0.0,
             loss_weight="trunc-snr")  # the base's own loss weight (diffusion_loss), as mixed_noise is its own prior
FLASH_FAST = dict(FLASH, steps=4)  # --fast
VARIANTS = {  # Table 2 (Sec. 4.3) as train.py switches; #5 is the demo's model
    "#1": ("no_aug", "no strong augmentation", dict(strong_aug=False, motion_align=False, corr_align=False)),
    "#2": ("no_align", "strong augmentation only", dict(strong_aug=True, motion_align=False, corr_align=False)),
    "#5": ("flash", "full FLASH (aug + motion + corr align)", dict(strong_aug=True, motion_align=True, corr_align=True)),
    "#6": ("flash_decoder", "#5 + detail decoder (Sec. 3.3)", {}),  # #5's U-Net, then train.py --stage decoder
}
DECODER = dict(steps=300, steps_fast=2, lr=1e-3)  # #6's decoder stage
# sampling: sample.py's defaults (FLASH A3.2) and two training-free additions, both off in sample.py (docs/demo.md):
# Spatiotemporal Skip Guidance (arXiv 2411.18664; --stg) at scale 2: the per-frame wobble the motion modules leave
# unpooled is what it pushes against; FreeInit (arXiv 2312.07537; --freeinit 3 --freeinit-fast) at its defaults, 3
# coarse-to-fine passes: where the arc lands is decided in the first steps, from the initial noise's low frequencies
SAMPLING = dict(steps=25, guidance=7.5, adain="lamp", stg=2.0, freeinit=3, freeinit_fast=True)
THREADS = 2  # idle 2-core CPU: two threads are fastest; one per process when two runs share the machine

# ----------------------------------------------------------------------------- the toy world
# Shapes of equal area on a plain or two-tone background. The target action: the shape jumps up and lands further
# right (an arc). FLASH's few-shot split, as the paper holds out appearance: the training clips restrict the look (one
# shape, one colour family, one background family), the held-out references change all three, and both draw their
# start positions from the same spread over the frame, as real actors stand anywhere. A diagnostic row keeps
# references whose start lies outside that spread. Pretraining draws from every look and position.
#   shape: train disc                  refs square, diamond
#   object hue: train [0.00,0.12]      refs [0.30,0.45]      (red/orange vs green)
#   background hue: train [0.55,0.70]  refs [0.75,0.92]      (blue vs purple)
#   start x, y: train and refs [0.12,0.45] x [0.55,0.82]; diagnostic [0.50,0.56] x [0.42,0.50]
SHAPES = ("disc", "square", "diamond")
ALL = dict(shapes=SHAPES, hue=(0.0, 1.0), bg_hue=(0.0, 1.0), x=(0.14, 0.86), y=(0.14, 0.86))
DEMO_TRAIN = dict(shapes=("disc",), hue=(0.0, 0.12), bg_hue=(0.55, 0.70), x=(0.12, 0.45), y=(0.55, 0.82))
DEMO_REF = dict(DEMO_TRAIN, shapes=("square", "diamond"), hue=(0.30, 0.45), bg_hue=(0.75, 0.92))
DEMO_DIAG = dict(DEMO_REF, x=(0.50, 0.56), y=(0.42, 0.50))  # start positions never in the training clips
DEMO_RADIUS, DEMO_DX, DEMO_JUMP = 0.1, 0.3, 0.3  # fractions of the frame size
DISP, JUMP = DEMO_DX * SIZE, DEMO_JUMP * SIZE  # the trained motion: 19.2 px right, 19.2 px up and down
LINE, ZIGZAG, CIRCLE = 0.3, 0.08, 0.15  # generic motions' sizes (fractions of the frame), one path per caption
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1), "up and right": (1, -1),
              "up and left": (-1, -1), "down and right": (1, 1), "down and left": (-1, 1)}  # image y points down


def demo_trajectory(start, frames=16, size=64):
    """expected centroid (F,2) as (x, y) pixels: moves DEMO_DX*size right while jumping DEMO_JUMP*size up and down"""
    u = torch.linspace(0, 1, frames)
    x0, y0 = float(start[0]), float(start[1])
    return torch.stack([x0 + DEMO_DX * size * u, y0 - DEMO_JUMP * size * torch.sin(math.pi * u)], -1)


def motion_path(motion, frames=16, size=64):
    """a pretraining caption's motion -> path (F,2) in px from (0, 0): "moves <dir>" = a line of LINE * size,
    "zigzags <dir>" = the same line with a ZIGZAG * size triangle wave across it (two periods), "circles
    clockwise|anticlockwise" = a full circle of radius CIRCLE * size from its leftmost point, "stays still". Each
    caption names ONE path, so a text-to-video sample can be scored against it (gate b). Never the target's arc."""
    u = torch.linspace(0, 1, frames)
    if motion == "stays still":
        return torch.zeros(frames, 2)
    if motion.startswith("circles"):
        turn = 1 if motion.endswith(" clockwise") else -1  # +1: clockwise on screen (y down)
        a = math.pi + turn * 2 * math.pi * u
        return CIRCLE * size * torch.stack([a.cos() + 1, a.sin()], -1)
    kind, name = motion.split(" ", 1)
    d = torch.tensor(DIRECTIONS[name], dtype=torch.float32)
    d = d / d.norm()
    path = u[:, None] * LINE * size * d
    if kind == "zigzags":  # a triangle wave across the direction, two periods
        wave = 2 / math.pi * torch.asin(torch.sin(4 * math.pi * u))
        path = path + ZIGZAG * size * wave[:, None] * torch.stack([-d[1], d[0]])
    return path


MOTIONS = [*(f"moves {d}" for d in DIRECTIONS), *(f"zigzags {d}" for d in DIRECTIONS), "circles clockwise",
           "circles anticlockwise", "stays still"]  # 19 generic motions x 3 shapes = 57 captions


def generic_motion(g, frames=16, size=64):
    """a random pretraining motion -> (path (F,2) from (0, 0) in px, caption tail); lines twice as often"""
    kind = ["moves", "moves", "zigzags", "circles", "stays still"][int(torch.randint(5, (), generator=g))]
    options = [m for m in MOTIONS if m.startswith(kind)]
    motion = options[int(torch.randint(len(options), (), generator=g))]
    return motion_path(motion, frames, size), motion


def _hsv(h, s, v):
    return data.hsv_to_rgb(torch.tensor([h, s, v]).view(3, 1, 1)).view(3)


def draw_look(g, ranges):
    """a random appearance from `ranges` (DEMO_TRAIN, DEMO_REF, ALL): shape, object colour, background, start"""
    u = lambda lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * float(torch.rand((), generator=g))
    shape = ranges["shapes"][int(torch.randint(len(ranges["shapes"]), (), generator=g))]
    obj = _hsv(u(ranges["hue"]), u((0.7, 0.9)), u((0.85, 1.0)))
    hb, sb, vb = u(ranges["bg_hue"]), u((0.2, 0.5)), u((0.15, 0.35))
    bg1 = _hsv(hb, sb, vb)
    bg2 = _hsv(hb, sb, vb + u((0.05, 0.1))) if float(torch.rand((), generator=g)) < 0.5 else bg1  # a lighter band
    start = torch.tensor([u(ranges["x"]), u(ranges["y"])])  # fractions of the frame size
    return dict(shape=shape, obj=obj, bg1=bg1, bg2=bg2, split=u((0.3, 0.7)), start=start)


def render(look, traj, size=64):
    """look + centroids (F,2) in px -> (F,3,size,size) in [-1,1]; the shapes have the disc's area"""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    bg = torch.where(yy < round(look["split"] * size), look["bg1"].view(3, 1, 1), look["bg2"].view(3, 1, 1))  # 3 S S
    dx, dy = (xx - traj[:, 0, None, None]).abs(), (yy - traj[:, 1, None, None]).abs()  # F S S
    dist = {"disc": (dx ** 2 + dy ** 2).sqrt(), "square": torch.maximum(dx, dy) / math.sqrt(math.pi / 4),
            "diamond": (dx + dy) / math.sqrt(math.pi / 2)}[look["shape"]]
    a = (DEMO_RADIUS * size + 0.5 - dist).clamp(0, 1).unsqueeze(1)  # antialiased coverage, F 1 S S
    return (bg * (1 - a) + look["obj"].view(3, 1, 1) * a) * 2 - 1


def make_demo_clips(n, frames=16, size=64, seed=0):
    """the target action, training looks -> (clips: list of (F,3,size,size) in [-1,1], trajectories: list of (F,2))"""
    g, clips, trajs = torch.Generator().manual_seed(seed), [], []
    for _ in range(n):
        look = draw_look(g, DEMO_TRAIN)
        trajs.append(demo_trajectory(look["start"] * size, frames, size))
        clips.append(render(look, trajs[-1], size))
    return clips, trajs


def make_demo_references(n, size=64, seed=1000, ranges=DEMO_REF):
    """-> (images: list of (3,size,size) in [-1,1], starts: list of (2,) (x, y) pixels): unseen appearances
    (DEMO_REF), or unseen appearances and start positions (DEMO_DIAG)"""
    g = torch.Generator().manual_seed(seed)
    looks = [draw_look(g, ranges) for _ in range(n)]
    return [render(lk, lk["start"][None] * size, size)[0] for lk in looks], [lk["start"] * size for lk in looks]


def make_generic_clips(n, frames=16, size=64, seed=0):
    """pretraining text-to-video data: every look, generic motion -> (clips, captions "a <shape> <motion>")"""
    g, clips, captions = torch.Generator().manual_seed(seed), [], []
    for _ in range(n):
        look = draw_look(g, ALL)
        path, motion = generic_motion(g, frames, size)
        clips.append(render(look, place(path, g, size) + path, size))
        captions.append(f"a {look['shape']} {motion}")
    return clips, captions


def centroid_track(video, background=None, threshold=0.5):
    """video (F,3,H,W) in [-1,1] -> (F,2) (x, y) centroid of pixels whose max channel difference from the
    background exceeds `threshold` (NaN where none). background: (3,) colour, (3,H,W) image, or None = the
    per-channel median of the first frame's 2-pixel border."""
    video = video.float()
    if background is None:
        f = video[0]
        border = [f[:, :2], f[:, -2:], f[:, :, :2], f[:, :, -2:]]
        background = torch.cat([b.flatten(1) for b in border], 1).median(1).values
    bg = background.to(video)
    bg = bg.view(1, *bg.shape) if bg.dim() == 3 else bg.view(1, 3, 1, 1)
    m = ((video - bg).abs().amax(1) > threshold).float()  # F H W
    # speckle filter: keep a pixel only if at least 5 of its 3x3 neighbourhood (itself included) are foreground. An
    # isolated speckle has 1, the object's edge 6 and its interior 9 (each side of a disc is eroded alike, so its
    # centroid stays). Why: measured on ground-truth clips with 2 % speckle, the plain centroid missed the action
    # on half of them (mean error 3.7 px, jitter 2.5 px); with the filter: test_scorer_ignores_speckle
    m = m * (F.avg_pool2d(m[:, None], 3, 1, 1)[:, 0] * 9 >= 4.5)
    H, W = m.shape[-2:]
    n = m.sum((1, 2))
    cx = (m * torch.arange(W).to(m)).sum((1, 2)) / n
    cy = (m * torch.arange(H).to(m).view(H, 1)).sum((1, 2)) / n
    return torch.stack([cx, cy], -1)  # n = 0 gives NaN


# ----------------------------------------------------------------------------- scoring

def track_errors(video, gt):
    """video (F,3,H,W) in [-1,1], expected centroids gt (F,2) -> (track, errors): mean and end error in px over
    frames 2..F (a frame where no object is found counts as the frame size) and jitter, the mean length of the
    deviation's second differences (0 for a track that follows the path with any smooth offset)"""
    size = float(video.shape[-1])
    track = centroid_track(video)
    err = (track - gt).norm(dim=-1).nan_to_num(size)[1:]  # frames 2..F; a lost object: off by the frame size
    dev = (track - gt).nan_to_num(size)
    jitter = (dev[2:] - 2 * dev[1:-1] + dev[:-2]).norm(dim=-1).mean().item()
    return track, dict(mean_err=err.mean().item(), end_err=err[-1].item(), jitter=jitter)


def score(video, start):
    """video (F,3,H,W) in [-1,1] -> errors in px of the object's centroid track against demo_trajectory(start)
    (track_errors). Performs the motion: endpoint error below a third of the displacement and jump height within a
    third of the true one."""
    gt = demo_trajectory(start, len(video), video.shape[-1])
    track, errs = track_errors(video, gt)
    ys = track[:, 1][~track[:, 1].isnan()]
    peak = (track[0, 1] - ys.min()).item() if len(ys) else 0.0
    peak_err = abs(peak - (gt[0, 1] - gt[:, 1].min()).item())
    return dict(errs, peak_err=peak_err, performs=bool(errs["end_err"] < DISP / 3 and peak_err < JUMP / 3))


def background_psnr(video, reference, centres):
    """PSNR (dB, [-1,1] range) over frames 2..F of the pixels that stay background all along (farther than 2
    object radii from every centroid in `centres` (N,2); NaN rows skipped) against the reference image: how well
    the look is kept; no tracked centroid at all (the object lost in every frame): the whole frame"""
    size = video.shape[-1]
    c = centres[~centres.isnan().any(-1)]
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    dist = ((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2).sqrt()  # N H W
    dist = dist.amin(0) if len(c) else torch.full((size, size), math.inf)
    keep = dist > 2 * DEMO_RADIUS * size  # H W
    mse = (video[1:].float() - reference.float()[None]).square()[:, :, keep].mean().item()
    return 10 * math.log10(4 / max(mse, 1e-10))


def summary(scores):
    """per-reference rows -> their means (performs: the share), and the rows themselves"""
    keys = [k for k in scores[0] if k != "performs"]
    return {**{k: float(np.mean([s[k] for s in scores])) for k in keys},
            "performs": float(np.mean([s["performs"] for s in scores])), "per_reference": scores}


def to_tensor(frames):  # uint8 (F,H,W,3) -> (F,3,H,W) in [-1,1]
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def contact_sheet(videos, path):
    """rows = videos (uint8 (F,H,W,3)), columns = frames"""
    Image.fromarray(np.concatenate([np.concatenate(list(v), axis=1) for v in videos], axis=0)).save(path)


# ----------------------------------------------------------------------------- the pretrained base (SD + AnimateDiff)

def warm_start_vae(vae, anchor=10.0, offset=3.0):
    """Start the VAE as an RGB codec: latent channels 0-2 = the image 4x4-average-pooled, decoded by nearest
    upsampling (identity resnets and attention, averaging downsamplers). The GroupNorm before each conv_out is made
    image-independent by two constant +-anchor channels per group, and SiLU is kept near-linear by an offset. Why:
    from a random init this tiny GroupNorm VAE needs thousands of steps before colours survive (measured: MSE
    stuck at 0.02 after 600 steps); from here a few hundred steps sharpen it (0.003)."""
    enc, dec = vae.encoder, vae.decoder
    def eye(conv, bias=0.0):  # centre tap: channel i -> channel i
        conv.weight.zero_()
        n = min(conv.weight.shape[:2])
        conv.weight[range(n), range(n), conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] = 1.0
        conv.bias.fill_(bias)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith(("conv2.weight", "conv2.bias", "to_out.0.weight", "to_out.0.bias")):
                p.zero_()  # every resnet and attention block starts as the identity
        for conv in [enc.conv_in, dec.conv_in, vae.quant_conv, vae.post_quant_conv] + \
                [m.conv_shortcut for m in vae.modules() if getattr(m, "conv_shortcut", None) is not None] + \
                [u.conv for blk in dec.up_blocks for u in blk.upsamplers]:
            eye(conv)
        for d in [d for blk in enc.down_blocks for d in blk.downsamplers]:
            d.conv.weight.zero_()
            d.conv.bias.zero_()
            c = d.conv.weight.shape[0]
            d.conv.weight[range(c), range(c), :2, :2] = 0.25  # 2x2 average
        for part, res in ((enc, enc.mid_block.resnets[1]), (dec, dec.up_blocks[-1].resnets[-1])):
            norm, k = part.conv_norm_out, part.conv_norm_out.num_channels // part.conv_norm_out.num_groups
            norm.weight.fill_(anchor * (2 / k) ** 0.5)  # = the anchors' std: GroupNorm becomes ~ x - mean
            norm.bias.fill_(offset)
            for j in range(norm.num_groups):
                res.conv2.bias[j * k + k - 2], res.conv2.bias[j * k + k - 1] = anchor, -anchor
                norm.weight[j * k + k - 2:j * k + k], norm.bias[j * k + k - 2:j * k + k] = 0.0, 0.0
            eye(part.conv_out, -F.silu(torch.tensor(offset)).item())
        enc.conv_out.bias[vae.config.latent_channels:] = -10.0  # log-variance: near-deterministic at the start


def pretrain_vae(frames, steps, gen, dev):
    """MSE on random frames, from warm_start_vae, as a plain autoencoder (the posterior mean). Then the posterior
    is made near-deterministic, as SD's is (std ~1e-4 here), and the latents are centred and scaled to LATENT_STD.
    Why: trained with a KL term this tiny VAE's posterior std grew to ~20 % of the latents' std, and train.py's
    posterior samples then differ frame by frame: noise that no motion module can predict (measured: the FLASH
    validation loss at t = 100 rose during training)."""
    vae = VAE(replace(VAE_CFG)).to(dev)
    warm_start_vae(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR["vae"], weight_decay=0.0)
    losses, c = [], vae.config.latent_channels
    for i in tqdm(range(steps), desc="pretrain VAE"):
        T.set_lr(opt, LR["vae"], i, steps)
        x = frames[torch.randint(len(frames), (BATCH["vae"],), generator=gen)].to(dev)
        mean = vae.quant_conv(vae.encoder(x))[:, :c]
        loss = F.mse_loss(vae.decoder(vae.post_quant_conv(mean)), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        vae.quant_conv.weight[c:], vae.quant_conv.bias[c:] = 0.0, -18.0  # log-variance: std e^-9
        vae.config.scaling_factor = 1.0
        mean = vae.encode(frames[:256].to(dev), chunk=64).mean(dim=(0, 2, 3))
        vae.quant_conv.bias[:c] -= mean  # centred: sampling starts from N(0, I), so x_T must not carry a mean
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean
        vae.config.scaling_factor = LATENT_STD / vae.encode(frames[:256].to(dev), chunk=64).std().item()
    return vae.eval().requires_grad_(False), losses


def diffusion_loss(unet, z0, ctx, acp, gen, clean_first=False):
    """eps-MSE with every frame noised at one uniform t per sample (SD, and AnimateDiff's motion training), the noise
    drawn from the mixed prior (sample.video_noise; single frames: plain N(0, I)), each sample weighted by
    max(1, 1/SNR_t), Salimans & Ho's "truncated SNR" weighting (arXiv 2202.00512 Sec. 4): the eps-MSE is the
    clean-latent MSE times SNR_t = a/(1-a), so at large t (SNR 1/632 at t = 999) it barely sees the decisions made
    there (colours, layout, where the object is in each frame); there the loss becomes the clean-latent MSE. With
    PREDICTION = "v_prediction" the U-Net's v is taken as eps first: its eps-MSE is a_t |v error|^2, so the weighted
    loss is max(a_t, 1 - a_t) times the v-MSE (the same weight, another output; rebuild 6, docs/demo.md).
    clean_first: FLASH's image-to-video layout (Sec. 3.1): frame 1 stays clean and only frames 2..F are scored."""
    t = torch.randint(len(acp), (len(z0),), generator=gen).to(z0.device)
    noise = video_noise(z0.shape, gen, MIXED_NOISE).to(z0.device)
    a = acp[t].view(-1, 1, 1, 1, 1)
    w = T.loss_weight("trunc-snr", a.flatten())
    xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    if clean_first:
        xt[:, :, 0] = z0[:, :, 0]
    eps = predicted_eps(unet(xt, t, ctx), xt, a, PREDICTION)  # a v-model's output as eps (PREDICTION)
    err = (eps - noise)[:, :, int(clean_first):].square().mean(dim=(1, 2, 3, 4))
    return (w * err).mean()


def pretrain(unet, text_encoder, latents, labels, ids, steps, stage, gen, i2v_fraction=0.0):
    """one base stage: AdamW on the U-Net's trainable parameters and the text encoder (trained with it, as CLIP
    was trained before SD used it; here jointly, on the captions), batches of latents (N,4,F,h,w) with caption ids
    `labels` into the token ids `ids` (ids[0] = the empty prompt, drawn 10 % of the time so classifier-free guidance
    has an unconditional branch). A share i2v_fraction of the batches is in FLASH's image-to-video setting (clean
    first frame, cross-frame attention on); the rest is AnimateDiff's text-to-video (cross-frame attention off)."""
    params = [p for p in [*unet.parameters(), *text_encoder.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.0)
    acp, losses, dev = alphas_cumprod().to(latents.device), [], latents.device
    cross_frame = T.cross_frame_layers(unet)  # on in image-to-video batches, off in text-to-video ones
    unet.train()
    text_encoder.train()
    for i in tqdm(range(steps), desc=f"pretrain {stage}"):
        T.set_lr(opt, LR[stage], i, steps)
        idx = torch.randint(len(latents), (BATCH[stage],), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < 0.1
        ctx = text_encoder(ids[torch.where(drop, 0, labels[idx]).to(dev)])
        i2v = i2v_fraction > 0 and torch.rand((), generator=gen).item() < i2v_fraction
        for attn in cross_frame:
            attn.cross_frame = i2v
        loss = diffusion_loss(unet, latents[idx], ctx, acp, gen, clean_first=i2v)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return unet.eval(), losses


def build_base(out, steps, seed=0, device="cpu", log=print):
    """SD's part (VAE; image U-Net and text encoder on single frames of every look, captioned with the shape), then
    AnimateDiff's: motion modules inserted as the identity (proj_out = 0) and trained on generic-motion clips with
    the mixed noise prior, text-to-video (every frame noised, no FLASH cross-frame attention) and, on I2V_FRACTION of
    the batches, in FLASH's image-to-video layout (SD's trained self-attention carries a reference's look through
    FLASH's cross-frame keys; this toy's must learn to); unlike AnimateDiff the image layers and the text encoder
    train on with them (a toy this small cannot afford a frozen image prior that never saw video). Writes the
    diffusers folder + motion module + build.json (with the gates, measure_base)."""
    t0, dev = time.time(), torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    looks = [draw_look(g, ALL) for _ in range(POOL)]
    pool = torch.cat([render(lk, lk["start"][None] * SIZE, SIZE) for lk in looks])  # single frames, every look
    shapes = torch.tensor([1 + SHAPES.index(lk["shape"]) for lk in looks])  # caption ids: "a disc", ...
    pool[::2] = torch.cat([data.strong_augment(f[None], gen) for f in pool[::2]])  # the looks FLASH's aug makes
    vae, vae_losses = pretrain_vae(pool, steps["vae"], gen, dev)
    log(f"VAE: loss {np.mean(vae_losses[:5]):.4f} -> {np.mean(vae_losses[-5:]):.4f} "
        f"({time.time() - t0:.0f}s), latent scale {vae.config.scaling_factor:.3f}")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(TEXT_CFG).to(dev)
    tokenizer = Tokenizer(*byte_vocab())
    clips, captions = make_generic_clips(MOTION_POOL, FRAMES, SIZE, seed=seed + 2)
    names = sorted(set(captions))
    ids = tokenizer(["", *[f"a {s}" for s in SHAPES], *names]).to(dev)  # 0: "", 1-3: shapes, then motions
    with torch.no_grad():
        frames = vae.encode(pool.to(dev), chunk=64)[:, :, None]  # N 4 1 h w
        clip_lat = torch.stack([vae.encode(c.to(dev), chunk=64).transpose(0, 1) for c in clips])  # N 4 F h w

    image_unet = UNet(replace(UNET_CFG, motion_modules=False)).to(dev)
    image_unet, unet_losses = pretrain(image_unet, text_encoder, frames, shapes, ids, steps["unet"], "unet", gen)
    log(f"image U-Net + text encoder: loss {np.mean(unet_losses[:5]):.4f} -> {np.mean(unet_losses[-5:]):.4f} "
        f"({time.time() - t0:.0f}s)")

    unet = UNet(UNET_CFG).to(dev)
    missing, unexpected = unet.load_state_dict(image_unet.state_dict(), strict=False)
    assert not unexpected and all("motion_modules." in k for k in missing)
    for name, p in unet.named_parameters():
        if "temporal_transformer.proj_out." in name:
            torch.nn.init.zeros_(p)  # AnimateDiff: a new motion module starts as the identity
    labels = torch.tensor([1 + len(SHAPES) + names.index(c) for c in captions])
    unet, motion_losses = pretrain(unet, text_encoder, clip_lat, labels, ids, steps["motion"], "motion", gen,
                                   I2V_FRACTION)
    for attn in T.cross_frame_layers(unet):
        attn.cross_frame = True
    log(f"video stage (motion modules, U-Net, text encoder): loss {np.mean(motion_losses[:20]):.4f} -> "
        f"{np.mean(motion_losses[-20:]):.4f} ({time.time() - t0:.0f}s)")
    pipe = Pipeline(unet.requires_grad_(False), vae, text_encoder.eval().requires_grad_(False), tokenizer, dev,
                    torch.float32, {"motion_version": "v2"}, prediction_type=PREDICTION)
    train_s = round(time.time() - t0, 1)

    out = Path(out)
    save_pipeline(pipe, out)
    fast = steps == PRETRAIN_FAST
    shipped = load_pipeline(out, out / "motion_module.safetensors", device=dev, dtype="fp32", verbose=False)
    gates = measure_base(shipped, steps=4 if fast else None, log=log,
                         captions=[f"disc {MOTIONS[0]}", f"square {MOTIONS[-1]}"] if fast else None)
    files = {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file() and p.name != "build.json"}
    first_last = lambda v, k: [round(float(np.mean(v[:k])), 5), round(float(np.mean(v[-k:])), 5)]
    build = dict(seconds=train_s, seed=seed, threads=torch.get_num_threads(), steps=steps, lr=LR, batch=BATCH,
                 prediction_type=PREDICTION, mixed_noise=MIXED_NOISE, loss_weight="max(1, 1/SNR)",
                 i2v_fraction=I2V_FRACTION, shared_noise_mean=SHARED_MEAN, pool_frames=POOL, motion_clips=MOTION_POOL,
                 motion_captions=len(names), motion_window=list(UNET_CFG.motion_window),
                 losses=dict(vae=first_last(vae_losses, 5), unet=first_last(unet_losses, 5),
                             motion=first_last(motion_losses, 20)),
                 gates={k: v for k, v in gates.items() if not k.endswith("_rows")}, gate_rows=dict(
                     t2v=gates["t2v_rows"], i2v=gates["i2v_rows"]), gates_s=round(time.time() - t0 - train_s, 1),
                 bytes=sum(p.stat().st_size for p in files.values()),
                 sha256={k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()})
    (out / "build.json").write_text(json.dumps(build, indent=2))
    log(f"base written to {out}/ ({build['bytes'] / 2**20:.2f} MiB, {build['seconds']:.0f}s)")
    return dict(build=build, pipe=pipe, vae_losses=vae_losses, unet_losses=unet_losses, motion_losses=motion_losses)


# ----------------------------------------------------------------------------- the base's gates (build.json)
GATES = dict(vae_psnr=32.0, t2v_err=4.0, t2v_jitter=2.0, t2v_bg_psnr=30.0)  # issue: the base must pass these first


def place(path, g, size=SIZE):
    """a random start (2,) px that keeps the whole path (F,2) and the object inside the frame"""
    lo, hi = 0.14 * size - path.min(0).values, 0.86 * size - path.max(0).values
    return lo + (hi - lo).clamp(min=0) * torch.rand(2, generator=g)


def follow_scores(video, path, start=None):
    """a video that should follow a caption's path (F,2 from (0, 0)) -> track_errors against start + path (start:
    the reference's centroid; None, text-to-video: the track's own first point) and the background's PSNR over frames
    2..F against frame 1, on the pixels the tracked object never comes near"""
    track = centroid_track(video)
    start = track[0] if start is None else start
    _, errs = track_errors(video, start + path)
    return dict(errs, bg_psnr=background_psnr(video, video[0], track))


def vae_psnr(vae, n=256, seed=30_000):
    """PSNR (dB, [-1,1] range) of the VAE's reconstruction of n held-out frames: fresh looks and positions"""
    g = torch.Generator().manual_seed(seed)
    looks = [draw_look(g, ALL) for _ in range(n)]
    x = torch.cat([render(lk, lk["start"][None] * SIZE, SIZE) for lk in looks])
    dev = next(vae.parameters()).device
    with torch.no_grad():
        y = vae.decode(vae.encode(x.to(dev), chunk=64), chunk=64).float().cpu()
    return 10 * math.log10(4 / (y.clamp(-1, 1) - x).square().mean().item())


def measure_base(pipe, steps=None, seed=0, captions=None, log=print):
    """The gates: (a) VAE PSNR on held-out frames; (b) text-to-video (sample.animate without an image: every frame
    from noise, cross-frame attention off) on every generic motion, shapes in turn, scored against the caption's path
    from the track's first point; (c) the base in FLASH's image-to-video sampler (clean first frame, cross-frame
    attention) from a fresh look placed where the path fits, same captions: stated, not required to pass. Both
    sample as the demo does (SAMPLING, its STG and FreeInit included); (b) with the base's own noise prior."""
    steps = steps or SAMPLING["steps"]
    captions = captions or [f"{SHAPES[i % len(SHAPES)]} {m}" for i, m in enumerate(MOTIONS)]
    g, t2v, i2v = torch.Generator().manual_seed(40_000 + seed), [], []
    for i, caption in enumerate(tqdm(captions, desc="gates")):
        shape, motion = caption.split(" ", 1)
        path = motion_path(motion, FRAMES, SIZE)
        v = animate(pipe, None, f"a {caption}", frames=FRAMES, height=SIZE, width=SIZE, seed=seed + i,
                    progress=False, **T2V_NOISE, **{**SAMPLING, "steps": steps, "adain": "off"})
        t2v.append(dict(caption=caption, **follow_scores(to_tensor(v), path)))
        look = dict(draw_look(g, dict(ALL, shapes=(shape,))))
        start = place(path, g)
        ref = render(look, start[None], SIZE)[0]
        v = animate(pipe, ref, f"a {caption}", frames=FRAMES, height=SIZE, width=SIZE, seed=seed + i,
                    progress=False, **NOISE, **{**SAMPLING, "steps": steps})
        i2v.append(dict(caption=caption, **follow_scores(to_tensor(v), path, start)))
    mean = lambda rows: {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "caption"}
    r = dict(vae_psnr=vae_psnr(pipe.vae), t2v=mean(t2v), i2v=mean(i2v), t2v_rows=t2v, i2v_rows=i2v, steps=steps,
             stg=SAMPLING["stg"], freeinit=SAMPLING["freeinit"], t2v_noise=T2V_NOISE, i2v_noise=NOISE)
    r["passed"] = dict(vae_psnr=r["vae_psnr"] >= GATES["vae_psnr"], t2v_err=r["t2v"]["mean_err"] <= GATES["t2v_err"],
                       t2v_jitter=r["t2v"]["jitter"] <= GATES["t2v_jitter"],
                       t2v_bg_psnr=r["t2v"]["bg_psnr"] >= GATES["t2v_bg_psnr"])
    log(f"gates (STG {r['stg']:g}, FreeInit {r['freeinit']} passes, noise share {r['t2v_noise']['mixed_noise']:g} in "
        f"text-to-video, {r['i2v_noise']['mixed_noise']:g} in image-to-video): (a) VAE PSNR {r['vae_psnr']:.1f} dB (>= "
        f"{GATES['vae_psnr']}); (b) text-to-video on "
        f"{len(captions)} captions: mean err {r['t2v']['mean_err']:.2f} px (<= {GATES['t2v_err']}), jitter "
        f"{r['t2v']['jitter']:.2f} px (<= {GATES['t2v_jitter']}), background {r['t2v']['bg_psnr']:.1f} dB "
        f"(>= {GATES['t2v_bg_psnr']}); (c) image-to-video, before FLASH: mean err {r['i2v']['mean_err']:.2f} px, "
        f"jitter {r['i2v']['jitter']:.2f} px, background {r['i2v']['bg_psnr']:.1f} dB")
    return r


def check_base(base):
    if not (Path(base) / "build.json").is_file():
        raise FileNotFoundError(f"no toy base in {base}/: build it with `python demo.py pretrain --out {base}`")


def load_base(base, device):
    """the toy base through sample.py's loader (strict), exactly as SD-1.5 + mm_sd_v15_v2 would load"""
    check_base(base)
    return load_pipeline(base, Path(base) / "motion_module.safetensors", device=device, dtype="fp32", verbose=False)


# ----------------------------------------------------------------------------- FLASH stage + evaluation

def flash_args(base, out, flash, seed, device, **switches):
    """train.py's arguments for the demo's FLASH stage on top of `base`; switches: a VARIANTS entry"""
    a = T.get_parser().parse_args([])
    vars(a).update(stage="unet", steps=flash["steps"], lr=flash["lr"], timestep_alpha=flash["timestep_alpha"],
                   lr_schedule=flash["lr_schedule"], ema_decay=flash["ema_decay"], loss_weight=flash["loss_weight"],
                   frames=FRAMES, stride=1, height=SIZE, width=SIZE, seed=seed, device=str(device), dtype="fp32",
                   out=str(out), gradient_checkpointing=False, save_every=flash["steps"], keep=1,
                   log_every=max(1, flash["steps"] // 6), prompt=PROMPT, flip=False,  # the action goes right
                   mixed_noise=MIXED_NOISE,  # the base's own noise prior
                   base=str(base), motion_module=str(Path(base) / "motion_module.safetensors"), **switches)
    return a


def decoder_args(base, out, steps, seed, device):
    """train.py's arguments for variant #6's Detail Enhancement Decoder stage (Sec. 3.3) on the same clips"""
    a = T.get_parser().parse_args([])
    vars(a).update(stage="decoder", steps=steps, lr=DECODER["lr"], frames=FRAMES, stride=1, height=SIZE, width=SIZE,
                   seed=seed, device=str(device), dtype="fp32", out=str(out), gradient_checkpointing=False,
                   save_every=steps, keep=1, log_every=max(1, steps // 4), prompt=PROMPT, flip=False, base=str(base),
                   detail_full_res="on")
    return a


def val_loss(pipe, videos, ctx, n=4, ts=(250, 500, 750)):
    """FLASH's eps-MSE (frames 2..N) on the first n training clips at fixed timesteps and noise: a smooth measure of
    what the U-Net has learnt (the training loss draws one random t per step, far too noisy to compare)."""
    g, acp, losses = torch.Generator().manual_seed(0), alphas_cumprod().to(pipe.device), []
    no_autocast = torch.autocast(pipe.device.type, enabled=False)
    with torch.no_grad():
        for v in videos[:n]:
            x = to_tensor(v.frames[:FRAMES]).to(pipe.device)
            lat = pipe.vae.encode(x).transpose(0, 1)[None]  # F 4 h w -> 1 4 F h w
            for t in ts:
                noise = video_noise(lat.shape, g, MIXED_NOISE).to(pipe.device)
                losses.append(T.unet_loss(pipe.unet, lat, t, noise, ctx, acp, no_autocast,
                                          pipe.prediction_type).item())
    return float(np.mean(losses))


def evaluate(pipe, refs, starts, seed, out, steps, detail=True):
    """animate every reference with sample.py's code path, save GIF + MP4, score each video (and the static floor:
    the reference repeated) -> (videos, summary, static summary)"""
    out.mkdir(parents=True, exist_ok=True)
    videos, scores, static = [], [], []
    for i in tqdm(range(len(refs)), desc="animate"):
        v = animate(pipe, refs[i], PROMPT, frames=FRAMES, height=SIZE, width=SIZE, seed=seed + i, progress=False,
                    detail=detail, **NOISE, **{**SAMPLING, "steps": steps})
        write_video(v, out / f"ref{i}.gif", FPS)
        write_video(v, out / f"ref{i}.mp4", FPS)
        x = to_tensor(v)
        videos.append(v)
        gt = demo_trajectory(starts[i], FRAMES, SIZE)
        scores.append({**score(x, starts[i]), "bg_psnr": background_psnr(x, refs[i], gt)})
        static.append(score(x[:1].expand_as(x), starts[i]))
    return videos, summary(scores), summary(static)


def demo_gif(clips, base_videos, flash_videos, path, rows=3, scale=3):
    """the README's picture: per row a training clip, the base alone and FLASH on a held-out reference, upscaled"""
    up = lambda v: np.asarray(v).repeat(scale, 1).repeat(scale, 2)  # F H W 3, nearest
    grid = np.concatenate([np.concatenate([up(c), up(b), up(f)], 2)
                           for c, b, f in list(zip(clips, base_videos, flash_videos))[:rows]], 1)
    head = Image.new("RGB", (grid.shape[2], 14 * scale // 2 + 6), (255, 255, 255))
    draw, w = ImageDraw.Draw(head), SIZE * scale
    for k, text in enumerate(("training clip", "base alone (held-out)", "FLASH (held-out)")):
        draw.text((k * w + 6, 4), text, fill=(0, 0, 0))
    head = np.broadcast_to(np.asarray(head), (len(grid), *np.asarray(head).shape))
    write_video(np.ascontiguousarray(np.concatenate([head, grid], 1)), path, FPS)


def run(args, seed, variants, out, log):
    """one seed: the base's own animation, then each variant's FLASH stage from the same base, same references;
    #6 adds the Detail Enhancement Decoder to #5's U-Net"""
    t_start = time.time()
    flash = FLASH_FAST if args.fast else FLASH
    flash = dict(flash, steps=args.flash_steps) if args.flash_steps else flash
    n_refs, sample_steps = (2, 4) if args.fast else (N_REFS, SAMPLING["steps"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pipe = load_base(args.base, args.device)
    clips, _ = make_demo_clips(N_CLIPS, FRAMES, SIZE, seed=seed)
    sets = {"held_out": make_demo_references(n_refs, SIZE, seed=1000 + seed),
            "diagnostic": make_demo_references(n_refs, SIZE, seed=2000 + seed, ranges=DEMO_DIAG)}
    videos = [data.Video(f"demo/clip_{i:02d}", data.to_uint8(c), float(FPS), PROMPT) for i, c in enumerate(clips)]
    Image.fromarray(data.to_uint8(sets["held_out"][0][0][None])[0]).save(out / "reference.png")
    log(f"seed {seed}: {N_CLIPS} clips of '{PROMPT}' (red/orange discs on blue), {n_refs} held-out references "
        f"(green squares and diamonds on purple) + {n_refs} diagnostic (also unseen start positions)")
    ctx = encode_prompt(pipe, [PROMPT])
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    results, shown = {}, {}

    def score_sets(key, folder, detail=True):
        for name, (refs, starts) in sets.items():
            vids, results.setdefault(name, {})[key], static = evaluate(pipe, refs, starts, seed, out / folder / name,
                                                                      sample_steps, detail)
            results[name].setdefault("static", static)
            shown.setdefault(key, vids) if name == "held_out" else None

    score_sets("base", "base")
    val, walls = {"base": val_loss(pipe, videos, ctx)}, {}
    for key in [k for k in variants if k != "#6"]:
        name, label, switches = VARIANTS[key]
        t0 = time.time()
        pipe.unet.load_state_dict(base_state)
        log(f"{key} {label}: FLASH stage, {flash['steps']} steps")
        T.train(flash_args(args.base, out / name, flash, seed, args.device, **switches), pipe, videos,
                [ctx.cpu()] * len(videos), log=log)
        val[key] = val_loss(pipe, videos, ctx)
        score_sets(key, name, detail=False)
        walls[key] = round(time.time() - t0, 1)
        r = results["held_out"][key]
        log(f"{key}: validation loss {val['base']:.4f} -> {val[key]:.4f}; held-out mean err {r['mean_err']:.2f} px, "
            f"performs {r['performs']:.0%}; diagnostic {results['diagnostic'][key]['mean_err']:.2f} px "
            f"({walls[key]:.0f}s)")
        if key == "#5" and "#6" in variants:  # Sec. 3.3 on top of #5's U-Net
            t0 = time.time()
            name6 = VARIANTS["#6"][0]
            steps6 = DECODER["steps_fast"] if args.fast else DECODER["steps"]
            log(f"#6 {VARIANTS['#6'][1]}: decoder stage, {steps6} steps")
            unet_vae = pipe.vae
            pipe.vae = load_vae(args.base, **detail_overrides(dict(detail_full_res="on"))).to(args.device)
            T.train(decoder_args(args.base, out / name6, steps6, seed, args.device), pipe, videos, None, log=log)
            pipe.vae.eval()
            score_sets("#6", name6)
            pipe.vae = unet_vae
            walls["#6"] = round(time.time() - t0, 1) + walls["#5"]
    if "#5" in shown:
        contact_sheet([data.to_uint8(clips[0]), *shown["#5"]], out / "flash_contact_sheet.png")
        demo_gif([data.to_uint8(c) for c in clips], shown["base"], shown["#5"], out / "demo.gif")
    report = dict(seed=seed, wall_s=round(time.time() - t_start, 1), variant_wall_s=walls, prompt=PROMPT,
                  flash=flash, sampling={**SAMPLING, "steps": sample_steps, **NOISE},
                  n_clips=N_CLIPS, n_refs=n_refs, motion=dict(dx_px=DISP, jump_px=JUMP, frames=FRAMES, size=SIZE),
                  performs_rule="end_err < dx/3 and |peak - jump| < jump/3", validation_loss=val,
                  variants={k: VARIANTS[k][1] for k in variants}, **results["held_out"],
                  diagnostic=results["diagnostic"])
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    return report, pipe


ROWS = [("#6", "#5 + decoder (#6)"), ("#5", "FLASH (#5)"), ("#2", "strong aug only (#2)"),
        ("#1", "no strong aug (#1)"), ("base", "base, no FLASH"), ("static", "static floor")]


def print_table(reports, part=None):
    """mean ± spread (half the range) over the seeds' reports; part: "diagnostic" for that row set"""
    reports = [r[part] | {"seed": r["seed"]} if part else r for r in reports]
    seeds = [r["seed"] for r in reports]
    n = len(reports[0]["static"]["per_reference"])
    print(f"\n{n} {part or 'held-out'} references x seeds {seeds} (px; the object moves {DISP:.1f} px right, jumps "
          f"{JUMP:.1f} px; background PSNR in dB)")
    cols = ["mean_err", "end_err", "peak_err", "jitter", "performs", "bg_psnr"]
    print(f"{'':22s}" + "".join(f"{c:>15s}" for c in cols))
    table = {}
    for key, label in ROWS:
        if key not in reports[0]:
            continue
        row = {}
        for c in cols:
            v = [float(r[key][c]) for r in reports if c in r[key]]
            if v:
                row[c] = dict(mean=float(np.mean(v)), spread=float(np.ptp(v) / 2), per_seed=v)
        table[key] = row
        cell = lambda c: (f"{row[c]['mean']:>9.2f} ±{row[c]['spread']:4.2f}" if c in row else f"{'-':>15s}")
        print(f"{label:22s}" + "".join(cell(c) for c in cols))
    return table


def get_parser():
    p = argparse.ArgumentParser(description="FLASH toy demo on a CPU: few-shot FLASH on top of a toy SD + AnimateDiff "
                                            "base (demo_base/), held-out references animated and scored. "
                                            "`python demo.py pretrain` rebuilds the base.")
    p.add_argument("--fast", action="store_true", help="a few steps of everything (the test suite's smoke run)")
    p.add_argument("--ablation", action="store_true",
                   help="Table 2: variants #1, #2, #5 and #6 (the detail decoder) per seed (default seeds 0 1 2)")
    p.add_argument("--check-base", action="store_true",
                   help="only re-measure the base's gates (VAE PSNR, text-to-video, image-to-video) and compare them "
                        "with the ones its build.json recorded")
    p.add_argument("--flash-steps", type=int, help=f"steps of the FLASH stage (default {FLASH['steps']}; 1200: lower "
                   "error and jitter on seeds 0-2, fewer actions performed, ~10 min; docs/demo.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="several seeds, one run each (default: --seed; 0 1 2 with "
                                                       "--ablation)")
    p.add_argument("--base", default=str(BASE), help="toy base folder (default: the shipped demo_base/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--long", action="store_true", help="then measure 64-frame videos and loops (sample.py --long)")
    return p


def check_gates(args, log):
    """--check-base: the gates measured again on the base as shipped, beside build.json's"""
    pipe = load_base(args.base, args.device)
    built = json.loads((Path(args.base) / "build.json").read_text()).get("gates", {})
    r = measure_base(pipe, steps=4 if args.fast else None, seed=args.seed, log=log,
                     captions=[f"disc {MOTIONS[0]}", f"square {MOTIONS[-1]}"] if args.fast else None)
    for k in ("t2v_rows", "i2v_rows"):
        r.pop(k)
    if built:
        log(f"build.json recorded (STG {built.get('stg', 0):g}, FreeInit {built.get('freeinit', 1)}): VAE "
            f"{built['vae_psnr']:.1f} dB, text-to-video {built['t2v']['mean_err']:.2f} px "
            f"/ jitter {built['t2v']['jitter']:.2f} px / {built['t2v']['bg_psnr']:.1f} dB, image-to-video "
            f"{built['i2v']['mean_err']:.2f} px; passed {built['passed']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gates.json").write_text(json.dumps(dict(measured=r, build=built), indent=2))
    return r


def main(argv=None):
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["pretrain"]:
        return pretrain_main(raw[1:])
    args = get_parser().parse_args(raw)
    check_base(args.base)  # before anything is written
    torch.set_num_threads(args.threads)
    t_start = time.time()
    log = lambda msg: print(f"[demo {time.time() - t_start:6.1f}s] {msg}", flush=True)
    if args.check_base:
        return check_gates(args, log)
    seeds = args.seeds or ([0, 1, 2] if args.ablation else [args.seed])
    variants = ["#1", "#2", "#5", "#6"] if args.ablation else ["#5"]
    log(f"FLASH toy demo: seeds {seeds}, variants {variants}, {torch.get_num_threads()} thread(s), output {args.out}/")
    reports = []
    for seed in seeds:
        out = Path(args.out) / (f"seed{seed}" if len(seeds) > 1 else "")
        report, pipe = run(args, seed, variants, out, log)
        reports.append(report)
    table, diagnostic = print_table(reports), print_table(reports, "diagnostic")
    wall = time.time() - t_start
    if args.ablation:
        (Path(args.out) / "ablation.json").write_text(json.dumps(dict(seeds=seeds, wall_s=round(wall, 1), table=table,
                                                                       diagnostic=diagnostic, runs=reports), indent=2))
    last = Path(args.out) / (f"seed{seeds[-1]}" if len(seeds) > 1 else "")
    log(f"done in {wall:.0f}s: {last}/scores.json, {last}/demo.gif. Animate your own image with the demo model:\n"
        f"python sample.py --base {args.base} --motion-module {args.base}/motion_module.safetensors "
        f"--checkpoint {last}/flash --image {last}/reference.png --seed {seeds[-1]} --out {last}/cli_sample.mp4"
        + f" --mixed-noise {SAMPLE_SHARE:g}" + (" --shared-noise-mean" if SHARED_MEAN else "")  # as the demo samples
        + f" --stg {SAMPLING['stg']:g} --freeinit {SAMPLING['freeinit']}"
        + " --freeinit-fast" * SAMPLING["freeinit_fast"])
    result = dict(report=reports[-1], reports=reports, table=table, diagnostic=diagnostic, pipe=pipe, out=last,
                  wall_s=wall)
    if args.long:
        refs, starts = make_demo_references(2 if args.fast else N_REFS, SIZE, seed=1000 + seeds[-1])
        result["long"] = measure_long(pipe, refs, starts, last, *((20, 2) if args.fast else ()), seed=seeds[-1])
    return result


def pretrain_main(argv):
    p = argparse.ArgumentParser(prog="demo.py pretrain", description="build the toy base (SD-1.5 + AnimateDiff "
                                "layouts) the demo starts from, then measure its gates into build.json")
    p.add_argument("--fast", action="store_true", help="a few steps of each stage (the test suite's smoke run)")
    p.add_argument("--out", default=str(BASE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda msg: print(f"[pretrain {time.time() - t0:6.1f}s] {msg}", flush=True)
    return build_base(args.out, PRETRAIN_FAST if args.fast else PRETRAIN, args.seed, args.device, log)


# ----------------------------------------------------------------------------- longer and looping videos
# `python demo.py --long`: after the demo, sample.py's --long modes and --loop on the trained toy model (README,
# "Longer and looping videos"). Joins: the transitions between 16-frame segments (frames 16|17, 31|32, ...).
from sample import ADAIN_MODES, LONG_MODES  # noqa: E402 (this section's own import)

def frame_steps(video):
    """uint8 (F,H,W,3) -> (F-1,) mean absolute pixel difference between consecutive frames"""
    v = video.astype(np.float32)
    return np.abs(v[1:] - v[:-1]).mean((1, 2, 3))


def seam_ratio(video):
    """||frame_N - frame_1|| / mean ||frame_i+1 - frame_i|| (mean absolute pixel differences): about 1 when the
    wrap-around looks like any other step, 0 when the last frame repeats the first"""
    v = video.astype(np.float32)
    return float(np.abs(v[-1] - v[0]).mean() / frame_steps(video).mean())


def join_ratio(video, segment=FRAMES - 1):
    """mean frame-to-frame difference at the segment joins / elsewhere (1 = the joins are invisible)"""
    d = frame_steps(video)
    joins = np.zeros(len(d), bool)
    joins[segment::segment] = True
    return float(d[joins].mean() / d[~joins].mean())


def colour_drift(video):
    """mean over frames 2..N of the largest per-channel mean difference to frame 1, in pixel levels"""
    m = video.astype(np.float32).mean((1, 2))
    return float(np.abs(m[1:] - m[:1]).max(1).mean())


def measure_long(pipe, refs, starts, out, frames=64, steps=None, seed=0):
    """Each reference: a 16-frame video per AdaIN mode, a `frames`-frame video per --long mode, 16-frame loops
    (gradient through x0 / through the U-Net) and a `frames`-frame windows loop. Prints and returns the table."""
    steps = steps or SAMPLING["steps"]
    out = Path(out) / "long"
    out.mkdir(parents=True, exist_ok=True)
    runs = [("16 frames", dict(frames=FRAMES)),
            *[(f"16, adain {m}", dict(frames=FRAMES, adain=m)) for m in ADAIN_MODES if m != SAMPLING["adain"]],
            *[(f"{frames}, {m}", dict(frames=frames, long=m)) for m in LONG_MODES],
            ("16, loop (x0)", dict(frames=FRAMES, loop=True)),
            ("16, loop (unet)", dict(frames=FRAMES, loop=True, loop_grad="unet")),
            (f"{frames}, windows, loop", dict(frames=frames, long="windows", loop=True))]
    rows = {name: [] for name, _ in runs}
    for i in tqdm(range(len(refs)), desc="long videos"):
        for j, (name, kw) in enumerate(runs):
            t0 = time.time()
            v = animate(pipe, refs[i], PROMPT, height=SIZE, width=SIZE, seed=seed + i, progress=False,  # FreeInit
                        **NOISE, **{**SAMPLING, "steps": steps, "freeinit": 1, **kw})  # re-samples one window only
            secs = time.time() - t0
            if i == 0:  # the first reference's videos, numbered as the table's rows
                write_video(v, out / f"ref0_row{j}.gif", FPS)
            rows[name].append(dict(s_per_frame=secs / len(v), join_ratio=join_ratio(v) if len(v) > FRAMES else None,
                                   seam_ratio=seam_ratio(v), colour_drift=colour_drift(v),
                                   mean_err=score(to_tensor(v[:FRAMES]), starts[i])["mean_err"]))
    base = np.mean([r["s_per_frame"] for r in rows["16 frames"]])
    table = {name: {k: (float(np.mean([r[k] for r in rs])) if rs[0][k] is not None else None) for k in rs[0]}
             for name, rs in rows.items()}
    print(f"\nlonger and looping videos, {len(refs)} held-out references, {steps} DDIM steps (mean over references)")
    print(f"{'':22s}{'join ratio':>11s}{'seam ratio':>11s}{'err 1-16':>10s}{'colour':>8s}{'s/frame vs 16':>15s}")
    for name, r in table.items():
        r["time_vs_16"] = r["s_per_frame"] / base
        join = f"{r['join_ratio']:11.2f}" if r["join_ratio"] is not None else f"{'-':>11s}"
        print(f"{name:22s}{join}{r['seam_ratio']:11.2f}{r['mean_err']:10.2f}{r['colour_drift']:8.2f}"
              f"{r['time_vs_16']:15.2f}")
    (out / "long_scores.json").write_text(json.dumps(dict(frames=frames, steps=steps, table=table, per_reference=rows),
                                                     indent=2))
    return table


if __name__ == "__main__":
    data.plain_warnings()
    try:
        main()
    except (OSError, ValueError) as e:  # a missing or broken base, an unwritable --out: one line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
