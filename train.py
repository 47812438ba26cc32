"""FLASH few-shot training (arXiv 2503.00276).

Stage "unet" (Sec. 3.2, A2.2, A3.2): each step puts an original clip and a strongly augmented copy through the U-Net
in one batch, with the same t and noise and a clean first frame; motion feature alignment after every motion module,
correspondence alignment (the original's Q, K) in a random 50 % of the cross-frame attention layers; eps-MSE on
frames 2..N of both clips. Only the motion modules and attn1.to_k/to_v train.
Stage "decoder" (Sec. 3.3, A2.3): the Detail Enhancement Decoder's branches learn to restore distorted clips.
Clips as AnimateDiff's dataset cuts them (A3.2 "we build upon the codebase of AnimateDiff"): 16 frames, stride 4;
the caption dropped for 10 % of steps (null text, for classifier-free guidance); several captions in one folder
train several actions jointly (Table A1).
    python train.py --videos dir/ --prompt "a person is ..." --base sd15/ --motion-module mm_sd_v15_v2.ckpt
"""
import argparse
import glob
import json
import math
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from data import (clip_stride, decoder_distort, exit_on_error, load_videos, plain_warnings, sample_clip,
                  strong_augment, tqdm, write_video)
from model import DTYPES, autocast_dtype, read_json
from sample import (alphas_cumprod, animate, detail_overrides, encode_prompt, load_image, load_pipeline, predicted_eps,
                    prompt_words, video_noise)
from vae import load_vae


def get_parser():
    p = argparse.ArgumentParser(description="FLASH: learn an action from a few videos (stage unet), then the "
                                            "detail-enhancement decoder (stage decoder).")
    # Data
    p.add_argument("--videos", help="folder of example videos (mp4/mov/avi/webm/gif or folders of numbered frames)")
    p.add_argument("--prompt", help="caption of the action (a name.txt beside a video, or its entry in the folder's "
                                    "captions.json, overrides it; several captions = joint training)")
    p.add_argument("--frames", type=int, default=16, help="frames per training clip")
    p.add_argument("--stride", type=int, default=4,  # AnimateDiff's sample_stride (A3.2: its codebase)
                   help="take every stride-th source frame (clip fps = fps/stride; AnimateDiff: 4); a video too "
                        "short for the span uses the largest stride that fits")
    p.add_argument("--clip-start", choices=["first", "random"], default="first",  # A3.1: test images = first frames
                   help="first: every clip starts at the video's first frame (the action's start, as the test "
                        "references are first frames); random: anywhere that fits (AnimateDiff)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no random horizontal flip (for actions whose direction matters)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    # Model
    p.add_argument("--base", help="SD-1.5 diffusers folder or single-file checkpoint")
    p.add_argument("--motion-module", help="AnimateDiff motion module (mm_sd_v15_v2.ckpt, v3, v1, MotionAdapter)")
    p.add_argument("--stage", choices=["unet", "decoder"], default="unet")
    # FLASH Motion Alignment Module (Sec. 3.2); the switches give the variants of Table 2
    p.add_argument("--no-strong-aug", dest="strong_aug", action="store_false",
                   help="train on the original clip only (variant #1, LAMP-style; implies no alignment)")
    p.add_argument("--no-motion-align", dest="motion_align", action="store_false")
    p.add_argument("--no-corr-align", dest="corr_align", action="store_false")
    p.add_argument("--tau", type=float, default=90.0, help="motion channels = top (100-tau)%% by temporal std")
    p.add_argument("--corr-prob", type=float, default=0.5, help="share of cross-frame layers aligned per step")
    p.add_argument("--timesteps", choices=["cosine", "uniform"], default="cosine",
                   help="cosine: p(t) ∝ 1 - alpha cos(pi t/T), favouring large t (ReVersion)")
    p.add_argument("--timestep-alpha", type=float, default=0.5,
                   help="alpha in [0, 1] of the cosine rule: 0 = uniform, 1 = strongest (p(0) = 0)")
    p.add_argument("--loss-weight", choices=["eps", "trunc-snr"], default="eps",
                   help="eps: the eps-MSE (Eq. 1); trunc-snr: x max(1, 1/SNR_t), the clean-latent MSE at large t where "
                        "the motion's layout is decided (the demo: its toy base was pretrained with it)")
    p.add_argument("--mixed-noise", type=float, default=0.0,
                   help="PYoCo mixed noise prior: share of the noise common to all frames (0 = independent, as "
                        "AnimateDiff trains; use the base's own value: the demo's toy base was trained with it)")
    p.add_argument("--null-text-prob", type=float, default=0.1,  # AnimateDiff's training config
                   help="share of steps trained on the empty prompt, the unconditional branch of classifier-free "
                        "guidance (AnimateDiff's cfg_random_null_text_ratio 0.1; 0 = off)")
    # FLASH Detail Enhancement Decoder (Sec. 3.3); Table A2's branch ablations
    p.add_argument("--detail-branches", default="warp,patch", help="decoder branches: warp, patch or warp,patch")
    p.add_argument("--detail-full-res", choices=["auto", "on", "off"], default="auto",
                   help="patch attention also at full resolution (65,536 tokens per 512^2 frame); auto = on on CUDA")
    # Optimisation
    p.add_argument("--steps", type=int, help="default 20000 (unet) / 10000 (decoder)")
    p.add_argument("--lr", type=float, help="default 5e-5 (unet) / 1e-4 (decoder)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant (A3.2) or cosine decay to 0 over --steps (the demo's short runs)")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an exponential moving average of the trained weights (e.g. 0.995 per step) and save it "
                        "as the checkpoint's weights; 0: off, the last step's weights (A3.2)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--decoder-frames", type=int, default=4, help="frames decoded per step in the decoder stage")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="clips per rank per step, gradients summed (effective batch = ranks x K; A3.2: 1 per GPU)")
    p.add_argument("--seed", type=int, default=0)
    # Runtime
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="frozen weights and autocast (GPU default bf16)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--out", default="runs/flash", help="output folder (checkpoints, settings, loss curve)")
    p.add_argument("--save-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of flash.safetensors (fp32: resume is exact; bf16/fp16 halve it for sharing, and "
                        "resume then continues from the rounded weights)")
    p.add_argument("--resume", help="checkpoint folder, or an output folder (its latest checkpoint)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    p.add_argument("--sample-image", help="reference image for periodic samples")
    p.add_argument("--sample-every", type=int, default=0, help="steps between samples (0 = only at the end)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the peak GPU memory of one training step with these flags (memory.py: meta tensors, "
                        "no weights or videos read, no GPU; --dtype default bf16) and exit")
    return p


# ----------------------------------------------------------------------------- helpers

def is_trainable(name, stage):
    """FLASH A3.2: the temporal attention layers (motion modules) and the spatial attn1 key/value projections;
    in the decoder stage only the new detail-enhancement branches."""
    if stage == "decoder":
        return name.startswith("decoder.detail.")
    return "motion_modules." in name or ".attn1.to_k." in name or ".attn1.to_v." in name


def set_lr(opt, lr, step=0, cosine_steps=0):
    """Every param group's lr := `lr` (constant, A3.2), or with cosine_steps > 0 `lr` decayed to 0 over them:
    0.5 (1 + cos(pi step / cosine_steps)) lr (--lr-schedule cosine, our choice for short runs: with batch 1 the weights
    keep the last steps' gradient noise, a decay averages it out; the demo's pretraining). Returns the step's lr."""
    lr = lr * 0.5 * (1 + math.cos(math.pi * step / cosine_steps)) if cosine_steps else lr
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params, per tensor (--ema-decay; the paper keeps the last weights). Why: with
    batch 1 and a constant lr the last iterate carries the last steps' gradient noise; on the demo, the held-out score
    of checkpoints 100 steps apart swings by up to 2.7 px (docs/demo.md: there a checkpoint average helped one seed,
    this running average did not carry over to three). The average starts at the weights training starts from."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.values()), [params[n] for n in ema], 1.0 - decay)


def timestep_weights(alpha, T=1000):
    """ReVersion's p(t) ∝ 1 - alpha cos(pi t/T): alpha 0 is uniform, larger alpha favours large t"""
    return 1 - alpha * torch.cos(math.pi * torch.arange(T, dtype=torch.float64) / T)


def loss_weight(kind, acp_t):
    """Per-step weight of the eps-MSE at timestep t (acp_t = alpha-bar_t): 1 for "eps" (Eq. 1); for "trunc-snr"
    Salimans & Ho's truncated SNR weighting max(1, 1/SNR_t), SNR_t = acp_t/(1-acp_t) (arXiv 2202.00512 Sec. 4): the
    eps-MSE is the clean-latent MSE times SNR_t, so at large t it barely sees what is decided there."""
    return torch.ones_like(acp_t) if kind == "eps" else ((1 - acp_t) / acp_t).clamp(min=1)


def set_alignment(unet, motion_tau=None, corr_layers=()):
    """Turn FLASH's alignment hooks on (batch = [original; augmented]) or, with no arguments, off."""
    for m in unet.modules():
        if hasattr(m, "align_tau"):
            m.align_tau = motion_tau
    for i, attn in enumerate(cross_frame_layers(unet)):
        attn.share_qk = i in corr_layers


def cross_frame_layers(unet):
    return [m for n, m in unet.named_modules() if n.endswith(".attn1")]


def atomic_write(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out, step, tensors, settings, state, keep, dtype=torch.float32):
    """checkpoint-{step}/ with flash.safetensors (trained tensors), settings.json and state.pt (resume);
    written to a .tmp folder first, then renamed, so a crash never leaves half a checkpoint."""
    final = os.path.join(out, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().to(dtype).cpu().contiguous() for k, v in tensors.items()},
              os.path.join(tmp, "flash.safetensors"))
    with open(os.path.join(tmp, "settings.json"), "w") as f:
        json.dump({**settings, "step": step}, f, indent=2)
    torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(glob.glob(os.path.join(out, "checkpoint-??????")))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path):
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoint-??????")))
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoint-NNNNNN folder with state.pt found")
    return found[-1]


def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group from its env vars (NCCL on CUDA, gloo on CPU), one GPU
    per local rank -> (rank, world size). Plain `python train.py`: (0, 1) and no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
    return dist.get_rank(), world


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def stream_seed(seed, slot):
    """Seed of micro-batch slot `slot` of the effective batch (slot = rank x K + j): every slot draws its own clips,
    t and noise (A3.2: batch 1 per GPU). Slot 0 is --seed itself, so one process without accumulation is unchanged."""
    return seed + 1_000_003 * slot


def average_gradients(params, n):
    """DDP by hand: sum each trainable gradient over the ranks (all-reduce; frozen weights have none), then divide by
    the effective batch n. Every rank then holds the same gradient and takes the same AdamW step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if dist.is_initialized():
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()
    for p, g in zip(params, grads):
        p.grad = g.div_(n)


def mean_row(rows, world, device):
    """The log row averaged over the effective batch: this rank's K micro-batches, then all ranks."""
    if world * len(rows) == 1:
        return rows[0]
    vals = torch.tensor([[r[k] for k in rows[0]] for r in rows], dtype=torch.float64, device=device).sum(0)
    if world > 1:
        dist.all_reduce(vals)
    return dict(zip(rows[0], (vals / (world * len(rows))).tolist()))


def gather_states(gens):
    """Every slot's generator state, in slot order, on every rank (rank 0 saves them)."""
    states = [g.get_state() for g in gens]
    if not dist.is_initialized():
        return states
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, states)
    return [s for rank_states in out for s in rank_states]


def plot_losses(history, path, names):
    """Loss curve PNG (Pillow only): one smoothed line per loss over the steps."""
    W, H, pad = 720, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline="black")
    vals = torch.tensor([[h[n] for n in names] for h in history], dtype=torch.float64)
    k = max(1, len(vals) // 50)
    vals = F.avg_pool1d(vals.T[None], k, stride=1).squeeze(0).T if len(vals) > k else vals
    lo, hi = vals.min().item(), vals.max().item() + 1e-12
    for j, (name, colour) in enumerate(zip(names, ["tab:blue", "orange", "green"])):
        colour = {"tab:blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44)}[colour]
        pts = [(pad + (W - 1.5 * pad) * i / max(1, len(vals) - 1),
                H - pad - (H - 1.5 * pad) * (v - lo) / (hi - lo)) for i, v in enumerate(vals[:, j].tolist())]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((pad + 5 + 110 * j, pad // 2 + 4), name, fill=colour)
    d.text((pad, H - pad + 6), f"step {history[0]['step']}", fill="black")
    d.text((W - 3 * pad, H - pad + 6), f"{history[-1]['step']}", fill="black")
    d.text((4, pad // 2), f"{hi:.3g}", fill="black")
    d.text((4, H - pad - 10), f"{lo:.3g}", fill="black")
    img.save(path)


# ----------------------------------------------------------------------------- one step of each stage

def unet_loss(unet, lat, t, noise, ctx, acp, autocast, prediction_type, motion_tau=None, corr_layers=()):
    """One FLASH forward (Sec. 3.1-3.2): lat (B,4,F,h,w) = [original; augmented] clean latents, one t and one
    noise (1,4,F,h,w) shared by both clips, clean first frame; returns the eps-MSE over frames 2..N per clip (a
    v-model's output taken as eps first, sample.predicted_eps: the same loss, weighted by a_t, for a base that predicts
    v). The alignment hooks stay on until the caller's backward has run (checkpointing recomputes with them)."""
    noise = noise.expand_as(lat)
    xt = acp[t].sqrt() * lat + (1 - acp[t]).sqrt() * noise  # q(x_t | x_0), Eq. 1
    xt[:, :, 0] = lat[:, :, 0]  # noise-free first frame (Sec. 3.1)
    set_alignment(unet, motion_tau, corr_layers)
    with autocast:
        pred = unet(xt, t, ctx.expand(len(lat), -1, -1))
    pred = predicted_eps(pred.float(), xt, acp[t], prediction_type)
    return (pred - noise)[:, :, 1:].square().mean(dim=(1, 2, 3, 4))  # frames 2..N (LAMP)


def unet_step(args, pipe, clip, embed, null_embed, gen, autocast, acp, t_weights, n_layers):
    """Motion Alignment Module step (Sec. 3.2): [original; strongly augmented] clip -> (summed loss, log row).
    With probability args.null_text_prob the caption's embedding is replaced by the empty prompt's (AnimateDiff)."""
    dev, vae_dtype = pipe.device, next(pipe.vae.parameters()).dtype
    clips = [clip, strong_augment(clip, gen)] if args.strong_aug else [clip]
    x = torch.stack(clips).to(dev, torch.float32)  # B F 3 H W
    with torch.no_grad():
        lat = pipe.vae.encode(x.flatten(0, 1).to(vae_dtype), sample=True, generator=gen)
    lat = lat.float().view(len(clips), args.frames, *lat.shape[1:]).transpose(1, 2)  # B 4 F h w
    t = torch.multinomial(t_weights, 1, generator=gen).item()
    noise = video_noise(lat[:1].shape, gen, args.mixed_noise).to(dev)  # one t and one noise for both clips
    chosen = torch.randperm(n_layers, generator=gen)[: round(args.corr_prob * n_layers)].tolist()
    aligned = len(clips) == 2
    # null text as AnimateDiff's training (cfg_random_null_text_ratio; A3.2 builds on its codebase): "" for CFG
    ctx = null_embed if torch.rand((), generator=gen).item() < args.null_text_prob else embed
    per_clip = unet_loss(pipe.unet, lat, t, noise, ctx.to(dev), acp, autocast, pipe.prediction_type,
                         args.tau if aligned and args.motion_align else None,
                         set(chosen) if aligned and args.corr_align else ())
    row = {"loss_ori": per_clip[0].item()} | ({"loss_aug": per_clip[1].item()} if aligned else {})
    return loss_weight(args.loss_weight, acp[t]) * per_clip.sum(), row  # L_D(ori) + L_D(aug), logged unweighted


def decoder_step(args, pipe, clip, gen, autocast):
    """Detail Enhancement Decoder step (Sec. 3.3, Eq. 8): decode distorted frames with the clean first frame's encoder
    features and regress the clean frames -> (loss, log row)."""
    dev, vae_dtype = pipe.device, next(pipe.vae.parameters()).dtype
    pick = torch.cat([torch.zeros(1, dtype=torch.long),  # the first frame and decoder_frames - 1 random others
                      1 + torch.randperm(args.frames - 1, generator=gen)[: args.decoder_frames - 1]])
    clean = clip[pick].to(dev)
    distorted = decoder_distort(clean, gen)  # the decoded frames only: every draw is per frame anyway
    with torch.no_grad():
        z = pipe.vae.encode(distorted.to(vae_dtype))
        ref = pipe.vae.encoder_features(clip[:1].to(dev, vae_dtype))  # g^1: the clean first frame
    with autocast:
        out = pipe.vae.decode(z, ref=ref)
    loss = F.mse_loss(out.float(), clean)
    return loss, {"loss": loss.item()}


def micro_step(args, pipe, videos, embeds, null_embed, gen, autocast, acp, t_weights, n_layers):
    """One clip drawn with `gen` (its micro-batch slot's generator), forward and backward -> its log row."""
    vi = torch.randint(len(videos), (), generator=gen).item()
    clip = sample_clip(videos[vi], args.frames, args.stride, args.height, args.width, gen, flip=args.flip,
                       start=args.clip_start).to(pipe.device)  # augmentation and distortion run on the device
    if args.stage == "unet":
        loss, row = unet_step(args, pipe, clip, embeds[vi], null_embed, gen, autocast, acp, t_weights, n_layers)
    else:
        loss, row = decoder_step(args, pipe, clip, gen, autocast)
    loss.backward()  # into .grad: over --grad-accum micro-steps the gradients add up
    set_alignment(pipe.unet)  # hooks off again (backward has recomputed what it needed)
    return row


# ----------------------------------------------------------------------------- set-up, resume, the loop

def trainable_parameters(model, stage):
    """Freeze everything but FLASH's trainable set, which trains in fp32 (frozen weights stay in bf16/fp16)."""
    model.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if is_trainable(n, stage)}
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def resume(path, params, prefix, opt, gens, slots, log, ema=None):
    """Trained tensors (and their --ema-decay average), optimizer, the micro-batch slots' generators and loss history
    from the newest checkpoint -> (step, history). Same effective batch (ranks x --grad-accum) as saved, however
    split: the run continues exactly. Another one: weights and optimizer continue, the slots that were saved keep their
    streams, new ones start fresh."""
    ck = find_checkpoint(path)
    sd = load_file(os.path.join(ck, "flash.safetensors"))  # the weights, or their average with --ema-decay
    state = torch.load(os.path.join(ck, "state.pt"), map_location="cpu", weights_only=True)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["raw"][n] if "raw" in state else sd[prefix + n])
            if ema is not None:
                ema[n].copy_(sd[prefix + n] if "raw" in state else p)  # a run without EMA: the average starts here
    opt.load_state_dict(state["optimizer"])
    states = state.get("generators") or [state["generator"]]  # checkpoints from before DDP: one stream
    for gen, slot in zip(gens, slots):
        if slot < len(states):
            gen.set_state(states[slot])
    saved = read_json(os.path.join(ck, "settings.json"))
    was, now = (saved.get("world_size", 1), len(states)), (rank_and_world()[1], len(slots) * rank_and_world()[1])
    log(f"resumed from {ck} at step {state['step']}")
    if was != now:
        log(f"resume: {was[0]} rank(s) -> {now[0]}, effective batch {was[1]} -> {now[1]}: " +
            ("the same micro-batch streams continue, exactly as the uninterrupted run" if was[1] == now[1] else
             f"weights and optimizer continue; streams {min(was[1], now[1])}..{now[1] - 1} start fresh, so the run "
             f"is not the uninterrupted one (keep ranks x --grad-accum = {was[1]} to continue exactly)"))
    return state["step"], state["history"]


def write_samples(args, pipe, image, settings, step, autocast):
    """--sample-image: one video per caption (action) at this step, under out/samples/ (the raw weights, not the
    --ema-decay average)"""
    words = [prompt_words(c) for c in settings["captions"]]
    names = [w if words.count(w) == 1 else f"{w}_{i}" for i, w in enumerate(words)]
    pipe.unet.eval()
    for caption, name in zip(settings["captions"], names):
        with autocast:  # frozen weights are bf16/fp16 on GPU, the trained ones fp32
            frames = animate(pipe, image, caption, frames=args.frames, steps=args.sample_steps, height=args.height,
                             width=args.width, seed=args.seed, progress=False, mixed_noise=args.mixed_noise)
        write_video(frames, os.path.join(args.out, "samples", f"step_{step:06d}_{name}.mp4"), settings["fps"])


def train(args, pipe, videos, embeds, log=print, null_embed=None):
    """The FLASH loop for either stage. pipe: sample.Pipeline; videos: data.load_videos(); embeds: per-video text
    embeddings, null_embed: the empty prompt's (unet stage; computed here with pipe's text encoder when None).
    Returns the loss history. Resumes exactly from args.resume when given."""
    dev, unet_stage = pipe.device, args.stage == "unet"
    rank, world = rank_and_world()
    log = log if rank == 0 else (lambda *a: None)  # rank 0 alone logs and writes
    if unet_stage and null_embed is None:
        null_embed = encode_prompt(pipe, [""]).cpu()
    model, prefix = (pipe.unet, "unet.") if unet_stage else (pipe.vae, "vae.")
    params = trainable_parameters(model, args.stage)
    log(f"training {len(params)} tensors, {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters "
        f"({args.stage} stage)")
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    slots = [rank * args.grad_accum + j for j in range(args.grad_accum)]  # this rank's share of the effective batch
    gens = [torch.Generator().manual_seed(stream_seed(args.seed, s)) for s in slots]
    ema = {n: p.detach().clone() for n, p in params.items()} if args.ema_decay else None  # --ema-decay's average
    step, history = resume(args.resume, params, prefix, opt, gens, slots, log, ema) if args.resume else (0, [])
    clip_fps = statistics.median(v.fps / max(1, clip_stride(len(v.frames), args.frames, args.stride)) for v in videos)
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    settings.update(world_size=world, effective_batch=world * args.grad_accum, fps=round(clip_fps, 3),
                    motion_version=pipe.info.get("motion_version"), captions=sorted({v.caption for v in videos}))
    autocast = torch.autocast(dev.type, dtype=pipe.dtype, enabled=pipe.dtype != torch.float32)
    acp = alphas_cumprod().to(dev)
    t_weights = timestep_weights(args.timestep_alpha if args.timesteps == "cosine" else 0.0)
    n_layers = len(cross_frame_layers(pipe.unet))
    pipe.unet.gradient_checkpointing = pipe.vae.decoder.gradient_checkpointing = args.gradient_checkpointing
    sample_image = args.sample_image if unet_stage else None  # periodic samples need the trained U-Net
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    model.train()
    busy, n_busy, peak = 0.0, 0, 0.0  # seconds and count of the steps run since the last log line
    for step in tqdm(range(step, args.steps), desc=f"train {args.stage} (from step {step})", disable=rank > 0):
        t0 = time.time()
        rows = [micro_step(args, pipe, videos, embeds, null_embed, g, autocast, acp, t_weights, n_layers)
                for g in gens]  # batch 1 per rank (A3.2); --grad-accum clips in turn, gradients adding up
        if world * args.grad_accum > 1:
            average_gradients(list(params.values()), world * args.grad_accum)
        row = mean_row(rows, world, dev)
        torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip)
        lr = set_lr(opt, args.lr, step, args.steps if args.lr_schedule == "cosine" else 0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema_update(ema, params, args.ema_decay)
        history.append({"step": step + 1, **row})
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        busy, n_busy = busy + time.time() - t0, n_busy + 1
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            losses = " | ".join(f"{k} {v:.4f}" for k, v in row.items())
            log(f"step {step + 1:06d} | {losses} | lr {lr:.1e} | {busy / n_busy * 1000:.0f}ms/step | {peak:.1f}GB")
            busy, n_busy = 0.0, 0
        if (step + 1) % args.save_every == 0 or last:
            states = gather_states(gens)  # every rank takes part; rank 0 writes
            if rank == 0:
                state = {"step": step + 1, "optimizer": opt.state_dict(), "generator": states[0],
                         "generators": states, "history": history}
                if ema:  # the checkpoint's weights are the average; the raw ones resume training
                    state["raw"] = {n: p.detach().cpu().clone() for n, p in params.items()}
                tensors = {prefix + n: p for n, p in (ema or params).items()}
                saved = save_checkpoint(args.out, step + 1, tensors, settings, state, args.keep,
                                        DTYPES[args.save_dtype])
                log(f"saved {saved}")
        if rank == 0 and sample_image and ((args.sample_every and (step + 1) % args.sample_every == 0) or last):
            write_samples(args, pipe, sample_image, settings, step + 1, autocast)
            model.train()
    if ema:  # the model leaves training with the weights its checkpoint holds
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ema[n])
    model.eval()
    if history and rank == 0:
        plot_losses(history, os.path.join(args.out, "loss.png"), [k for k in history[-1] if k != "step"])
        final = sorted(glob.glob(os.path.join(args.out, "checkpoint-??????")))[-1]
        for f in ("flash.safetensors", "settings.json"):  # newest weights also at the top of the output folder
            atomic_write(os.path.join(args.out, f), lambda tmp: shutil.copyfile(os.path.join(final, f), tmp))
    return history


# ----------------------------------------------------------------------------- command line

def check_args(args):
    """Fill stage defaults and reject impossible settings before anything is read or written."""
    args.steps = args.steps if args.steps is not None else (20000 if args.stage == "unet" else 10000)  # A3.2
    args.lr = args.lr or (5e-5 if args.stage == "unet" else 1e-4)  # A3.2
    for name in ("videos", "base"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required")
    if args.stage == "unet" and not args.motion_module:
        raise ValueError("--motion-module is required for the unet stage (e.g. mm_sd_v15_v2.ckpt)")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % 8:
            raise ValueError(f"--{name} {v}: want a positive multiple of 8 (the VAE works on 8x8 blocks)")
    for name, lo in (("frames", 2), ("steps", 1), ("stride", 1), ("log_every", 1), ("save_every", 1), ("keep", 1),
                     ("grad_accum", 1)):
        if getattr(args, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: want at least {lo}")
    if not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: want a positive learning rate")
    if not args.strong_aug and (args.motion_align or args.corr_align):
        args.motion_align = args.corr_align = False  # alignment needs the augmented clip
    if not 0 <= args.timestep_alpha <= 1:
        raise ValueError(f"--timestep-alpha {args.timestep_alpha}: want 0 <= alpha <= 1")
    if not 0 <= args.mixed_noise < 1:
        raise ValueError(f"--mixed-noise {args.mixed_noise}: want 0 <= share < 1 (0 = independent frames)")
    if not 0 <= args.null_text_prob <= 1:
        raise ValueError(f"--null-text-prob {args.null_text_prob}: want 0 <= p <= 1 (AnimateDiff: 0.1)")
    branches = {b.strip() for b in args.detail_branches.split(",")} - {""}
    if not branches or branches - {"warp", "patch"}:
        raise ValueError(f"--detail-branches {args.detail_branches}: want warp, patch or warp,patch (Table A2)")
    args.detail_branches = ",".join(b for b in ("warp", "patch") if b in branches)
    if args.detail_full_res == "auto":  # on a GPU the fused SDPA kernels keep its memory O(tokens)
        args.detail_full_res = "on" if str(args.device).startswith("cuda") else "off"
    if not 0 <= args.tau < 100 or not 0 <= args.corr_prob <= 1:
        raise ValueError(f"--tau {args.tau} / --corr-prob {args.corr_prob}: want 0 <= tau < 100, 0 <= p <= 1")
    if args.stage == "decoder" and not 1 <= args.decoder_frames <= args.frames:
        raise ValueError("--decoder-frames must be between 1 and --frames")
    if args.sample_image:  # read now: an unreadable image must not surface after hours of training
        load_image(args.sample_image, args.height, args.width)
    check_writable(args.out, "--out")


def check_writable(path, flag):
    """The output folder is created only once training starts (a failed start leaves nothing behind): check now
    that it can be."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PermissionError(f"{flag} {path}: cannot create it ({parent} is not a writable folder)")


def estimate_memory(args):
    """--estimate-memory: memory.estimate of this step, the numbers of bench.py --estimate train with these flags."""
    import memory  # memory.py sits on top of train.py (it runs train.py's step on meta tensors)
    args.dtype = args.dtype or "bf16"
    e = memory.estimate("train", dtype=args.dtype, train=memory.train_settings(args))
    print(memory.report(e))
    return e


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.estimate_memory:
        return estimate_memory(args)
    if args.resume:  # the run's saved settings become the defaults; flags given now override them
        saved = read_json(os.path.join(find_checkpoint(args.resume), "settings.json"))
        p.set_defaults(**{k: v for k, v in saved.items() if k in vars(args)})
        args = p.parse_args(argv)
    check_args(args)
    rank, _ = init_distributed(args)  # torchrun: one process per GPU; plain python: no process group
    if rank > 0:  # rank 0 alone prints (load summaries, log lines); every rank's errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    print(json.dumps(vars(args)))
    videos = load_videos(args.videos, args.prompt, args.frames, args.stride, short_side=min(args.height, args.width))
    pipe = load_pipeline(args.base, args.motion_module if args.stage == "unet" else None, device=args.device,
                         dtype=autocast_dtype(args.dtype, args.device))
    if pipe.unet.config.motion_modules and args.frames > pipe.unet.config.motion_max_len:
        raise ValueError(f"--frames {args.frames}: the motion module's positional encoding holds "
                         f"{pipe.unet.config.motion_max_len} frames")
    embeds = null_embed = None
    if args.stage == "unet":  # text embeddings once per caption and for "" (null text), then the encoder leaves
        embeds = [encode_prompt(pipe, [v.caption]).cpu() for v in videos]
        null_embed = encode_prompt(pipe, [""]).cpu()
        pipe.text_encoder.to("cpu")
    else:  # the SD VAE plus fresh (zero-fused) detail-enhancement branches, alone on the GPU
        pipe.vae = load_vae(args.base, **detail_overrides(vars(args))).to(args.device)
        pipe.unet.to("cpu"), pipe.text_encoder.to("cpu")
    train(args, pipe, videos, embeds, null_embed=null_embed)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"done: weights in {os.path.join(args.out, 'flash.safetensors')}; "
          f"sample with: python sample.py --checkpoint {args.out} --image ref.png")


if __name__ == "__main__":
    plain_warnings()
    exit_on_error(main, oom="out of GPU memory; try --frames 8, a smaller --height/--width, or keep gradient "
                            "checkpointing on (check first: python train.py --estimate-memory ...)")
