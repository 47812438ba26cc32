"""FLASH few-shot training (arXiv 2503.00276).

Stage "unet" (Sec. 3.2, A2.2, A3.2): each step puts an original clip and a strongly augmented copy through the U-Net
in one batch, with the same t and noise and a clean first frame; motion feature alignment after every motion module,
correspondence alignment (the original's Q, K) in a random 50 % of the cross-frame attention layers; eps-MSE on
frames 2..N of both clips. Only the motion modules and attn1.to_k/to_v train.
Stage "decoder" (Sec. 3.3, A2.3): the Detail Enhancement Decoder's branches learn to restore distorted clips.
    python train.py --videos dir/ --prompt "a person is ..." --base sd15/ --motion-module mm_sd_v15_v2.ckpt
"""
import argparse
import glob
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F


def get_parser():
    p = argparse.ArgumentParser(description="FLASH: learn an action from a few videos (stage unet), then the "
                                            "detail-enhancement decoder (stage decoder).")
    # Data
    p.add_argument("--videos", help="folder of example videos (mp4/mov/avi/webm/gif or folders of numbered frames)")
    p.add_argument("--prompt", help="caption of the action (a name.txt beside a video overrides it)")
    p.add_argument("--frames", type=int, default=16, help="frames per training clip")
    p.add_argument("--stride", type=int, default=1, help="take every stride-th source frame (clip fps = fps/stride)")
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
    # Optimisation
    p.add_argument("--steps", type=int, help="default 20000 (unet) / 10000 (decoder)")
    p.add_argument("--lr", type=float, help="default 5e-5 (unet) / 1e-4 (decoder)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--decoder-frames", type=int, default=4, help="frames decoded per step in the decoder stage")
    p.add_argument("--seed", type=int, default=0)
    # Runtime
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="frozen weights and autocast (GPU default bf16)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--out", default="runs/flash", help="output folder (checkpoints, settings, loss curve)")
    p.add_argument("--resume", help="checkpoint folder, or an output folder (its latest checkpoint)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    p.add_argument("--sample-image", help="reference image for periodic samples")
    p.add_argument("--sample-every", type=int, default=0, help="steps between samples (0 = only at the end)")
    p.add_argument("--sample-steps", type=int, default=25)
    return p


# ----------------------------------------------------------------------------- helpers

def is_trainable(name, stage):
    """FLASH A3.2: the temporal attention layers (motion modules) and the spatial attn1 key/value projections;
    in the decoder stage only the new detail-enhancement branches."""
    if stage == "decoder":
        return name.startswith("decoder.detail.")
    return "motion_modules." in name or ".attn1.to_k." in name or ".attn1.to_v." in name


def timestep_weights(alpha, T=1000):
    """ReVersion's p(t) ∝ 1 - alpha cos(pi t/T): alpha 0 is uniform, larger alpha favours large t"""
    return 1 - alpha * torch.cos(math.pi * torch.arange(T, dtype=torch.float64) / T)


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


def save_checkpoint(out, step, tensors, settings, state, keep):
    """checkpoint-{step}/ with flash.safetensors (trained tensors), settings.json and state.pt (resume);
    written to a .tmp folder first, then renamed, so a crash never leaves half a checkpoint."""
    from safetensors.torch import save_file
    final = os.path.join(out, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, "flash.safetensors"))
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


def plot_losses(history, path, names):
    """Loss curve PNG (Pillow only): one smoothed line per loss over the steps."""
    from PIL import Image, ImageDraw
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


# ----------------------------------------------------------------------------- training

def unet_loss(unet, lat, t, noise, ctx, acp, autocast, motion_tau=None, corr_layers=()):
    """One FLASH forward (Sec. 3.1-3.2): lat (B,4,F,h,w) = [original; augmented] clean latents, one t and one
    noise (1,4,F,h,w) shared by both clips, clean first frame; returns the eps-MSE over frames 2..N per clip.
    The alignment hooks stay on until the caller's backward has run (checkpointing recomputes with them)."""
    noise = noise.expand_as(lat)
    xt = acp[t].sqrt() * lat + (1 - acp[t]).sqrt() * noise
    xt[:, :, 0] = lat[:, :, 0]
    set_alignment(unet, motion_tau, corr_layers)
    with autocast:
        pred = unet(xt, t, ctx.expand(len(lat), -1, -1))
    return (pred.float() - noise)[:, :, 1:].square().mean(dim=(1, 2, 3, 4))


def train(args, pipe, videos, embeds, log=print):
    """The FLASH loop for either stage. pipe: sample.Pipeline; videos: data.load_videos(); embeds: per-video text
    embeddings (unet stage). Returns the loss history. Resumes exactly from args.resume when given."""
    from data import decoder_distort, sample_clip, strong_augment
    from sample import alphas_cumprod, animate, save_video, tqdm
    stage, dev = args.stage, torch.device(args.device)
    model = pipe.unet if stage == "unet" else pipe.vae
    names = [n for n, _ in model.named_parameters() if is_trainable(n, stage)]
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for n in names:
        params[n].data = params[n].data.float()  # fp32 master weights; frozen ones stay in bf16/fp16
        params[n].requires_grad_(True)
    trainable = [params[n] for n in names]
    log(f"training {len(names)} tensors, {sum(p.numel() for p in trainable) / 1e6:.2f}M parameters ({stage} stage)")
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    step, history = 0, []
    if args.resume:
        ck = find_checkpoint(args.resume)
        from safetensors.torch import load_file
        sd = load_file(os.path.join(ck, "flash.safetensors"))
        prefix = stage + "." if stage == "unet" else "vae."
        with torch.no_grad():
            for n in names:
                params[n].copy_(sd[prefix + n])
        state = torch.load(os.path.join(ck, "state.pt"), map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]
        log(f"resumed from {ck} at step {step}")
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "demo", "demo_ablation", "demo_fast")}
    v0 = videos[0]
    settings.update(fps=round(v0.fps / args.stride, 3), motion_version=pipe.info.get("motion_version"),
                    captions=sorted({v.caption for v in videos}))
    os.makedirs(args.out, exist_ok=True)
    model.train()
    if stage == "unet":
        pipe.unet.config.gradient_checkpointing = args.gradient_checkpointing
        acp = alphas_cumprod().to(dev)
        tw = timestep_weights(args.timestep_alpha if args.timesteps == "cosine" else 0.0)
        layers = cross_frame_layers(pipe.unet)
    vae_dtype = next(pipe.vae.parameters()).dtype
    autocast = torch.autocast(dev.type, dtype=pipe.dtype, enabled=pipe.dtype != torch.float32)
    bar = tqdm(range(step, args.steps), desc=f"train {stage} (from step {step})")
    t0, peak = time.time(), 0.0
    for step in bar:
        vi = torch.randint(len(videos), (), generator=gen).item()
        clip = sample_clip(videos[vi], args.frames, args.stride, args.height, args.width, gen, flip=args.flip)
        if stage == "unet":
            clips = [clip, strong_augment(clip, gen)] if args.strong_aug else [clip]
            x = torch.stack(clips).to(dev, torch.float32)  # B F 3 H W
            with torch.no_grad():
                lat = pipe.vae.encode(x.flatten(0, 1).to(vae_dtype), sample=True, generator=gen)
            lat = lat.float().view(len(clips), args.frames, *lat.shape[1:]).transpose(1, 2)  # B 4 F h w
            t = torch.multinomial(tw, 1, generator=gen).item()
            noise = torch.randn(lat[:1].shape, generator=gen).to(dev)
            chosen = torch.randperm(len(layers), generator=gen)[: round(args.corr_prob * len(layers))].tolist()
            aligned = len(clips) == 2
            per_clip = unet_loss(pipe.unet, lat, t, noise, embeds[vi].to(dev), acp, autocast,
                                 args.tau if aligned and args.motion_align else None,
                                 set(chosen) if aligned and args.corr_align else ())
            loss = per_clip.sum()
            row = {"loss_ori": per_clip[0].item(), "loss_aug": per_clip[-1].item() if len(clips) == 2 else None}
        else:
            pick = torch.cat([torch.zeros(1, dtype=torch.long),
                              1 + torch.randperm(args.frames - 1, generator=gen)[: args.decoder_frames - 1]])
            clean = clip[pick].to(dev)
            distorted = decoder_distort(clip, gen)[pick].to(dev)
            with torch.no_grad():
                z = pipe.vae.encode(distorted.to(vae_dtype))
                ref = pipe.vae.encoder_features(clip[:1].to(dev, vae_dtype))  # clean first frame
            with autocast:
                out = pipe.vae.decode(z, ref=ref)
            loss = F.mse_loss(out.float(), clean)
            row = {"loss": loss.item()}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if stage == "unet":
            set_alignment(pipe.unet)  # hooks off again (backward has recomputed what it needed)
        history.append({"step": step + 1, **{k: v for k, v in row.items() if v is not None}})
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            dt = (time.time() - t0) / args.log_every
            t0 = time.time()
            losses = " | ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "step")
            log(f"step {step + 1:06d} | {losses} | lr {args.lr:.0e} | {dt * 1000:.0f}ms/step | {peak:.1f}GB")
        last = step + 1 == args.steps
        if (step + 1) % args.save_every == 0 or last:
            tensors = {("unet." if stage == "unet" else "vae.") + n: params[n] for n in names}
            state = {"step": step + 1, "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "history": history}
            ck = save_checkpoint(args.out, step + 1, tensors, settings, state, args.keep)
            log(f"saved {ck}")
        want_sample = args.sample_image and ((args.sample_every and (step + 1) % args.sample_every == 0) or last)
        if want_sample and stage == "unet":
            model.eval()
            with autocast:  # frozen weights are bf16/fp16 on GPU, the trained ones fp32
                frames = animate(pipe, args.sample_image, settings["captions"][0], frames=args.frames,
                                 steps=args.sample_steps, height=args.height, width=args.width, seed=args.seed,
                                 progress=False)
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            save_video(frames, os.path.join(args.out, "samples", f"step_{step + 1:06d}.mp4"), settings["fps"])
            model.train()
    model.eval()
    if history:
        keys = [k for k in history[-1] if k != "step"]
        plot_losses(history, os.path.join(args.out, "loss.png"), keys)
        final = sorted(glob.glob(os.path.join(args.out, "checkpoint-??????")))[-1]
        for f in ("flash.safetensors", "settings.json"):  # newest weights also at the top of the output folder
            atomic_write(os.path.join(args.out, f), lambda tmp: shutil.copyfile(os.path.join(final, f), tmp))
    return history


def check_args(p, args):
    if args.stage == "unet":
        args.steps = args.steps or 20000
        args.lr = args.lr or 5e-5
    else:
        args.steps = args.steps or 10000
        args.lr = args.lr or 1e-4
    for name in ("videos", "base"):
        if not getattr(args, name):
            p.error(f"--{name} is required")
    if args.stage == "unet" and not args.motion_module:
        p.error("--motion-module is required for the unet stage (e.g. mm_sd_v15_v2.ckpt)")
    if args.height % 8 or args.width % 8:
        p.error(f"--height/--width must be multiples of 8 (got {args.height}x{args.width})")
    if not args.strong_aug and (args.motion_align or args.corr_align):
        args.motion_align = args.corr_align = False  # alignment needs the augmented clip
    if not 0 <= args.timestep_alpha <= 1:
        p.error(f"--timestep-alpha {args.timestep_alpha}: want 0 <= alpha <= 1")
    if args.stage == "decoder" and not 1 <= args.decoder_frames <= args.frames:
        p.error("--decoder-frames must be between 1 and --frames")
    if args.sample_image and not os.path.isfile(args.sample_image):
        raise FileNotFoundError(f"--sample-image not found: {args.sample_image}")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):  # created only once training starts: a failed start leaves nothing behind
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder not writable: {args.out}")


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.resume:  # the run's saved settings become the defaults; flags given now override them
        with open(os.path.join(find_checkpoint(args.resume), "settings.json")) as f:
            saved = json.load(f)
        p.set_defaults(**{k: v for k, v in saved.items() if k in vars(args)})
        args = p.parse_args(argv)
    check_args(p, args)
    print(json.dumps({k: v for k, v in vars(args).items() if not k.startswith("demo")}))
    from data import load_videos
    from sample import encode_prompt, load_pipeline
    videos = load_videos(args.videos, args.prompt, args.frames, args.stride, short_side=min(args.height, args.width))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    pipe = load_pipeline(args.base, args.motion_module if args.stage == "unet" else None, device=args.device,
                         dtype=dtype)
    if args.stage == "decoder":  # the SD VAE plus fresh (zero-fused) detail-enhancement branches, alone on the GPU
        from vae import load_vae
        pipe.vae = load_vae(args.base, detail=True).to(args.device)
        pipe.unet.to("cpu"), pipe.text_encoder.to("cpu")
    embeds = None
    if args.stage == "unet":  # text embeddings once per caption, then the text encoder leaves the GPU
        embeds = [encode_prompt(pipe, [v.caption]).cpu() for v in videos]
        pipe.text_encoder.to("cpu")
    train(args, pipe, videos, embeds)
    print(f"done: weights in {os.path.join(args.out, 'flash.safetensors')}; "
          f"sample with: python sample.py --checkpoint {args.out} --image ref.png")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; try --frames 8, a smaller --height/--width, or keep gradient "
              "checkpointing on", file=sys.stderr)
        sys.exit(2)
