"""Embedded FLASH demo (arXiv 2503.00276): `python demo.py` learns a toy action on a CPU, no downloads.
A miniature of the paper's setting: (1) the "pretrained base" (what SD-1.5 gives FLASH) is a tiny VAE and a tiny image
U-Net trained briefly on single frames of EVERY appearance, plus a tiny random frozen text encoder; (2) FLASH Sec. 3.2
(train.train, the full recipe) teaches zero-initialised motion modules "a disc jumps to the right" from N_CLIPS
generated clips of restricted colours and positions; (3) sample.animate animates held-out references (colours,
backgrounds, positions never seen in training); the disc's centroid track is scored against the trained motion.
"""
import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import train as T
from clip_text import CLIPTextConfig, CLIPTextModel, Tokenizer, byte_vocab
from model import UNet, UNetConfig
from data import tqdm, write_video
from sample import Pipeline, alphas_cumprod, animate, encode_prompt, save_pipeline
from vae import VAE, VAEConfig

# ----------------------------------------------------------------------------- demo settings
SIZE, FRAMES, FPS = 64, 16, 8
PROMPT = "a disc jumps to the right"
N_CLIPS, N_REFS, POOL = 16, 6, 1024  # training clips (FLASH: <= 16), held-out references, pretraining frames
ALL = dict(hue=(0.0, 1.0), bg_hue=(0.0, 1.0), x=(0.1, 0.9), y=(0.1, 0.9))  # pretraining: any look, anywhere
VAE_CFG = VAEConfig(block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=1)  # 64x64 -> 4x16x16
LATENT_STD = 1.0  # latent std, as SD's 0.18215 gives
TEXT_CFG = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2)
UNET_CFG = UNetConfig(block_out_channels=(32, 32, 64), layers_per_block=1, attention_heads=2, cross_attention_dim=32,
                      norm_num_groups=8, down_attention=(False, True, True), motion_max_len=32)  # latents 16, 8, 4
STEPS = dict(vae=200, unet=600, flash=900)  # full demo
FAST = dict(vae=12, unet=12, flash=10)  # --fast: the test suite's smoke run
LR = dict(vae=4e-4, unet=3e-3, flash=1e-3)  # flash 3e-3: the validation loss at t = 100 rose (measured)
# FLASH favours large t (ReVersion's p(t) ∝ 1 - alpha cos(pi t/T)); the toy takes the strongest alpha. Why: layout and
# motion are decided at large t, where the eps-MSE barely sees them (base model at t = 950: 0.0077); measured on
# held-out references after 900 steps, mean error 10.75 px with alpha 1 vs 14.1 px with alpha 0.5 (floor 17.2)
TIMESTEP_ALPHA = 1.0
# Tuning notes (one-thread runs, held-out mean error in px, static floor 17.2): alpha 0.5 after 1000 / 2000 / 3000 steps
# 14.5 / 15.4 / 8.2 (33 % perform at 3000; training clips 5.1); a (t/T)^2 bias 13.4 (750 steps) / 12.3 (1500); 8-frame
# clips are 2x cheaper per step but not better per second (13.2 at 1800 steps); a radius-0.15 disc 13.3 (750); guidance
# 1-7.5 and LAMP's shared noise 0.2-0.5 do not change the picture; with adain=False every frame takes a random colour.
BATCH = dict(vae=16, unet=32)
SAMPLING = dict(steps=25, guidance=7.5, adain="lamp")  # sample.py's defaults (FLASH A3.2)
THREADS = 2  # idle 2-core CPU: 0.24 s per FLASH step with two threads, 0.42 s with one (measured)


# ----------------------------------------------------------------------------- the toy action
# synthetic demo action: a disc jumps up and lands further right (an arc), on a plain or two-tone background.
# Training clips and test references draw appearance and start position from DISJOINT ranges:
#   object hue: train [0.00,0.12] (red/orange)  refs [0.30,0.45] (green)
#   background hue: train [0.55,0.70] (blue)    refs [0.75,0.92] (purple)
#   start x / size: train [0.12,0.28]           refs [0.34,0.44]      (start y / size [0.62,0.76] for both)
DEMO_TRAIN = dict(hue=(0.0, 0.12), bg_hue=(0.55, 0.70), x=(0.12, 0.28), y=(0.62, 0.76))
DEMO_REF = dict(hue=(0.30, 0.45), bg_hue=(0.75, 0.92), x=(0.34, 0.44), y=(0.62, 0.76))
DEMO_RADIUS, DEMO_DX, DEMO_JUMP = 0.1, 0.3, 0.3  # fractions of the frame size
DISP, JUMP = DEMO_DX * SIZE, DEMO_JUMP * SIZE  # the trained motion: 19.2 px right, 19.2 px up and down


def demo_trajectory(start, frames=16, size=64):
    """expected centroid (F,2) as (x, y) pixels: moves DEMO_DX*size right while jumping DEMO_JUMP*size up and down"""
    u = torch.linspace(0, 1, frames)
    x0, y0 = float(start[0]), float(start[1])
    return torch.stack([x0 + DEMO_DX * size * u, y0 - DEMO_JUMP * size * torch.sin(math.pi * u)], -1)


def _hsv(h, s, v):
    return data.hsv_to_rgb(torch.tensor([h, s, v]).view(3, 1, 1)).view(3)


def _demo_sample(g, r, frames, size):
    u = lambda lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * float(torch.rand((), generator=g))
    obj = _hsv(u(r["hue"]), u((0.7, 0.9)), u((0.85, 1.0)))
    hb, sb, vb = u(r["bg_hue"]), u((0.2, 0.5)), u((0.15, 0.35))
    bg1 = _hsv(hb, sb, vb)
    bg2 = _hsv(hb, sb, vb + u((0.05, 0.1))) if float(torch.rand((), generator=g)) < 0.5 else bg1  # two-tone: a lighter band
    split = round(u((0.3, 0.7)) * size)
    start = torch.tensor([u(r["x"]) * size, u(r["y"]) * size])
    traj = demo_trajectory(start, frames, size)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    bg = torch.where(yy < split, bg1.view(3, 1, 1), bg2.view(3, 1, 1))  # 3 S S
    dist = ((xx - traj[:, 0, None, None]) ** 2 + (yy - traj[:, 1, None, None]) ** 2).sqrt()  # F S S
    a = (DEMO_RADIUS * size + 0.5 - dist).clamp(0, 1).unsqueeze(1)  # antialiased disc coverage, F 1 S S
    return (bg * (1 - a) + obj.view(3, 1, 1) * a) * 2 - 1, traj


def make_demo_clips(n, frames=16, size=64, seed=0):
    """-> (clips: list of (F,3,size,size) in [-1,1], trajectories: list of (F,2) ground-truth centroids)"""
    g = torch.Generator().manual_seed(seed)
    out = [_demo_sample(g, DEMO_TRAIN, frames, size) for _ in range(n)]
    return [c for c, _ in out], [t for _, t in out]


def make_demo_references(n, size=64, seed=1000):
    """-> (images: list of (3,size,size) in [-1,1], starts: list of (2,) (x, y) pixels), unseen appearances"""
    g = torch.Generator().manual_seed(seed)
    out = [_demo_sample(g, DEMO_REF, 1, size) for _ in range(n)]
    return [c[0] for c, _ in out], [t[0] for _, t in out]


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
    H, W = m.shape[-2:]
    n = m.sum((1, 2))
    cx = (m * torch.arange(W).to(m)).sum((1, 2)) / n
    cy = (m * torch.arange(H).to(m).view(H, 1)).sum((1, 2)) / n
    return torch.stack([cx, cy], -1)  # n = 0 gives NaN


# ----------------------------------------------------------------------------- scoring

def score(video, start):
    """video (F,3,H,W) in [-1,1] -> errors in px of the disc's centroid track against demo_trajectory(start).
    A frame where no disc is found counts as an error of the frame size. Performs the motion: endpoint error below
    a third of the displacement and jump height within a third of the true one."""
    gt = demo_trajectory(start, len(video), video.shape[-1])
    track = centroid_track(video)
    err = (track - gt).norm(dim=-1).nan_to_num(float(video.shape[-1]))[1:]  # frames 2..F
    ys = track[:, 1][~track[:, 1].isnan()]
    peak = (track[0, 1] - ys.min()).item() if len(ys) else 0.0
    peak_err = abs(peak - (gt[0, 1] - gt[:, 1].min()).item())
    return dict(mean_err=err.mean().item(), end_err=err[-1].item(), peak_err=peak_err,
                performs=bool(err[-1] < DISP / 3 and peak_err < JUMP / 3))


def summary(scores):
    return dict(mean_err=float(np.mean([s["mean_err"] for s in scores])),
                end_err=float(np.mean([s["end_err"] for s in scores])),
                peak_err=float(np.mean([s["peak_err"] for s in scores])),
                performs=float(np.mean([s["performs"] for s in scores])), per_reference=scores)


def to_tensor(frames):  # uint8 (F,H,W,3) -> (F,3,H,W) in [-1,1]
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def contact_sheet(videos, path):
    """rows = videos (uint8 (F,H,W,3)), columns = frames"""
    Image.fromarray(np.concatenate([np.concatenate(list(v), axis=1) for v in videos], axis=0)).save(path)


# ----------------------------------------------------------------------------- the "pretrained" base model

def cosine_lr(opt, lr, step, steps):
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))


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
        cosine_lr(opt, LR["vae"], i, steps)
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


def pretrain_unet(latents, ctx, steps, gen, dev):
    """SD's role: an image U-Net (no motion modules) learns eps-prediction on single frames, caption dropped 10 %
    (so classifier-free guidance has an unconditional branch); then the motion modules are inserted (AnimateDiff)."""
    image_unet = UNet(replace(UNET_CFG, motion_modules=False)).to(dev)
    opt = torch.optim.AdamW(image_unet.parameters(), lr=LR["unet"], weight_decay=0.0)
    acp, losses = alphas_cumprod().to(dev), []
    for i in tqdm(range(steps), desc="pretrain U-Net"):
        cosine_lr(opt, LR["unet"], i, steps)
        z0 = latents[torch.randint(len(latents), (BATCH["unet"],), generator=gen)].to(dev)[:, :, None]  # B 4 1 h w
        t = torch.randint(len(acp), (len(z0),), generator=gen).to(dev)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        a = acp[t].view(-1, 1, 1, 1, 1)
        drop = (torch.rand(len(z0), generator=gen) < 0.1).to(dev).view(-1, 1, 1)
        loss = F.mse_loss(image_unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, torch.where(drop, ctx[0], ctx[1])),
                          noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    unet = UNet(UNET_CFG).to(dev)
    missing, unexpected = unet.load_state_dict(image_unet.state_dict(), strict=False)
    assert not unexpected and all("motion_modules." in k for k in missing)
    return unet.eval(), losses


def zero_motion_modules(unet):
    """AnimateDiff starts its motion modules as the identity: temporal_transformer.proj_out = 0."""
    for name, p in unet.named_parameters():
        if "temporal_transformer.proj_out." in name:
            torch.nn.init.zeros_(p)


# ----------------------------------------------------------------------------- FLASH stage + evaluation

def flash_args(args, out, steps, align):
    """train.py's arguments for the demo's FLASH stage; align=False is Table 2's variant #2 (strong aug only)."""
    a = T.get_parser().parse_args([])
    vars(a).update(stage="unet", steps=steps, lr=LR["flash"], frames=FRAMES, height=SIZE, width=SIZE, seed=args.seed,
                   device=args.device, dtype="fp32", out=str(out), gradient_checkpointing=False, save_every=steps,
                   keep=1, log_every=max(1, steps // 6), prompt=PROMPT, flip=False, motion_align=align,
                   corr_align=align, timestep_alpha=TIMESTEP_ALPHA, base=str(out.parent / "pipeline"),
                   motion_module=str(out.parent / "pipeline" / "motion_module.safetensors"))
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
                noise = torch.randn(lat.shape, generator=g).to(pipe.device)
                losses.append(T.unet_loss(pipe.unet, lat, t, noise, ctx, acp, no_autocast).item())
    return float(np.mean(losses))


def evaluate(pipe, refs, starts, seed, out, steps):
    """animate every reference with sample.py's code path, save GIF + MP4, score each video and its static floor"""
    out.mkdir(parents=True, exist_ok=True)
    videos, scores, static = [], [], []
    for i in tqdm(range(len(refs)), desc="animate"):
        v = animate(pipe, refs[i], PROMPT, frames=FRAMES, height=SIZE, width=SIZE, seed=seed + i, progress=False,
                    **{**SAMPLING, "steps": steps})
        write_video(v, out / f"ref{i}.gif", FPS)
        write_video(v, out / f"ref{i}.mp4", FPS)
        x = to_tensor(v)
        videos.append(v)
        scores.append(score(x, starts[i]))
        static.append(score(x[:1].expand_as(x), starts[i]))  # floor: frame 1 repeated
    return videos, summary(scores), summary(static)


def run(args):
    t_start = time.time()
    log = lambda msg: print(f"[demo {time.time() - t_start:6.1f}s] {msg}", flush=True)
    torch.set_num_threads(THREADS)
    steps = FAST if args.fast else STEPS
    n_refs, sample_steps = (2, 4) if args.fast else (N_REFS, SAMPLING["steps"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log(f"FLASH toy demo: seed {args.seed}, device {dev}, {torch.get_num_threads()} thread(s), output {out}/")

    # data: generated clips of the action (restricted looks) and held-out references (unseen looks)
    clips, _ = make_demo_clips(N_CLIPS, FRAMES, SIZE, seed=args.seed)
    refs, starts = make_demo_references(n_refs, SIZE, seed=1000 + args.seed)
    videos = [data.Video(f"demo/clip_{i:02d}", data.to_uint8(c), float(FPS), PROMPT) for i, c in enumerate(clips)]
    pool = torch.cat([_demo_sample(gen, ALL, 1, SIZE)[0] for _ in range(POOL)])
    pool[::2] = torch.cat([data.strong_augment(f[None], gen) for f in pool[::2]])  # the looks FLASH's aug makes
    log(f"data: {N_CLIPS} clips {FRAMES}x{SIZE}x{SIZE} '{PROMPT}', {n_refs} held-out references, {POOL} frames")

    # (1) the base model FLASH starts from
    tok = Tokenizer(*byte_vocab())
    text_encoder = CLIPTextModel(TEXT_CFG).to(dev).eval().requires_grad_(False)
    vae, vae_losses = pretrain_vae(pool, steps["vae"], gen, dev)
    log(f"VAE: loss {np.mean(vae_losses[:5]):.4f} -> {np.mean(vae_losses[-5:]):.4f}, "
        f"latent scale {vae.config.scaling_factor:.3f}")
    pipe = Pipeline(None, vae, text_encoder, tok, dev, torch.float32, {"motion_version": "v2"})
    ctx = encode_prompt(pipe, ["", PROMPT])
    with torch.no_grad():
        latents = vae.encode(pool.to(dev), chunk=64)
    pipe.unet, unet_losses = pretrain_unet(latents, ctx, steps["unet"], gen, dev)
    log(f"image U-Net: loss {np.mean(unet_losses[:5]):.4f} -> {np.mean(unet_losses[-5:]):.4f}")
    zero_motion_modules(pipe.unet)
    save_pipeline(pipe, out / "pipeline")
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref_png = out / "reference.png"
    Image.fromarray(data.to_uint8(refs[0][None])[0]).save(ref_png)

    # (2) FLASH, and (3) animation of the held-out references; the ablation re-trains from the same base
    embeds = [ctx[1:].cpu()] * len(videos)
    variants = [("flash", True)] + ([("ablation", False)] if args.ablation else [])
    results, val = {}, {"before": val_loss(pipe, videos, ctx[1:])}
    for name, align in variants:
        pipe.unet.load_state_dict(base_state)
        targs = flash_args(args, out / name, steps["flash"], align)
        log(f"FLASH stage ({'strong aug + motion align + corr align' if align else 'strong aug only, no alignment'})")
        history = T.train(targs, pipe, videos, embeds, log=log)
        pipe.unet.eval()
        val[name] = val_loss(pipe, videos, ctx[1:])
        if name == "flash":
            flash_history, flash_state = history, {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        log(f"{name}: validation loss (4 training clips, t = 250/500/750) {val['before']:.4f} -> {val[name]:.4f}")
        gen_videos, scores, static = evaluate(pipe, refs, starts, args.seed, out / name, sample_steps)
        contact_sheet([data.to_uint8(clips[0])] + gen_videos, out / f"{name}_contact_sheet.png")
        results[name], results["static"] = scores, static
        log(f"{name}: animated {len(refs)} references -> {out / name}/ref*.gif|mp4, {name}_contact_sheet.png "
            f"(top row: a training clip)")

    # report
    rows = [("FLASH", "flash"), ("no alignment (#2)", "ablation"), ("static floor", "static")]
    print(f"\nmotion score on {n_refs} held-out references (px; disc moves {DISP:.1f} px right, jumps {JUMP:.1f} px)")
    print(f"{'':20s}{'mean err':>10s}{'end err':>10s}{'peak err':>10s}{'performs':>10s}")
    for label, key in rows:
        if key in results:
            r = results[key]
            print(f"{label:20s}{r['mean_err']:10.2f}{r['end_err']:10.2f}{r['peak_err']:10.2f}{r['performs']:10.0%}")
    wall = time.time() - t_start
    report = dict(seed=args.seed, wall_s=round(wall, 1), prompt=PROMPT, steps=steps, sampling=SAMPLING,
                  timestep_alpha=TIMESTEP_ALPHA, n_clips=N_CLIPS, n_refs=n_refs,
                  motion=dict(dx_px=DISP, jump_px=JUMP, frames=FRAMES, size=SIZE),
                  performs_rule="end_err < dx/3 and |peak - jump| < jump/3", validation_loss=val, **results)
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    adain = "" if SAMPLING["adain"] else " --no-adain"
    log(f"done in {wall:.0f}s: {out}/scores.json. Animate your own image with the demo model:\n"
        f"python sample.py --base {out}/pipeline --motion-module {out}/pipeline/motion_module.safetensors "
        f"--checkpoint {out}/flash --image {ref_png} --guidance {SAMPLING['guidance']}{adain} --seed 0 "
        f"--out {out}/cli_sample.mp4")
    pipe.unet.load_state_dict(flash_state)  # the FLASH model (what out/pipeline + out/flash hold)
    return dict(report=report, vae_losses=vae_losses, unet_losses=unet_losses, flash_history=flash_history,
                flash_val_loss=dict(before=val["before"], after=val["flash"]), pipe=pipe, out=out)


def main(argv=None):
    p = argparse.ArgumentParser(description="FLASH toy demo on a CPU: learn a toy action from 16 generated clips, "
                                            "animate held-out references, score the motion.")
    p.add_argument("--fast", action="store_true", help="a few steps of everything (the test suite's smoke run)")
    p.add_argument("--ablation", action="store_true", help="also train without motion alignment and compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--long", action="store_true", help="then measure 64-frame videos and loops (sample.py --long)")
    args = p.parse_args(argv)
    result = run(args)
    if args.long:
        refs, starts = make_demo_references(2 if args.fast else N_REFS, SIZE, seed=1000 + args.seed)
        result["long"] = measure_long(result["pipe"], refs, starts, result["out"], *((20, 2) if args.fast else ()),
                                      seed=args.seed)
    return result


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
            v = animate(pipe, refs[i], PROMPT, height=SIZE, width=SIZE, seed=seed + i, progress=False,
                        **{**SAMPLING, "steps": steps, **kw})
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
    main()
