"""
FLASH sampling (arXiv 2503.00276, Sec. 4 / App. A3.2): animate a reference image into a video of the learned action.
DDIM (Song et al., arXiv 2010.02502, Eq. 12, eta 0) on AnimateDiff's noise schedule; classifier-free guidance
(Ho & Salimans, arXiv 2207.12598) in one batched U-Net call; frame 1 = E(reference image), kept clean at every step;
LAMP's shared noise and AdaIN (arXiv 2310.10769, RQ-Wu/LAMP pipeline_lamp.py); decoding through the Detail Enhancement
Decoder fed by the reference's encoder features. API: load_pipeline() + animate(); CLI: python sample.py --help
"""
import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_text import load_text_encoder, load_tokenizer, save_text_encoder, save_tokenizer
from data import plain_warnings, tqdm, write_video
from model import (DTYPES, autocast_dtype, load_checked, load_state_dict_file, load_unet, read_json, save_motion_module,
                   save_unet)
from vae import VAE, load_vae, save_vae

# ----------------------------------------------------------------------------- DDIM
# AnimateDiff's inference yamls (v1, v2, v3) build diffusers' DDIMScheduler(beta_start=0.00085, beta_end=0.012,
# beta_schedule="linear", steps_offset=1, clip_sample=False); the class defaults add set_alpha_to_one=True and
# "leading" timestep spacing. eta = 0: deterministic. test_flash.py checks these against diffusers' DDIMScheduler.
TRAIN_STEPS = 1000


def alphas_cumprod(n=TRAIN_STEPS, beta_start=0.00085, beta_end=0.012):
    """a_t = prod_{s<=t} (1 - beta_s), betas = linspace (AnimateDiff's "linear", not SD's "scaled_linear"), fp32."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, n, dtype=torch.float32), dim=0)


def ddim_timesteps(steps, n=TRAIN_STEPS, offset=1):
    """'leading' spacing + steps_offset 1: 25 steps -> 961, 921, ..., 1; 50 -> 981, ..., 1."""
    return (torch.arange(steps) * (n // steps)).flip(0) + offset


def ddim_step(x, eps, t, t_prev, alphas_cumprod):
    """DDIM Eq. 12 with sigma_t = 0: x_t -> x_{t_prev}. t_prev < 0 (the last step) takes a_prev = 1."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # "predicted x_0"
    return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps  # + "direction pointing to x_t"


def adaptive_instance_norm(content, style, eps=1e-8):
    """LAMP's AdaIN: (c - mu_c) / sigma_c * sigma_s + mu_s, per channel over the last two dims (H, W),
    sigma = sqrt(unbiased var + eps). Leading dims broadcast (one style frame, several content frames)."""
    mu_c, mu_s = content.mean((-2, -1), keepdim=True), style.mean((-2, -1), keepdim=True)
    sd_c = (content.var((-2, -1), keepdim=True) + eps).sqrt()
    sd_s = (style.var((-2, -1), keepdim=True) + eps).sqrt()
    return (content - mu_c) / sd_c * sd_s + mu_s

# ----------------------------------------------------------------------------- inputs


def check_size(height, width):
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 8:
            lo = v // 8 * 8
            raise ValueError(f"--{name} {v} is not a multiple of 8 (the VAE works on 8x8 blocks): use "
                             + (f"{lo} or {lo + 8}" if lo > 0 else "8"))


def load_image(image, height, width):
    """Path or PIL image of any size and mode -> (3,H,W) float in [-1,1]: RGB (transparency over white), scaled to
    cover HxW, centre-cropped (crop, never stretch), EXIF rotation applied."""
    if not isinstance(image, Image.Image):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image}")
        try:
            with Image.open(image) as f:
                image = ImageOps.exif_transpose(f)  # a loaded copy
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"cannot read image {image}: not an image format Pillow knows") from None
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit / 32-bit greyscale: to 8 bits first
        a = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((a / 257 if image.mode.startswith("I;16") or a.max() > 255 else a).clip(0, 255)
                                .round().astype(np.uint8))
    img = image.convert("RGBA")  # any mode (L, P, RGBA, CMYK, ...) -> RGB with transparency over white
    img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    s = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * s)), max(height, round(img.height * s))
    img = img.resize((w, h), Image.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1  # 3 H W

# ----------------------------------------------------------------------------- pipeline


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # the U-Net's; the VAE keeps its own (fp32 unless --vae-dtype bf16), text encoder fp32
    info: dict = field(default_factory=dict)  # formats, motion-module version, weight files, checkpoint settings


def load_pipeline(base, motion_module=None, checkpoints=(), device=None, dtype=None, detail=True, tokenizer=None,
                  vae_dtype="fp32", verbose=True):
    """base: SD-1.5 diffusers folder or single-file LDM checkpoint (then the tokenizer comes from `tokenizer` or a
    tokenizer/ folder beside the file); motion_module: AnimateDiff file / MotionAdapter folder or None;
    checkpoints: train.py outputs, applied in order. dtype None/"auto": bf16 on CUDA if supported, else fp16; fp32 on
    CPU. detail=False decodes with the plain SD decoder even when detail weights are present (ablation)."""
    base = str(base)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, vae_dtype = autocast_dtype(dtype, device), DTYPES.get(vae_dtype, vae_dtype)
    if not os.path.exists(base):
        raise FileNotFoundError(f"base model not found: {base} (want an SD-1.5 diffusers folder or a single file)")
    tok_dir = tokenizer or (base if os.path.isdir(base) else os.path.dirname(os.path.abspath(base)))
    try:
        tok = load_tokenizer(tok_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer (vocab.json + merges.txt) in {tok_dir} or its tokenizer/: pass "
                                f"--tokenizer DIR, e.g. an SD-1.5 diffusers folder's tokenizer/") from None
    unet = load_unet(base, motion_module).to(device, dtype).eval()
    vae = load_vae(base).to(device, vae_dtype).eval()
    text_encoder = load_text_encoder(base).to(device).eval()
    info = dict(base=base, tokenizer=str(tok_dir), detail=detail, checkpoints=[], settings={}, **unet.info)
    pipe = Pipeline(unet, vae, text_encoder, tok, device, dtype, info)
    for c in checkpoints:
        apply_checkpoint(pipe, c)
    if verbose:
        n = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.4g}M"
        mm = sum(p.numel() for k, p in pipe.unet.named_parameters() if "motion_modules." in k) / 1e6
        vc = pipe.vae.config
        dec = (f"on ({'+'.join(vc.detail_branches)}{', full res' * vc.detail_full_res})" if detail else
               "off (--no-detail)") if vc.detail else "absent"
        print(f"base {base} ({info['unet_format']}) | motion module {info.get('motion_version', 'none')} "
              f"({info.get('motion_format', '-')}) | checkpoints: {', '.join(info['checkpoints']) or 'none'}")
        print(f"U-Net {n(pipe.unet)} params (motion {mm:.4g}M) {str(dtype)[6:]} | VAE {n(pipe.vae)} "
              f"{str(vae_dtype)[6:]}, detail decoder {dec} | text encoder {n(text_encoder)} fp32 | "
              f"device {device} | attention SDPA")
    return pipe


def read_settings(path):
    """train.py checkpoint: folder with flash.safetensors + settings.json, or the .safetensors -> (file, settings)"""
    path = str(path)
    file = os.path.join(path, "flash.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint not found: {file}")
    s = os.path.join(os.path.dirname(file), "settings.json")
    return file, (read_json(s) if os.path.isfile(s) else {})


def detail_overrides(settings):
    """train.py settings (or args) -> the VAEConfig fields of the detail decoder they train: Table A2's branches and
    full-resolution patch attention. Checkpoints from before these switches: both branches, not at full res."""
    return dict(detail=True, detail_branches=tuple(settings.get("detail_branches", "warp,patch").split(",")),
                detail_full_res=settings.get("detail_full_res") == "on")


def apply_checkpoint(pipe, path):
    """Load a train.py checkpoint strictly: unet.* (motion modules, attn1.to_k/to_v) into the U-Net, vae.*
    (decoder.detail.*) into the VAE, rebuilt first with the detail branches its settings name (detail_overrides)
    unless it has exactly those; every branch weight must be there. Returns its settings; a "unet"-stage
    checkpoint's settings become animate()'s size defaults."""
    file, settings = read_settings(path)
    parts = {"unet": {}, "vae": {}}
    for k, v in load_state_dict_file(file).items():
        head, _, rest = k.partition(".")
        if head not in parts:
            raise ValueError(f"checkpoint {file}: key {k} has neither a 'unet.' nor a 'vae.' prefix")
        parts[head][rest] = v
    want, have = settings.get("motion_version"), pipe.info.get("motion_version")
    if parts["unet"] and want and want != have:
        raise ValueError(f"checkpoint {file} was trained with motion module {want} ({settings.get('motion_module')})"
                         f" but {have or 'none'} is loaded: pass --motion-module")
    cfg = replace(pipe.vae.config, **detail_overrides(settings))
    if parts["vae"] and cfg != pipe.vae.config:
        old, p = pipe.vae, next(pipe.vae.parameters())
        pipe.vae = VAE(cfg)
        base = {k: v for k, v in old.state_dict().items() if ".detail." not in k}
        missing, unexpected = pipe.vae.load_state_dict(base, strict=False)
        assert not unexpected and all(".detail." in k for k in missing)  # only the branches loaded below
        pipe.vae.to(p.device, p.dtype).eval()
    branches = [k for k in pipe.vae.state_dict() if ".detail." in k]  # a decoder checkpoint holds them all
    for name, sd in parts.items():
        if sd:
            load_checked(getattr(pipe, name), sd, f"checkpoint {file} ({name}.*)",
                         keys=branches if name == "vae" else list(sd))
    pipe.info["checkpoints"].append(file)
    if parts["unet"] and settings.get("stage", "unet") == "unet":
        pipe.info["settings"] = settings
    return settings


def save_pipeline(pipe, folder):
    """Write pipe as an SD-1.5 diffusers folder (unet/ vae/ text_encoder/ tokenizer/) plus motion_module.safetensors
    (AnimateDiff layout): load_pipeline(folder, folder/motion_module.safetensors) reads it back."""
    folder = Path(folder)
    save_unet(pipe.unet, folder / "unet")
    save_vae(pipe.vae, folder / "vae")
    save_text_encoder(pipe.text_encoder, folder / "text_encoder")
    save_tokenizer(pipe.tokenizer, folder / "tokenizer")
    if pipe.unet.config.motion_modules:
        save_motion_module(pipe.unet, folder / "motion_module.safetensors")


@torch.no_grad()
def encode_prompt(pipe, prompts):
    """list of prompts -> CLIP last hidden states (B, 77, D) on pipe.device, wherever the text encoder sits (train.py
    moves it off the GPU after encoding the captions; its periodic samples still encode prompts)"""
    te = pipe.text_encoder
    return te(pipe.tokenizer(prompts).to(next(te.parameters()).device)).to(pipe.device)

# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def animate(pipe, image, prompt, negative_prompt="", frames=16, steps=25, guidance=7.5, seed=0, height=None,
            width=None, adain=True, shared_noise=0.0, detail=True, progress=True, callback=None):
    """image (path, PIL image, or (3,H,W) tensor in [-1,1]) -> uint8 frames (F,H,W,3) whose frame 0 is the image.
    callback(i, t, latents (1,4,F,h,w)) runs after every step; timing and checks land in pipe.info["last_run"]."""
    s = pipe.info.get("settings", {})
    height, width = height or s.get("height", 512), width or s.get("width", 512)
    check_size(height, width)
    if not 0 <= shared_noise < 1:
        raise ValueError(f"--shared-noise {shared_noise}: want 0 <= alpha < 1 (LAMP uses 0.2)")
    if not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"--steps {steps}: want 1 to {TRAIN_STEPS} DDIM steps")
    u = pipe.unet.config
    if u.motion_modules and frames > u.motion_max_len:
        raise ValueError(f"--frames {frames}: the motion module's positional encoding holds {u.motion_max_len} frames; "
                         f"use --frames {u.motion_max_len} or fewer")
    vae, dev, cfg = pipe.vae, pipe.device, guidance > 1
    vdt = next(vae.parameters()).dtype
    img = (image if torch.is_tensor(image) else load_image(image, height, width))[None].to(dev, vdt)  # 1 3 H W
    ctx = encode_prompt(pipe, [negative_prompt, prompt] if cfg else [prompt])  # once; CFG batch = [uncond; cond]
    z0 = vae.encode(img).float()[:, :, None]  # 1 4 1 h w: E(I), the posterior mean
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same noise on every device
    down = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling: 8 for SD
    x = torch.randn((1, vae.config.latent_channels, frames, height // down, width // down), generator=g)
    x[:, :, 1:] = shared_noise * x[:, :, :1] + (1 - shared_noise) * x[:, :, 1:]  # LAMP: n_f <- a n_0 + (1 - a) n_f
    x = x.to(dev)
    x[:, :, :1] = z0
    acp, t0 = alphas_cumprod().to(dev), time.time()
    for i, t in enumerate(tqdm(ddim_timesteps(steps).tolist(), desc="DDIM", disable=not progress)):
        eps = pipe.unet(torch.cat([x, x]) if cfg else x, t, ctx).float()  # all frames, frame 1 clean
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x[:, :, 1:] = ddim_step(x[:, :, 1:], eps[:, :, 1:], t, t - TRAIN_STEPS // steps, acp)
        if adain:
            # LAMP's in-loop rule as its code runs it (frames 1-indexed): frame 2 is aligned to frame 1 only late
            # (its i > 30 of 50, here i > 0.6 steps); frames 3.. are aligned to frame 2 at EVERY step (its
            # `if f > 1` branch overrides the late one).
            if i > round(0.6 * steps):
                x[:, :, 1:2] = adaptive_instance_norm(x[:, :, 1:2], x[:, :, :1])
            x[:, :, 2:] = adaptive_instance_norm(x[:, :, 2:], x[:, :, 1:2])
        x[:, :, :1] = z0  # frame 1 is never denoised: it stays E(I)
        if callback is not None:
            callback(i, t, x)
    if adain:  # LAMP post-processing: every later frame takes frame 1's per-channel statistics
        x[:, :, 1:] = adaptive_instance_norm(x[:, :, 1:], x[:, :, :1])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    denoise_s = time.time() - t0
    use_detail = bool(detail and pipe.info.get("detail", True) and vae.config.detail)
    ref = vae.encoder_features(img) if use_detail else None  # computed once, shared by all frames
    video = vae.decode(x[0].transpose(0, 1).to(vdt), ref=ref, chunk=4).float()  # C F h w -> F C h w -> F 3 H W
    bad = [f for f in range(frames) if not torch.isfinite(video[f]).all()]
    if bad:
        why = "run the VAE in fp32 (--vae-dtype fp32)" if torch.isfinite(x).all() else "NaN latents: try --dtype fp32"
        print(f"warning: NaN in decoded frames {bad} (set to 0): {why}", file=sys.stderr)
        video = torch.nan_to_num(video, nan=0.0, posinf=1.0, neginf=-1.0)
    out = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    black = [f for f in range(frames) if out[f].max() == 0]
    if black:
        print(f"warning: frames {black} are entirely black", file=sys.stderr)
    pipe.info["last_run"] = dict(denoise_s=denoise_s, detail=use_detail, nan_frames=bad, black_frames=black)
    return out


# ----------------------------------------------------------------------------- CLI


def check_args(args):
    """Reject impossible settings before any weights are read or anything is written."""
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"image not found: {args.image}")
    if not 1 <= args.steps <= TRAIN_STEPS:
        raise ValueError(f"--steps {args.steps}: want 1 to {TRAIN_STEPS} DDIM steps (FLASH uses 25)")
    if args.frames is not None and args.frames < 2:
        raise ValueError(f"--frames {args.frames}: want at least 2 (frame 1 is the reference image)")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: want a finite scale (FLASH uses 7.5; <= 1 turns CFG off)")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps}: want a positive frame rate")
    if not 0 <= args.shared_noise < 1:
        raise ValueError(f"--shared-noise {args.shared_noise}: want 0 <= alpha < 1 (LAMP uses 0.2)")
    if args.out:
        parent = Path(args.out).absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise PermissionError(f"--out {args.out}: cannot write there ({parent} is not a writable folder)")


def prompt_words(prompt):
    """a prompt -> its first words as a file-name part: 'a person is shooting...' -> a_person_is_shooting..."""
    return "_".join(re.findall(r"[a-z0-9]+", prompt.lower())[:6])[:60] or "video"


def run(args):
    check_args(args)  # fail fast: before any weights are read
    ckpts = [read_settings(c) for c in args.checkpoint]
    trained = [(f, s) for f, s in ckpts if s.get("stage", "unet") == "unet"]
    ck_file, s = trained[-1] if trained else (None, {})
    h, w = args.height or s.get("height", 512), args.width or s.get("width", 512)
    check_size(h, w)
    if s.get("height") and (h, w) != (s["height"], s.get("width")) and not args.force_size:
        raise ValueError(f"checkpoint {ck_file} was trained at {s['height']}x{s.get('width')}, you asked for "
                         f"{h}x{w} (use --force-size to override)")
    caps = s.get("captions") or ([s["prompt"]] if s.get("prompt") else [])  # what the checkpoint trained on
    if args.prompt is None and len(caps) > 1:  # joint training: the action to animate must be named
        raise ValueError(f"--prompt is required: checkpoint {ck_file} learnt {len(caps)} captions: {'; '.join(caps)}")
    prompt = args.prompt if args.prompt is not None else (caps[0] if caps else None)
    if prompt is None:
        raise ValueError("--prompt is required (no --checkpoint with a training prompt was given)")
    frames, fps = args.frames or s.get("frames", 16), args.fps or s.get("fps", 8)
    base, mm = args.base or s.get("base"), args.motion_module or s.get("motion_module")
    if not base:
        raise ValueError("--base is required: an SD-1.5 diffusers folder or single-file checkpoint")
    for what, p in (("base model", base), ("motion module", mm)):
        if p and not os.path.exists(p):
            raise FileNotFoundError(f"{what} not found: {p}")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    image = load_image(args.image, h, w)  # an unreadable image fails here, still before the weights
    out = Path(args.out or f"samples/{time.strftime('%Y%m%d-%H%M%S')}-{seed}-{prompt_words(prompt)}.mp4")
    pipe = load_pipeline(base, mm, args.checkpoint, args.device, args.dtype, not args.no_detail, args.tokenizer,
                         args.vae_dtype)
    if args.no_detail_full_res:
        pipe.vae.full_res_attention(False)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    video = animate(pipe, image, prompt, args.negative_prompt, frames, args.steps, args.guidance, seed, h, w,
                    not args.no_adain, args.shared_noise, not args.no_detail)
    secs, last = time.time() - t0, pipe.info["last_run"]
    write_video(video, out, fps)
    meta = dict(image=os.path.abspath(args.image), prompt=prompt, negative_prompt=args.negative_prompt, frames=frames,
                steps=args.steps, guidance=args.guidance, seed=seed, height=h, width=w, fps=fps,
                adain=not args.no_adain, shared_noise=args.shared_noise, detail=last["detail"],
                detail_full_res=last["detail"] and pipe.vae.config.detail_full_res and not args.no_detail_full_res,
                device=str(pipe.device), dtype=str(pipe.dtype)[6:], vae_dtype=args.vae_dtype, out=str(out),
                sampler="DDIM eta 0, linear betas 0.00085-0.012, steps_offset 1, leading, set_alpha_to_one",
                motion_version=pipe.info.get("motion_version"), seconds=round(secs, 2),
                weights=dict(base=os.path.abspath(base), motion_module=pipe.info.get("motion_file"),
                             tokenizer=pipe.info["tokenizer"], checkpoints=pipe.info["checkpoints"]),
                checkpoint_settings=pipe.info["settings"], nan_frames=last["nan_frames"])
    side = out.with_suffix(".json") if out.suffix.lower() in (".mp4", ".mov", ".mkv", ".gif") else Path(f"{out}.json")
    side.write_text(json.dumps(meta, indent=2))
    mem = f" | peak GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if pipe.device.type == "cuda" else ""
    print(f"saved {out} | {frames}x{h}x{w} @ {fps:g} fps | {secs:.1f} s, "
          f"{args.steps / max(last['denoise_s'], 1e-9):.2f} steps/s{mem}")


def main(argv=None):
    p = argparse.ArgumentParser(description="FLASH (arXiv 2503.00276): animate a reference image into a video.")
    # inputs
    p.add_argument("--image", required=True, help="reference image = frame 1 (any size/mode; scaled + centre-cropped)")
    p.add_argument("--prompt", help="text prompt (default: the checkpoint's caption; needed if it learnt several)")
    p.add_argument("--negative-prompt", default="", help="prompt of the unconditional CFG branch")
    # weights
    p.add_argument("--base", help="SD-1.5 diffusers folder or single file (default: the checkpoint's)")
    p.add_argument("--motion-module", help="AnimateDiff motion module file or MotionAdapter folder")
    p.add_argument("--checkpoint", nargs="+", default=[], help="train.py output folder(s) or .safetensors file(s)")
    p.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (for a single-file --base)")
    # sampling: defaults of FLASH A3.2 / AnimateDiff
    p.add_argument("--frames", type=int, help="frames (default: the checkpoint's, else 16)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, help="noise seed (default: random, written to the file name and JSON)")
    p.add_argument("--height", type=int, help="multiple of 8 (default: the checkpoint's, else 512)")
    p.add_argument("--width", type=int, help="multiple of 8 (default: the checkpoint's, else 512)")
    p.add_argument("--force-size", action="store_true", help="allow a size other than the checkpoint's")
    p.add_argument("--no-adain", action="store_true", help="turn off LAMP's AdaIN on the latents")
    p.add_argument("--shared-noise", type=float, default=0.0, help="LAMP shared-noise alpha (LAMP: 0.2; 0 = off)")
    p.add_argument("--no-detail", action="store_true", help="decode with the plain SD decoder (ablation)")
    p.add_argument("--no-detail-full-res", action="store_true",
                   help="skip the detail decoder's full-resolution patch attention if it was trained with it "
                        "(4.4 TFLOP per 512^2 frame; an approximation)")
    # output and runtime
    p.add_argument("--fps", type=float, help="playback fps (default: the checkpoint's, else 8)")
    p.add_argument("--out", help=".mp4, .gif, or a folder for PNG frames (default: samples/<time>-<seed>-<prompt>.mp4)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="U-Net dtype")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"], help="VAE dtype")
    args = p.parse_args(argv)
    try:
        run(args)
    except torch.cuda.OutOfMemoryError:
        msg = ("CUDA out of memory: try fewer --frames, a smaller --height/--width, or --vae-dtype bf16 (check first: "
               "python bench.py --estimate sample ...)")
    except (OSError, ValueError) as e:  # missing/unreadable files, bad sizes, mismatched weights: one line
        msg = " ".join(str(e).split())
    else:
        return
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    plain_warnings()
    main()
