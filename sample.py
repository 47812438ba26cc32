"""
FLASH sampling (arXiv 2503.00276, Sec. 4 / App. A3.2): animate a reference image into a video of the learned action.
DDIM (Song et al., arXiv 2010.02502, Eq. 12, eta 0) on AnimateDiff's noise schedule; classifier-free guidance
(Ho & Salimans, arXiv 2207.12598) in one batched U-Net call; frame 1 = E(reference image), kept clean at every step;
LAMP's shared noise, AdaIN and histogram matching (arXiv 2310.10769, RQ-Wu/LAMP); decoding through the Detail
Enhancement Decoder fed by the reference's encoder features. Videos longer than the training length: phased inference
with shared noise reschedule (arXiv 2405.17306, Sec. 3.4) or FreeNoise-style sliding windows (arXiv 2310.15169);
seamless loops: LVMM's looping guidance (LVMM supplementary, Sec. 3). Several references per run, weights and prompt
embeddings loaded once. Without a reference: AnimateDiff's own text-to-video (arXiv 2307.04725; every frame from
noise, cross-frame attention off). API: load_pipeline() + animate(); CLI: python sample.py --help
"""
import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_text import load_text_encoder, load_tokenizer, save_text_encoder, save_tokenizer
from data import exit_on_error, plain_warnings, tqdm, write_video
from model import (DTYPES, Attention, MotionModule, autocast_dtype, load_checked, load_state_dict_file, load_unet,
                   read_json, save_motion_module, save_unet)
from vae import VAE, load_vae, save_vae

# ----------------------------------------------------------------------------- DDIM
# AnimateDiff's inference yamls (v1, v2, v3) build diffusers' DDIMScheduler(beta_start=0.00085, beta_end=0.012,
# beta_schedule="linear", steps_offset=1, clip_sample=False); the class defaults add set_alpha_to_one=True and
# "leading" timestep spacing. eta = 0: deterministic. test_flash.py checks these against diffusers' DDIMScheduler.
TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def alphas_cumprod(n=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END):
    """a_t = prod_{s<=t} (1 - beta_s), betas = linspace (AnimateDiff's "linear", not SD's "scaled_linear"), fp32."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, n, dtype=torch.float32), dim=0)


def ddim_timesteps(steps, n=TRAIN_STEPS, offset=1):
    """'leading' spacing + steps_offset 1: 25 steps -> 961, 921, ..., 1; 50 -> 981, ..., 1."""
    return (torch.arange(steps) * (n // steps)).flip(0) + offset


def video_noise(shape, generator, mixed=0.0, shared_mean=False):
    """N(0, I) noise for a (B,C,F,h,w) video. mixed in [0, 1): PYoCo's mixed noise prior (arXiv 2305.10474 Sec. 3.2,
    Eq. 4 with mixed = a^2 / (1 + a^2)): every frame = sqrt(mixed) * one draw shared by all frames + sqrt(1 - mixed) *
    its own draw, so each frame stays N(0, I) and any two frames correlate by `mixed`. 0 (SD-1.5 + AnimateDiff's own
    training): independent frames, the same draw as torch.randn(shape). A model must be trained with the prior it is
    sampled with (train.py and sample.py --mixed-noise; the demo's toy base uses it, real AnimateDiff does not).
    shared_mean: a sampling switch, no retraining: at t = T the linear betas keep sqrt(a_T) = 0.04 of the signal, so the
    noise's spatial mean decides each frame's overall colour; sharing it (the mean of iid N(0, 1) pixels is independent
    of their deviations, so each frame's law is unchanged) keeps the background from flickering (docs/demo.md)."""
    noise = torch.randn(shape, generator=generator)
    if mixed:
        shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator)  # B C 1 h w, broadcast over frames
        noise = math.sqrt(mixed) * shared + math.sqrt(1 - mixed) * noise
    if shared_mean:  # every frame's per-channel spatial mean (its "DC") := frame 1's; frames stay exactly N(0, I)
        noise = noise - noise.mean(dim=(3, 4), keepdim=True) + noise[:, :, :1].mean(dim=(3, 4), keepdim=True)
    return noise


PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' scheduler_config.json "prediction_type"


def predicted_eps(out, x, a_t, prediction_type):
    """The U-Net's output as the noise eps: itself ("epsilon", SD-1.5), or from v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    ("v_prediction", Salimans & Ho, arXiv 2202.00512 Sec. 4): eps = sqrt(a_t) v + sqrt(1 - a_t) x_t. A v-model holds
    x_0 in its own output where the signal is faint (t near T); the demo measured one (demo.PREDICTION, docs/demo.md)."""
    return out if prediction_type == "epsilon" else a_t.sqrt() * out + (1 - a_t).sqrt() * x


def predicted_x0(x, eps, a_t):
    """DDIM's "predicted x_0" (Eq. 12): (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)"""
    return (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def ddim_step(x, eps, t, t_prev, alphas_cumprod):
    """DDIM Eq. 12 with sigma_t = 0: x_t -> x_{t_prev}. t_prev < 0 (the last step) takes a_prev = 1."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    pred_x0 = predicted_x0(x, eps, a_t)
    return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps  # + "direction pointing to x_t"


def adaptive_instance_norm(content, style, eps=1e-8):
    """LAMP's AdaIN: (c - mu_c) / sigma_c * sigma_s + mu_s, per channel over the last two dims (H, W),
    sigma = sqrt(unbiased var + eps). Leading dims broadcast (one style frame, several content frames)."""
    mu_c, mu_s = content.mean((-2, -1), keepdim=True), style.mean((-2, -1), keepdim=True)
    sd_c = (content.var((-2, -1), keepdim=True) + eps).sqrt()
    sd_s = (style.var((-2, -1), keepdim=True) + eps).sqrt()
    return (content - mu_c) / sd_c * sd_s + mu_s


def match_histograms(frames, ref):
    """LAMP's colour post-processing (RQ-Wu/LAMP inference_script.py, his_match) on uint8 frames (F,H,W,3): every
    channel of every frame goes through the lookup table v -> the lowest level u whose reference CDF reaches the
    frame's CDF at v. Integer counts (frames and reference have the same pixel count), so no rounding ties."""
    out = np.empty_like(frames)
    for c in range(3):
        cdf_ref = np.cumsum(np.bincount(ref[..., c].ravel(), minlength=256))
        for f, frame in enumerate(frames[..., c]):
            cdf = np.cumsum(np.bincount(frame.ravel(), minlength=256))
            out[f, ..., c] = np.searchsorted(cdf_ref, cdf, side="left").clip(0, 255).astype(np.uint8)[frame]
    return out

# ----------------------------------------------------------------------------- longer and looping videos
# Every U-Net call sees at most `context` frames (the training length): [clean E(I); up to context - 1 frames], the
# layout FLASH trains on (Eq. 1: clean first frame, noisy frames 2..N). So in every segment or window the cross-frame
# attention keys on the reference (first_frame_kv takes frame 1 of the call) and the motion module sees it at PE
# position 0, as in training; the reference's own prediction is dropped. The extra frame costs 1/context per call.
PHASED_GAMMA, PHASED_OMEGA = 0.8, 0.2  # arXiv 2405.17306 Sec. 4.1: gamma 0.8 (Eq. 9), omega 0.2 (Eq. 11)
OVERLAP = 4  # windows: frames shared by neighbouring context windows (AnimateDiff-Evolved's default overlap)
LONG_MODES = ("phased", "windows", "naive")
ADAIN_MODES = ("lamp", "post", "off")
ADAIN = "lamp"  # default: measured on the demo model (docs/paper.md, the AdaIN row)
LOOP_WEIGHT = 0.1  # LVMM's mu for the sum-reduced L1 loss below (measured on the demo model: docs/demo.md)
# The loop term adds mu sigma_t grad to eps, and the gradient of the sum-reduced L1 loss is about +-1 per element,
# as large as eps itself at mu = 1. Measured on the tiny random pipeline (25 steps, 8 frames): the loop loss is
# lowest at mu 0.3-1; at mu = 10 it ends above the unguided run's and the latents grow in proportion to mu.
LOOP_WEIGHT_MAX = 10.0


def context_frames(pipe, context=None):
    """Frames per U-Net call: `context`, else the checkpoint's training length (settings.json "frames"), else 16;
    at most the motion module's positional-encoding length."""
    u = pipe.unet.config
    limit = u.motion_max_len if u.motion_modules else None
    n = context or pipe.info.get("settings", {}).get("frames", 16)
    n = min(n, limit) if limit and not context else n
    if n < 2 or (limit and n > limit):
        raise ValueError(f"--context-frames {n}: want 2 to {limit} (the motion module's positional encoding)"
                         if limit else f"--context-frames {n}: want at least 2 (the reference and one frame)")
    return n


def context_windows(n, size, overlap):
    """(start, end) windows of `size` frames over n frames, stride size - overlap, the last one flush with the end
    (diffusers' FreeNoise layout); one window when n <= size."""
    if n <= size:
        return [(0, n)]
    out = [(s, s + size) for s in range(0, n - size + 1, size - overlap)]
    return out + [(n - size, n)] if out[-1][1] < n else out


def pyramid_weights(n):
    """FreeNoise's pyramid fusion weights (arXiv 2310.15169, Eq. 9; diffusers' "pyramid"): 1 2 2 1, 1 2 3 2 1, ..."""
    return torch.tensor([min(i + 1, n - i) for i in range(n)], dtype=torch.float32)


def freenoise_reschedule(noise, size, stride, g):
    """FreeNoise's noise rescheduling over frames (dim 2), in place: each block of `stride` frames past the first
    `size` is a random permutation of the block `size` frames earlier, so distant frames share noise (long-range
    correlation) while the frames of any one window stay distinct."""
    n = noise.shape[2]
    for i in range(size, n, stride):
        src = torch.arange(i - size, i - size + stride)
        src = src[torch.randperm(stride, generator=g)][: n - i]
        noise[:, :, i:i + len(src)] = noise[:, :, src]
    return noise


def loop_loss(x0):
    """LVMM's looping constraint (supplementary Sec. 3) on clean latents (1,4,F,h,w), our stand-in for its motion
    displacement fields z_k: L = ||x_F - x_1||_1 + ||(x_F - x_{F-1}) - (x_2 - x_1)||_1 (position and velocity at the
    end match the start; sums, so the gradient per element is O(1) at any size)."""
    first, last = x0[:, :, 0], x0[:, :, -1]
    return (last - first).abs().sum() + ((last - x0[:, :, -2]) - (x0[:, :, 1] - first)).abs().sum()

# ----------------------------------------------------------------------------- FreeInit
# FreeInit (Wu et al., arXiv 2312.07537): sample; diffuse the result back to t = T with the first pass's noise; keep
# its low spatio-temporal frequencies and take the high ones from fresh noise; sample again. Training noises clips to
# t = T keeping sqrt(a_T) = 0.04 of the signal, so a video model learnt to expect coherent low frequencies in its
# initial noise, which independent noise lacks (the paper's training-inference gap). Its defaults (the authors'
# configs, diffusers' enable_free_init): a 3D Butterworth filter of order 4 with normalised stop frequency 0.25 in
# space and in time; coarse-to-fine ("fast"): pass k of N takes int(T k / N) DDIM steps.
FREEINIT_ORDER = 4
FREEINIT_DS, FREEINIT_DT = 0.25, 0.25  # spatial and temporal stop frequency (d_s, d_t)


def freeinit_filter(shape, ds=FREEINIT_DS, dt=FREEINIT_DT, order=FREEINIT_ORDER):
    """FreeInit's low-pass over (frames, h, w), in torch.fft's frequency order: 1 / (1 + (d^2 / ds^2)^order),
    d^2 = ((ds / dt) f_t)^2 + f_h^2 + f_w^2, every frequency normalised to [-1, 1)."""
    f, h, w = (torch.fft.fftfreq(n) * 2 for n in shape)
    d2 = ((ds / dt) * f)[:, None, None] ** 2 + h[:, None] ** 2 + w ** 2
    return 1 / (1 + (d2 / ds ** 2) ** order)


def freeinit_noise(x, noise, fresh, a_T):
    """FreeInit's noise reinitialisation of (B,C,F,h,w) latents: z_T = sqrt(a_T) x + sqrt(1 - a_T) noise (x diffused
    to t = T with the first pass's noise), its low frequencies + the high frequencies of fresh noise."""
    lowpass, dims = freeinit_filter(x.shape[2:]).to(x.device), (-3, -2, -1)
    z_T = a_T.sqrt() * x + (1 - a_T).sqrt() * noise
    mixed = torch.fft.fftn(z_T, dim=dims) * lowpass + torch.fft.fftn(fresh, dim=dims) * (1 - lowpass)
    return torch.fft.ifftn(mixed, dim=dims).real


def freeinit_steps(steps, passes, fast=False):
    """DDIM steps of each FreeInit pass: `steps` every pass, or coarse-to-fine int(steps k / passes), k = 1..passes"""
    return [max(1, int(steps / passes * k)) if fast else steps for k in range(1, passes + 1)]


def check_sampling(frames=None, steps=25, shared_noise=0.0, adain=ADAIN, long=None, overlap=OVERLAP,
                   gamma=PHASED_GAMMA, omega=PHASED_OMEGA, loop=False, loop_weight=LOOP_WEIGHT, loop_grad="x0",
                   mixed_noise=0.0, stg=0.0, freeinit=1):
    """animate()'s and the CLI's rules for the sampling settings (frames None: not known yet)."""
    if frames is not None and frames < 2:
        raise ValueError(f"--frames {frames}: want at least 2 (frame 1 is the reference image)")
    if not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"--steps {steps}: want 1 to {TRAIN_STEPS} DDIM steps (FLASH uses 25)")
    if not 0 <= shared_noise < 1:
        raise ValueError(f"--shared-noise {shared_noise}: want 0 <= alpha < 1 (LAMP uses 0.2)")
    if not 0 <= mixed_noise < 1:
        raise ValueError(f"--mixed-noise {mixed_noise}: want 0 <= share < 1 (0 = independent frames)")
    if not 0 <= stg < math.inf:
        raise ValueError(f"--stg {stg}: want a finite scale >= 0 (0 = off)")
    if not (isinstance(freeinit, int) and freeinit >= 1):
        raise ValueError(f"--freeinit {freeinit}: want a whole number of sampling passes >= 1 (1 = off; FreeInit "
                         f"uses 3)")
    for name, v, ok in (("adain", adain, ADAIN_MODES), ("long", long, LONG_MODES + (None,)),
                        ("loop-grad", loop_grad, ("x0", "unet"))):
        if v not in ok:
            raise ValueError(f"--{name} {v}: want one of {', '.join(str(o) for o in ok if o)}")
    if not overlap >= 0:
        raise ValueError(f"--overlap {overlap}: want 0 or more frames")
    if not 0 <= gamma < 1:
        raise ValueError(f"--gamma {gamma}: want 0 <= gamma < 1 (the paper: 0.8; 1 would only copy segment 1)")
    if not 0 <= omega < math.inf:
        raise ValueError(f"--omega {omega}: want a finite omega >= 0 (the paper: 0.2)")
    if not 0 <= loop_weight <= LOOP_WEIGHT_MAX:
        raise ValueError(f"--loop-weight {loop_weight}: want 0 to {LOOP_WEIGHT_MAX:g} (default {LOOP_WEIGHT}; above "
                         f"{LOOP_WEIGHT_MAX:g} the guidance outweighs the noise prediction)")
    if loop and frames is not None and frames < 3:
        raise ValueError(f"--loop needs --frames 3 or more (it matches the last two frames to the first two), "
                         f"got {frames}")


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
    embeddings: dict = field(default_factory=dict)  # encode_prompt's cache: (text encoder, prompts) -> embeddings
    prediction_type: str = "epsilon"  # what the U-Net predicts (scheduler_config.json): "epsilon" or "v_prediction"


def read_prediction_type(base):
    """A diffusers folder's scheduler/scheduler_config.json "prediction_type" ("epsilon" when absent, as diffusers,
    and for a single-file checkpoint: SD-1.5's); anything else is an error naming the file."""
    path = os.path.join(base, "scheduler", "scheduler_config.json")
    kind = read_json(path).get("prediction_type", "epsilon") if os.path.isfile(path) else "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{path}: prediction_type {kind!r} is not supported (want {' or '.join(PREDICTION_TYPES)})")
    return kind


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
    pipe = Pipeline(unet, vae, text_encoder, tok, device, dtype, info, prediction_type=read_prediction_type(base))
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
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)  # the DDIM that animate() runs, as diffusers reads it
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(
        _class_name="DDIMScheduler", num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
        beta_schedule="linear", steps_offset=1, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading",
        prediction_type=pipe.prediction_type), indent=2))
    if pipe.unet.config.motion_modules:
        save_motion_module(pipe.unet, folder / "motion_module.safetensors")


@torch.no_grad()
def encode_prompt(pipe, prompts):
    """list of prompts -> CLIP last hidden states (B, 77, D) on pipe.device, computed once per prompt list and text
    encoder, wherever the text encoder sits (train.py moves it off the GPU; its periodic samples still encode)"""
    te = pipe.text_encoder
    key = (id(te), tuple(prompts))
    if key not in pipe.embeddings:
        pipe.embeddings[key] = te(pipe.tokenizer(prompts).to(next(te.parameters()).device)).to(pipe.device)
    return pipe.embeddings[key]

# ----------------------------------------------------------------------------- sampling


@dataclass
class Run:
    """One animate() call: its settings (sampling_plan) and the state its mode functions share."""
    pipe: Pipeline
    frames: int  # of the video
    steps: int
    guidance: float
    mode: str  # "plain", or the long mode: "windows", "naive", "phased"
    context: int  # frames per U-Net call (the training length)
    f0: int  # 1: frame 1 is the reference E(I), kept clean (FLASH); 0: text-to-video, every frame denoised
    calls: int  # U-Net calls in all
    windows: list = ()  # windows: (start, end) over the denoised frames
    segments: list = ()  # naive / phased: (first, end) video frames of each segment after frame 1
    split: int = 0  # phased: M, the DDIM steps later segments take from segment 1 (Eq. 9)
    adain: str = "off"
    shared_noise: float = 0.0
    stg: float = 0.0  # Spatiotemporal Skip Guidance's scale (guided_eps); 0 = off
    freeinit: int = 1  # FreeInit's sampling passes (sample_freeinit); 1 = off
    freeinit_fast: bool = False  # coarse-to-fine: pass k of N takes int(steps k / N) DDIM steps
    noise_prior: tuple = (0.0, False)  # video_noise's (mixed, shared_mean): FreeInit's fresh noise follows it
    overlap: int = OVERLAP
    omega: float = PHASED_OMEGA
    loop: bool = False
    loop_weight: float = LOOP_WEIGHT
    loop_grad: str = "x0"
    callback: object = None
    log: object = None  # log(line): the time estimate after the first U-Net call
    ctx: torch.Tensor = None  # prompt embeddings: [negative; prompt] with CFG, else [prompt]
    z0: torch.Tensor = None  # E(I) (1,4,1,h,w); None in text-to-video
    done: torch.Tensor = None  # finished latents (1,4,N,h,w); the loop loss reads them
    g: torch.Generator = None  # CPU generator: the same noise on every device
    bar: object = None
    n_calls: int = 0
    t0: float = 0.0
    acp: torch.Tensor = None  # the noise schedule, DDIM's timesteps and their stride
    ts: list = ()
    dt: int = 0


def sampling_plan(pipe, frames, steps=25, guidance=7.5, text_only=False, adain=ADAIN, long=None, context=None,
                  overlap=OVERLAP, gamma=PHASED_GAMMA, loop=False, loop_grad="x0", freeinit=1, freeinit_fast=False,
                  **settings):
    """Check the settings and lay out the run: its mode, U-Net calls, windows or segments (no weights touched)."""
    L = context_frames(pipe, context)
    mode = "plain" if frames <= L else long or ("windows" if loop or text_only else "phased")
    if freeinit > 1 and mode != "plain":
        raise ValueError(f"--freeinit re-samples one clip of up to {L} frames (the U-Net's context); {frames} frames "
                         f"need --long {mode}: drop --freeinit, or ask for --frames {L} or fewer")
    if text_only and mode in ("naive", "phased"):
        raise ValueError(f"--long {mode} restarts every segment from a clean frame: text-to-video has none (no "
                         f"--image); use --long windows")
    if loop and mode == "phased":  # measured: the loop loss did not move (docs/demo.md, longer and looping videos)
        raise ValueError("--loop with --long phased: later segments re-run only the last, low-noise DDIM steps, too "
                         "late for the loop guidance to act; use --long windows (the default with --loop) or naive")
    f0 = 0 if text_only else 1
    if mode == "windows" and overlap >= L - f0:
        raise ValueError(f"--overlap {overlap}: want fewer than the {L - f0} frames a window holds"
                         + " besides frame 1" * f0)
    if loop and loop_grad == "unet" and mode == "windows":
        raise ValueError("--loop-grad unet backpropagates through one U-Net call, but --long windows fuses several "
                         "per step: use --loop-grad x0, or --long naive")
    M = min(math.ceil(round(gamma * steps, 6)), steps - 1)  # Eq. 9: M = ceil(gamma T) shared ("contour") steps
    segments = [(a, min(a + L - 1, frames)) for a in range(1, frames, L - 1)]  # video frames of each segment
    windows = context_windows(frames - f0, L - f0, overlap) if mode == "windows" else []  # frames f0..N per window
    calls = dict(plain=sum(freeinit_steps(steps, freeinit, freeinit_fast)), windows=steps * len(windows),
                 naive=steps * len(segments), phased=steps + (len(segments) - 1) * (steps - M))[mode]
    return Run(pipe, frames, steps, guidance, mode, L, f0, calls, windows, segments, M, adain, overlap=overlap,
               loop=loop, loop_grad=loop_grad, freeinit=freeinit, freeinit_fast=freeinit_fast, **settings)


def guided_eps(unet, x, t, ctx, guidance, a_t, prediction_type, stg=0.0):
    """One U-Net call with classifier-free guidance (Ho & Salimans, Eq. 6), its branches in one batch:
    eps = eps_u + guidance (eps_c - eps_u); ctx = [negative; prompt] embeddings (guidance <= 1: [prompt] alone).
    stg > 0: + stg (eps_c - eps_skip), Spatiotemporal Skip Guidance (arXiv 2411.18664), its weak model the
    prompt's branch with every motion module passed through (a third branch in the same batch).
    a_t, prediction_type: a v-model's output becomes eps first (predicted_eps)."""
    n, cfg = len(x), guidance > 1
    x_in = torch.cat([x] * (1 + cfg + bool(stg)))
    ctx_in = torch.cat([ctx, ctx[-n:]]) if stg else ctx
    skip = torch.arange(len(x_in), device=x.device) >= len(x_in) - n if stg else None
    with motion_skipped(unet, skip) if stg else nullcontext():  # no per-call walk over the modules without STG
        eps = predicted_eps(unet(x_in, t, ctx_in).float(), x_in, a_t, prediction_type).split(n)
    eps_c = eps[int(cfg)]
    out = eps[0] + guidance * (eps_c - eps[0]) if cfg else eps_c
    return out + stg * (eps_c - eps[-1]) if stg else out


def unet_call(run, x, t):
    """guided_eps on x = [clean first frame; frames], counted on the progress bar; the first call (warm-up
    included, so an upper bound) times the run."""
    next(run.bar)
    eps = guided_eps(run.pipe.unet, x, t, run.ctx, run.guidance, run.acp[t], run.pipe.prediction_type, run.stg)
    run.n_calls += 1
    if run.n_calls == 1 and run.log is not None:
        if run.pipe.device.type == "cuda":
            torch.cuda.synchronize()
        s = time.time() - run.t0
        run.log(f"{run.calls} U-Net calls of up to {min(run.frames, run.context)} frames; the first took {s:.2f} s: "
                f"about {duration(s * run.calls)} in all (then the decode)")
    return eps


def duration(s):
    """seconds -> '0.42 s', '95 s', '12 min', '3.5 h'"""
    if s < 120:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def fused_eps(run, x, t):
    """windows: each window = [E(I); its frames] (text-to-video: its frames), one U-Net call each; overlapping
    predictions fused per frame with FreeNoise's pyramid weights."""
    f0, dev = run.f0, x.device
    eps, total = torch.zeros_like(x), torch.zeros(x.shape[2], device=dev)
    for a, b in run.windows:
        w = pyramid_weights(b - a).to(dev)
        eps[:, :, f0 + a:f0 + b] += w.view(1, 1, -1, 1, 1) * unet_call(
            run, x[:, :, [0] * f0 + list(range(f0 + a, f0 + b))], t)[:, :, f0:]
        total[f0 + a:f0 + b] += w
    return eps / total.clamp(min=1).view(1, 1, -1, 1, 1)  # frame 1's eps (0) is never used


def loop_guided_eps(run, x, t, predict, video_frames):
    """LVMM: eps += mu sigma_t grad_{x_t} L_t, L_t = loop_loss on the predicted clean latents of the whole video
    (finished frames enter as constants); the gradient through DDIM's x0 formula only ("x0") or the U-Net too."""
    eps = predict(run, x, t) if run.loop_grad == "x0" else None
    with torch.enable_grad():
        xg = x.detach().requires_grad_()
        eps = predict(run, xg, t) if eps is None else eps  # "unet": the gradient also flows through eps
        check_finite(run, eps, "the U-Net's prediction")
        x0 = run.done.clone()
        x0[:, :, video_frames] = predicted_x0(xg, eps, run.acp[t])[:, :, run.f0:]
        grad = torch.autograd.grad(loop_loss(x0), xg)[0]
    return eps.detach() + run.loop_weight * (1 - run.acp[t]).sqrt() * grad  # sigma_t = sqrt(1 - a_t)


def check_finite(run, x, what):
    """A NaN or inf in the sampler stops the run with the setting that caused it (never a black video)."""
    if x.is_meta or torch.isfinite(x).all():
        return
    if run.loop and run.loop_weight > 0:
        why = f"--loop-weight {run.loop_weight:g} is too strong here: try the default {LOOP_WEIGHT:g} or lower"
    elif run.pipe.dtype != torch.float32:
        why = f"the U-Net runs in {str(run.pipe.dtype)[6:]}: try --dtype fp32"
    else:
        why = "the U-Net in fp32 predicts NaN/inf: check the weights (--base, --motion-module, --checkpoint)"
    raise ValueError(f"non-finite values in {what} during sampling: {why}")


def denoise_step(run, x, i, eps):
    """DDIM step i (Eq. 12, eta 0) on the denoised frames x[:, :, f0:], in place; LAMP's in-loop AdaIN."""
    t = run.ts[i]
    x[:, :, run.f0:] = ddim_step(x[:, :, run.f0:], eps[:, :, run.f0:], t, t - run.dt, run.acp)
    if run.adain == "lamp":
        # LAMP's in-loop rule as its code runs it (frames 1-indexed): frame 2 is aligned to frame 1 only late (its
        # i > 30 of 50, here i > 0.6 steps); frames 3.. are aligned to frame 2 at EVERY step (its `if f > 1` branch
        # overrides the late one).
        if i > round(0.6 * run.steps):
            x[:, :, 1:2] = adaptive_instance_norm(x[:, :, 1:2], x[:, :, :1])
        if x.shape[2] > 2:  # a segment may hold one frame besides frame 1
            x[:, :, 2:] = adaptive_instance_norm(x[:, :, 2:], x[:, :, 1:2])
    check_finite(run, x, f"the latents after DDIM step {i + 1}")
    return x


def denoise(run, x, video_frames, predict=unet_call, first_step=0, split=None):
    """The sampler: DDIM steps first_step.. on x = [clean first frame; frames] (text-to-video: the frames alone);
    video_frames: the denoised frames' indices in the video. Returns x and, at step `split`, the state and its
    prediction before that step (phased)."""
    anchor, at_split = x[:, :, :1].clone(), None
    guide = run.loop and run.frames - 1 in video_frames  # the loop term needs frame N's prediction
    for i in range(first_step, run.steps):
        t = run.ts[i]
        eps = loop_guided_eps(run, x, t, predict, video_frames) if guide else predict(run, x, t)
        check_finite(run, eps, f"the noise prediction at DDIM step {i + 1}")
        if i == split:
            at_split = x.clone(), eps
        denoise_step(run, x, i, eps)
        if run.f0:
            x[:, :, :1] = anchor  # FLASH: frame 1 is never denoised, it stays E(I) (naive: the previous segment's last)
        if run.callback is not None:
            run.callback(i, t, x)
    run.done[:, :, video_frames] = x[:, :, run.f0:]
    return x, at_split


def start(run, anchor, n):
    """[anchor; noise] on the device; LAMP's shared noise n_f <- a n_0 + (1 - a) n_f (not renormalised)"""
    n = n.clone()
    n[:, :, 1:] = run.shared_noise * n[:, :, :1] + (1 - run.shared_noise) * n[:, :, 1:]
    n = n.to(run.pipe.device)
    if anchor is not None:  # text-to-video: frame 1 is noise too
        n[:, :, :1] = anchor
    return n


def sample_plain(run, noise):
    """frames <= context: the whole video in every U-Net call; --long windows: FreeNoise-style sliding windows whose
    frames past the first window reuse shuffled noise of earlier ones (noise: the first window's draw)."""
    video_frames = list(range(run.f0, run.frames))
    if run.mode == "plain":
        return denoise(run, start(run, run.z0, noise), video_frames)[0]
    n, f0, L = noise.shape, run.f0, run.context
    noise = torch.cat([noise, noise.new_zeros(*n[:2], run.frames - L, *n[3:])], 2)
    freenoise_reschedule(noise[:, :, f0:], L - f0, L - f0 - run.overlap, run.g)
    return denoise(run, start(run, run.z0, noise), video_frames, fused_eps)[0]


def sample_naive(run, noise):
    """The baseline of arXiv 2405.17306 Sec. 3.4: each segment [anchor; next frames] restarts from the previous
    segment's last frame as its clean first frame (segment 1: E(I) and the plain sampler's noise)."""
    anchor, n = run.z0, noise.shape
    for k, (a, b) in enumerate(run.segments):
        seg = noise if k == 0 else torch.randn((*n[:2], b - a + 1, *n[3:]), generator=run.g)
        anchor = denoise(run, start(run, anchor, seg), list(range(a, b)))[0][:, :, -1:].clone()
    return run.done


def sample_phased(run, noise):
    """Phased inference with shared noise reschedule (arXiv 2405.17306 Sec. 3.4). Our reading, where the text is
    ambiguous: Eq. 9's 1:T counts DDIM steps in sampling order; M = ceil(gamma T) (the text says "upward rounding",
    the symbol is a floor), capped at T - 1. Eq. 10's z_t ("noise added to the input image") is segment 1's state at
    the split, whose content is the reference's; "t >= M" in Eq. 11 = the rescheduled noise seeds the re-run steps,
    which are then plain DDIM. Each later segment = [E(I); the next L - 1 frames]; a last, shorter segment takes
    segment 1's first frames' contours."""
    M, dev = run.split, run.pipe.device
    # Eq. 9: segment 1 runs all T steps; segments k > 1 reuse its first M steps and re-run steps M+1..T.
    _, (z_split, n_t) = denoise(run, start(run, run.z0, noise), list(range(1, run.context)), split=M)
    a_t = run.acp[run.ts[M]]
    contour = predicted_x0(z_split, n_t, a_t)[:, :, 1:]  # segment 1's clean estimate at the split
    n_t = n_t[:, :, 1:]  # Eq. 10: n(t) = eps_theta(z_t, t, c), predicted on segment 1's state at the split
    # Eq. 11: n~_k(t) = n(t) + omega eps_k, eps_k ~ N(0, I), one draw per later segment and frame.
    # Eq. 12: the later segments' sequences [n~_2, ..., n~_K] laid end to end, then their frames shuffled.
    seq = torch.cat([n_t + run.omega * torch.randn(n_t.shape, generator=run.g).to(dev) for _ in run.segments[1:]], 2)
    seq = seq[:, :, torch.randperm(seq.shape[2], generator=run.g).to(dev)]
    used = 0
    for a, b in run.segments[1:]:  # segment k starts at the split from segment 1's contours + its own noise
        z = a_t.sqrt() * contour[:, :, :b - a] + (1 - a_t).sqrt() * seq[:, :, used:used + b - a]
        used += b - a
        denoise(run, torch.cat([run.z0, z], 2), list(range(a, b)), first_step=M)
    return run.done


def set_steps(run, steps):
    """run's DDIM schedule for `steps` steps: its timesteps and their stride"""
    run.steps, run.ts, run.dt = steps, ddim_timesteps(steps).tolist(), TRAIN_STEPS // steps


def sample_freeinit(run, noise):
    """FreeInit (freeinit_noise) over the plain sampler: pass 1 from `noise`; every later pass from the previous
    pass's frames, re-noised with pass 1's noise and fresh noise of the run's prior (video_noise; LAMP's shared noise
    is in pass 1's only). Frame 1 of an image-to-video run stays E(I). Coarse-to-fine: each pass takes its own number
    of DDIM steps (freeinit_steps)."""
    f0, steps, video_frames = run.f0, run.steps, list(range(run.f0, run.frames))
    n0, a_T, x = start(run, run.z0, noise), run.acp[TRAIN_STEPS - 1], None
    for k in freeinit_steps(steps, run.freeinit, run.freeinit_fast):
        set_steps(run, k)
        z = n0.clone()
        if x is not None:  # FreeInit's noise reinitialisation
            fresh = video_noise(noise.shape, run.g, *run.noise_prior).to(x.device)
            z[:, :, f0:] = freeinit_noise(x[:, :, f0:], n0[:, :, f0:], fresh[:, :, f0:], a_T)
        x = denoise(run, z, video_frames)[0]
    set_steps(run, steps)
    return x


MODES = dict(plain=sample_plain, windows=sample_plain, naive=sample_naive, phased=sample_phased)


@contextmanager
def cross_frame_attention(unet, on):
    """FLASH's cross-frame attention (every attn1 keys on the first frame, model.first_frame_kv) on or off while the
    block runs; off = AnimateDiff's own per-frame self-attention (text-to-video)."""
    layers = [(m, m.cross_frame) for m in unet.modules() if isinstance(m, Attention)]
    for m, was in layers:
        m.cross_frame = was and on
    try:
        yield
    finally:
        for m, was in layers:
            m.cross_frame = was


@contextmanager
def motion_skipped(unet, skip):
    """skip (B,) bool or None: the clips of the batch whose motion modules pass their input through while the block
    runs: the U-Net as the image model it was before AnimateDiff, STG's weak model here (guided_eps)."""
    mods = [m for m in unet.modules() if isinstance(m, MotionModule)]
    for m in mods:
        m.skip = skip
    try:
        yield
    finally:
        for m in mods:
            m.skip = None


def encode(run, image, prompt, negative_prompt, height, width, seed, mixed_noise, shared_mean=False):
    """The prompt's embeddings, E(I) and the initial noise -> run (ctx, z0, done, g, ts); returns the image batch
    (1,3,H,W) or None, and the noise of the first U-Net call (1,4,min(N, context),h,w)."""
    pipe, vae = run.pipe, run.pipe.vae
    dev, vdt = pipe.device, next(vae.parameters()).dtype
    img = None if image is None else (image if torch.is_tensor(image) else load_image(image, height, width))[None]
    img = None if img is None else img.to(dev, vdt)  # 1 3 H W
    run.ctx = encode_prompt(pipe, [negative_prompt, prompt] if run.guidance > 1 else [prompt])  # CFG: [uncond; cond]
    down = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling: 8 for SD
    shape = (1, vae.config.latent_channels, min(run.frames, run.context), height // down, width // down)
    run.done = torch.zeros(1, shape[1], run.frames, *shape[3:], device=dev)
    if img is not None:
        run.z0 = vae.encode(img).float()[:, :, None]  # 1 4 1 h w: E(I), the posterior mean
        run.done[:, :, :1] = run.z0
    run.g = torch.Generator().manual_seed(seed)
    run.acp, run.noise_prior = alphas_cumprod().to(dev), (mixed_noise, shared_mean)
    set_steps(run, run.steps)
    return img, video_noise(shape, run.g, mixed_noise, shared_mean)  # the plain sampler's draw in every mode


def decode(pipe, x, img, detail=True):
    """latents (1,4,F,h,w) -> uint8 frames (F,3,H,W) through the VAE decoder, the Detail Enhancement Decoder fed by
    the reference's encoder features when it is loaded (and detail, and a reference)."""
    vae = pipe.vae
    use_detail = bool(detail and img is not None and pipe.info.get("detail", True) and vae.config.detail)
    ref = vae.encoder_features(img) if use_detail else None  # computed once, shared by all frames
    video = vae.decode(x[0].transpose(0, 1).to(next(vae.parameters()).dtype), ref=ref, chunk=4).float()  # F 3 H W
    bad = [] if video.is_meta else [f for f in range(video.shape[0]) if not torch.isfinite(video[f]).all()]
    if bad:  # the latents are finite (check_finite): the decoder overflowed
        raise ValueError(f"NaN/inf in decoded frames {bad[:5]}{' ...' * (len(bad) > 5)}: run the VAE in fp32 "
                         f"(--vae-dtype fp32)")
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), use_detail  # F 3 H W


@torch.no_grad()
def animate(pipe, image, prompt, negative_prompt="", frames=16, steps=25, guidance=7.5, seed=0, height=None,
            width=None, adain=None, shared_noise=0.0, detail=True, progress=True, callback=None, long=None,
            context=None, overlap=OVERLAP, gamma=PHASED_GAMMA, omega=PHASED_OMEGA, loop=False,
            loop_weight=LOOP_WEIGHT, loop_grad="x0", hist_match=False, mixed_noise=0.0, shared_mean=False, stg=0.0,
            freeinit=1, freeinit_fast=False, log=None):
    """image (path, PIL image, or (3,H,W) tensor in [-1,1]) -> uint8 frames (F,H,W,3) whose frame 0 is the image.
    image None: AnimateDiff's own text-to-video (every frame from noise, cross-frame attention off, no AdaIN).
    adain: "post" (AdaIN of frames 2..N to frame 1 after denoising, the FLASH paper's text), "lamp" (LAMP's in-loop
    rule + post; the default with an image), "off". hist_match: LAMP's RGB histogram matching of frames 2..N to
    frame 1 after decoding. Frames beyond `context` (default: the training length) use `long`: "phased" (default;
    arXiv 2405.17306 Sec. 3.4), "windows" (sliding windows, FreeNoise; the default with loop and in text-to-video)
    or "naive" (each segment restarts from the previous one's last frame); with frames <= context every mode is the
    plain sampler. stg: Spatiotemporal Skip Guidance's scale (guided_eps). freeinit: FreeInit's sampling passes
    (sample_freeinit; 1 = off), coarse-to-fine with freeinit_fast. loop: LVMM's looping guidance with weight
    loop_weight, its gradient taken through DDIM's x0 formula ("x0") or also through the U-Net ("unet").
    callback(i, t, latents) runs after every DDIM step on the frames being denoised (the whole video, or one
    phased/naive segment); log(line) gets the time estimate after the first U-Net call; timing, checks and the final
    latents land in pipe.info["last_run"]."""
    text_only, s = image is None, pipe.info.get("settings", {})
    if text_only and (adain not in (None, "off") or hist_match):
        raise ValueError(f"--{'hist-match' if hist_match else 'adain ' + str(adain)} aligns frames 2..N to the "
                         f"reference frame: text-to-video (no --image) has none")
    adain = ("off" if text_only else ADAIN) if adain is None else adain
    height, width = height or s.get("height", 512), width or s.get("width", 512)
    check_size(height, width)  # validate
    check_sampling(frames, steps, shared_noise, adain, long, overlap, gamma, omega, loop, loop_weight, loop_grad,
                   mixed_noise, stg, freeinit)
    run = sampling_plan(pipe, frames, steps, guidance, text_only, adain, long, context, overlap, gamma, loop,
                        loop_grad, freeinit, freeinit_fast, shared_noise=shared_noise, omega=omega,
                        loop_weight=loop_weight, callback=callback, log=log, stg=stg)
    img, noise = encode(run, image, prompt, negative_prompt, height, width, seed, mixed_noise, shared_mean)  # encode
    run.bar = iter(tqdm(range(run.calls), desc="DDIM" if run.mode == "plain" else f"DDIM {run.mode} (U-Net calls)",
                        disable=not progress))
    run.t0 = time.time()
    with cross_frame_attention(pipe.unet, on=not text_only):
        x = (sample_freeinit if run.freeinit > 1 else MODES[run.mode])(run, noise)  # dispatch
    if adain != "off":  # post-processing (FLASH A3.2, "following LAMP"): every later frame takes frame 1's statistics
        x[:, :, 1:] = adaptive_instance_norm(x[:, :, 1:], x[:, :, :1])
    for _ in run.bar:  # closes the progress bar (every call is counted already)
        pass
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    denoise_s = time.time() - run.t0
    video, use_detail = decode(pipe, x, img, detail)  # decode
    out = video.permute(0, 2, 3, 1).cpu().numpy()  # F 3 H W -> F H W 3
    if hist_match:  # LAMP's inference_script.py: frames 2..N take frame 1's per-channel RGB histogram
        out[1:] = match_histograms(out[1:], out[0])
    black = [f for f in range(frames) if out[f].max() == 0]
    if black:
        print(f"warning: frames {black} are entirely black", file=sys.stderr)
    pipe.info["last_run"] = dict(denoise_s=denoise_s, detail=use_detail, long=run.mode, context_frames=run.context,
                                 unet_calls=run.calls, latents=x.cpu(), text_to_video=text_only, black_frames=black,
                                 loop_loss=loop_loss(x).item() if frames >= 3 else None)
    return out


# ----------------------------------------------------------------------------- CLI


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(paths):
    """--image values (files or folders of images) -> image files, folders sorted by name"""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
            if not found:
                raise FileNotFoundError(f"--image {p}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    return out


def output_paths(args, images, seed, words):
    """one video path per image (text-to-video: images = [None]): --out itself for one image; for several, --out is a
    folder of <image name>.mp4"""
    stamp = f"samples/{time.strftime('%Y%m%d-%H%M%S')}-{seed}-{words}"
    if len(images) == 1:
        return [Path(args.out or f"{stamp}.mp4")]
    folder = Path(args.out or stamp)
    if folder.suffix.lower() in (".mp4", ".mov", ".mkv", ".gif"):
        raise ValueError(f"--out {args.out}: with {len(images)} images --out is a folder (one video per image, "
                         f"named after it)")
    out, seen = [], set()
    for im in images:
        name = im.stem if im.stem not in seen else f"{im.stem}-{im.suffix[1:]}"  # a.png and a.jpg
        seen.add(name)
        out.append(folder / f"{name}.mp4")
    return out


def check_args(args):
    """Reject impossible settings before any weights are read or anything is written."""
    if args.image:
        list_images(args.image)
    elif args.adain not in (None, "off") or args.hist_match:
        raise ValueError(f"--{'hist-match' if args.hist_match else 'adain ' + args.adain} aligns frames 2..N to the "
                         f"reference image: text-to-video (no --image) has none")
    elif args.long in ("naive", "phased"):
        raise ValueError(f"--long {args.long} restarts every segment from a clean frame: text-to-video has none (no "
                         f"--image); use --long windows")
    check_sampling(args.frames, args.steps, args.shared_noise, args.adain or ADAIN, args.long, args.overlap,
                   args.gamma, args.omega, args.loop, args.loop_weight, args.loop_grad, stg=args.stg,
                   freeinit=args.freeinit)
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: want a finite scale (FLASH uses 7.5; <= 1 turns CFG off)")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps}: want a positive frame rate")
    if args.context_frames is not None and args.context_frames < 2:
        raise ValueError(f"--context-frames {args.context_frames}: want at least 2 (the reference and one frame)")
    if args.out:
        parent = Path(args.out).absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise PermissionError(f"--out {args.out}: cannot write there ({parent} is not a writable folder)")


def prompt_words(prompt):
    """a prompt -> its first words as a file-name part: 'a person is shooting...' -> a_person_is_shooting..."""
    return "_".join(re.findall(r"[a-z0-9]+", prompt.lower())[:6])[:60] or "video"


def resolve_args(args):
    """Fill what the flags leave open from the last unet-stage checkpoint's settings.json (else the defaults) and
    check everything before any weights are read."""
    check_args(args)
    trained = [(f, s) for f, s in map(read_settings, args.checkpoint) if s.get("stage", "unet") == "unet"]
    ck_file, s = trained[-1] if trained else (None, {})
    h, w = args.height or s.get("height", 512), args.width or s.get("width", 512)
    check_size(h, w)
    if s.get("height") and (h, w) != (s["height"], s.get("width")) and not args.force_size:
        raise ValueError(f"checkpoint {ck_file} was trained at {s['height']}x{s.get('width')}, you asked for "
                         f"{h}x{w} (use --force-size to override)")
    caps = s.get("captions") or ([s["prompt"]] if s.get("prompt") else [])  # what the checkpoint trained on
    if args.prompt is None and len(caps) > 1:  # joint training: the action to animate must be named
        raise ValueError(f"--prompt is required: checkpoint {ck_file} learnt {len(caps)} captions: {'; '.join(caps)}")
    args.prompt = args.prompt if args.prompt is not None else (caps[0] if caps else None)
    if args.prompt is None:
        raise ValueError("--prompt is required (no --checkpoint with a training prompt was given)")
    args.height, args.width, args.frames, args.fps = h, w, args.frames or s.get("frames", 16), args.fps or s.get(
        "fps", 8)
    check_sampling(args.frames, loop=args.loop)
    args.base, args.motion_module = args.base or s.get("base"), args.motion_module or s.get("motion_module")
    if not args.base:
        raise ValueError("--base is required: an SD-1.5 diffusers folder or single-file checkpoint")
    for what, p in (("base model", args.base), ("motion module", args.motion_module)):
        if p and not os.path.exists(p):
            raise FileNotFoundError(f"{what} not found: {p}")
    args.mixed_noise = s.get("mixed_noise", 0.0) if args.mixed_noise is None else args.mixed_noise
    args.adain = args.adain or (ADAIN if args.image else "off")
    args.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31


def plan_line(args, plan, videos):
    """What the run will do, before it starts: U-Net calls (the time: unet_call times the first one) and memory."""
    how = "" if plan.mode == "plain" else f" ({plan.mode})"
    how += f" over {plan.freeinit} FreeInit passes" if plan.freeinit > 1 else ""
    frames_gib = args.frames * 3 * args.height * args.width * 5 / 2**30  # fp32 on the device + uint8 on the host
    return (f"plan: {videos} video(s) of {args.frames} frames {args.height}x{args.width}"
            f"{' from text alone' * (not args.image)}: {plan.calls} U-Net calls of up to "
            f"{min(args.frames, plan.context)} frames "
            f"each{how}, CFG batch of {2 if args.guidance > 1 else 1}{' + 1 for STG' * bool(args.stg)}; the decoded "
            f"frames take {frames_gib:.2g} GiB"
            f" (check memory first: python sample.py --estimate-memory ...)")


def sidecar(args, pipe, file, out, secs):
    """The JSON written beside every video: settings, weights, what the run did."""
    last = pipe.info["last_run"]
    return dict(image=None if file is None else os.path.abspath(file),
                mode="image-to-video" if file is not None else "text-to-video", prompt=args.prompt,
                negative_prompt=args.negative_prompt, frames=args.frames, steps=args.steps, guidance=args.guidance,
                seed=args.seed, height=args.height, width=args.width, fps=args.fps, adain=args.adain,
                hist_match=args.hist_match, shared_noise=args.shared_noise, mixed_noise=args.mixed_noise,
                shared_noise_mean=args.shared_noise_mean, stg=args.stg, freeinit=args.freeinit,
                freeinit_fast=args.freeinit_fast, long=last["long"],
                context_frames=last["context_frames"],
                unet_calls=last["unet_calls"],
                overlap=args.overlap, gamma=args.gamma, omega=args.omega, loop=args.loop,
                loop_weight=args.loop_weight, loop_grad=args.loop_grad, loop_loss=last["loop_loss"],
                detail=last["detail"], device=str(pipe.device), dtype=str(pipe.dtype)[6:],
                detail_full_res=last["detail"] and pipe.vae.config.detail_full_res and not args.no_detail_full_res,
                vae_dtype=args.vae_dtype, out=str(out),
                sampler=f"DDIM eta 0, linear betas {BETA_START}-{BETA_END}, steps_offset 1, leading, set_alpha_to_one",
                prediction_type=pipe.prediction_type,
                motion_version=pipe.info.get("motion_version"), seconds=round(secs, 2),
                weights=dict(base=os.path.abspath(args.base), motion_module=pipe.info.get("motion_file"),
                             tokenizer=pipe.info["tokenizer"], checkpoints=pipe.info["checkpoints"]),
                checkpoint_settings=pipe.info["settings"], black_frames=last["black_frames"])


def run(args):
    resolve_args(args)  # fail fast: before any weights are read
    files = list_images(args.image) if args.image else [None]  # None: text-to-video
    images = [f if f is None else load_image(f, args.height, args.width) for f in files]  # unreadable: fails now
    outs = output_paths(args, files, args.seed, prompt_words(args.prompt))
    pipe = load_pipeline(args.base, args.motion_module, args.checkpoint, args.device, args.dtype, not args.no_detail,
                         args.tokenizer, args.vae_dtype)  # weights once; the prompt's embeddings once
    if args.no_detail_full_res:
        pipe.vae.full_res_attention(False)
    kw = dict(adain=args.adain, shared_noise=args.shared_noise, detail=not args.no_detail, long=args.long,
              context=args.context_frames, overlap=args.overlap, gamma=args.gamma, omega=args.omega, loop=args.loop,
              loop_weight=args.loop_weight, loop_grad=args.loop_grad, hist_match=args.hist_match,
              mixed_noise=args.mixed_noise, shared_mean=args.shared_noise_mean, stg=args.stg,
              freeinit=args.freeinit, freeinit_fast=args.freeinit_fast)
    plan = sampling_plan(pipe, args.frames, args.steps, args.guidance, not args.image, args.adain, args.long,
                         args.context_frames, args.overlap, args.gamma, args.loop, args.loop_grad, args.freeinit,
                         args.freeinit_fast)
    print(plan_line(args, plan, len(files)), flush=True)
    for i, (file, image, out) in enumerate(zip(files, images, outs)):
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        video = animate(pipe, image, args.prompt, args.negative_prompt, args.frames, args.steps, args.guidance,
                        args.seed, args.height, args.width, log=print if i == 0 else None, **kw)
        secs, last = time.time() - t0, pipe.info["last_run"]
        write_video(video, out, args.fps)
        side = out.with_suffix(".json") if out.suffix.lower() in (".mp4", ".mov", ".mkv", ".gif") else \
            Path(f"{out}.json")
        side.write_text(json.dumps(sidecar(args, pipe, file, out, secs), indent=2))
        mem = f" | peak GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if pipe.device.type == "cuda" else ""
        how = "" if last["long"] == "plain" else f", {last['long']} over {last['context_frames']}-frame U-Net calls"
        print(f"saved {out} | {args.frames}x{args.height}x{args.width} @ {args.fps:g} fps{how} | {secs:.1f} s, "
              f"{last['unet_calls'] / max(last['denoise_s'], 1e-9):.2f} U-Net calls/s{mem}")


def estimate_memory(args):
    """--estimate-memory: memory.estimate for these flags (and a checkpoint's settings.json defaults, if given);
    no weights read. The detail decoder counts when a decoder-stage checkpoint is given."""
    import memory  # memory.py sits on top of sample.py (it runs its sampler on meta tensors)
    check_args(args)
    settings = [read_settings(c)[1] for c in args.checkpoint]
    s = next((s for s in reversed(settings) if s.get("stage", "unet") == "unet"), {})
    detail = not args.no_detail and any(s.get("stage") == "decoder" for s in settings)
    e = memory.estimate("sample", frames=args.frames or s.get("frames", 16), height=args.height or s.get("height", 512),
                        width=args.width or s.get("width", 512), dtype="bf16" if args.dtype == "auto" else args.dtype,
                        vae_dtype=args.vae_dtype, guidance=args.guidance, detail=detail, context=args.context_frames,
                        text_only=not args.image, stg=args.stg)
    print(memory.report(e))
    return e


def get_parser():
    p = argparse.ArgumentParser(description="FLASH (arXiv 2503.00276): animate a reference image into a video "
                                            "(without --image: AnimateDiff's text-to-video).")
    # inputs
    p.add_argument("--image", nargs="+",
                   help="reference image(s) = frame 1, or folders of them (any size/mode; scaled + centre-cropped); "
                        "one video + JSON each. Without --image: AnimateDiff's own text-to-video (every frame from "
                        "noise, cross-frame attention off, no AdaIN)")
    p.add_argument("--prompt", help="text prompt (default: the checkpoint's caption; needed if it learnt several)")
    p.add_argument("--negative-prompt", default="", help="prompt of the unconditional CFG branch")
    # weights
    p.add_argument("--base", help="SD-1.5 diffusers folder or single file (default: the checkpoint's)")
    p.add_argument("--motion-module", help="AnimateDiff motion module file or MotionAdapter folder")
    p.add_argument("--checkpoint", nargs="+", default=[], help="train.py output folder(s) or .safetensors file(s)")
    p.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (for a single-file --base)")
    # sampling: defaults of FLASH A3.2 / AnimateDiff
    p.add_argument("--frames", type=int, help="frames (default: the checkpoint's, else 16); any number >= 2")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--stg", type=float, default=0.0,
                   help="Spatiotemporal Skip Guidance scale (arXiv 2411.18664): away from the same U-Net with its "
                        "motion modules skipped: steadier motion, one more clip per U-Net call (default 0 = off; "
                        "measured on the demo's toy only: docs/demo.md)")
    p.add_argument("--freeinit", type=int, default=1, metavar="N",
                   help="FreeInit (arXiv 2312.07537): sample N times, each pass from the last one's low "
                        "spatio-temporal frequencies + fresh noise: more coherent motion, N times the U-Net calls "
                        "(default 1 = off; FreeInit uses 3; measured on the demo's toy only: docs/demo.md)")
    p.add_argument("--freeinit-fast", action="store_true",
                   help="FreeInit's coarse-to-fine sampling: pass k of N takes steps k / N DDIM steps (3 passes of "
                        "25: 8 + 16 + 25 calls)")
    p.add_argument("--seed", type=int, help="noise seed (default: random, written to the file name and JSON)")
    p.add_argument("--height", type=int, help="multiple of 8 (default: the checkpoint's, else 512)")
    p.add_argument("--width", type=int, help="multiple of 8 (default: the checkpoint's, else 512)")
    p.add_argument("--force-size", action="store_true", help="allow a size other than the checkpoint's")
    p.add_argument("--adain", choices=ADAIN_MODES,
                   help=f"AdaIN on the latents: post = frames 2..N take frame 1's statistics after denoising (the "
                        f"paper's text); lamp = LAMP's in-loop rule + post; off (default: {ADAIN}; text-to-video off)")
    p.add_argument("--hist-match", action="store_true",
                   help="match each frame's RGB histogram to frame 1 after decoding (LAMP's inference script)")
    p.add_argument("--shared-noise", type=float, default=0.0, help="LAMP shared-noise alpha (LAMP: 0.2; 0 = off)")
    p.add_argument("--mixed-noise", type=float,
                   help="PYoCo mixed noise prior: share of the initial noise common to all frames (default: the "
                        "checkpoint's training value, else 0 = independent frames, as SD-1.5 + AnimateDiff)")
    p.add_argument("--shared-noise-mean", action="store_true",
                   help="every frame's initial noise has frame 1's per-channel mean (each frame stays N(0, I)): the "
                        "mean sets a frame's overall colour at t = T, so the background stops flickering; needs no "
                        "retraining (docs/demo.md)")
    p.add_argument("--no-detail", action="store_true", help="decode with the plain SD decoder (ablation)")
    p.add_argument("--no-detail-full-res", action="store_true",
                   help="skip the detail decoder's full-resolution patch attention if it was trained with it "
                        "(4.4 TFLOP per 512^2 frame; an approximation)")
    # longer and looping videos
    p.add_argument("--long", choices=LONG_MODES,
                   help="how frames beyond --context-frames are made: phased (default; arXiv 2405.17306), windows "
                        "(sliding windows, FreeNoise; the default with --loop), naive (each segment restarts from "
                        "the previous one's last frame)")
    p.add_argument("--context-frames", type=int,
                   help="frames per U-Net call (default: the checkpoint's training frames, else 16)")
    p.add_argument("--overlap", type=int, default=OVERLAP, help="windows: frames shared by neighbouring windows")
    p.add_argument("--gamma", type=float, default=PHASED_GAMMA,
                   help="phased: share of the DDIM steps later segments take from segment 1 (Eq. 9)")
    p.add_argument("--omega", type=float, default=PHASED_OMEGA, help="phased: noise added in the reschedule (Eq. 11)")
    p.add_argument("--loop", action="store_true", help="LVMM's looping guidance: the end matches the start")
    p.add_argument("--loop-weight", type=float, default=LOOP_WEIGHT,
                   help=f"looping guidance weight mu, 0 to {LOOP_WEIGHT_MAX:g}: the loop term mu sigma_t grad is "
                        f"as large as the noise prediction at mu 1; measured on a tiny model, the loop loss is lowest "
                        f"at 0.3-1 and at {LOOP_WEIGHT_MAX:g} ends worse than without guidance")
    p.add_argument("--loop-grad", default="x0", choices=["x0", "unet"],
                   help="loop gradient through DDIM's x0 formula only (x0) or also through the U-Net (unet)")
    # output and runtime
    p.add_argument("--fps", type=float, help="playback fps (default: the checkpoint's, else 8)")
    p.add_argument("--out", help=".mp4, .gif, or a folder for PNG frames (default: samples/<time>-<seed>-<prompt>.mp4)"
                                 "; with several images a folder of <image name>.mp4")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="U-Net dtype")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"], help="VAE dtype")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the peak GPU memory these settings need (memory.py: meta tensors, no weights read, "
                        "no GPU) and exit")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    return exit_on_error(estimate_memory if args.estimate_memory else run, args, oom=(
        "CUDA out of memory: try fewer --frames or --context-frames, a smaller --height/--width, or --vae-dtype bf16 "
        "(check first: python sample.py --estimate-memory ...)"))


if __name__ == "__main__":
    plain_warnings()
    main()
