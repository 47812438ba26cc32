"""
FLASH (arXiv 2503.00276) against diffusers on identical random weights, and against the hardware limit: U-Net forward
on a CFG video batch (ours with cross-frame attention off / on vs UNetMotionModel), the guided 25-step sample + decode
(vs AnimateDiffPipeline; FLASH also encodes a first frame, so the U-Net share is shown apart), one FLASH training step
(two clips, gradient checkpointing, alignment on / off). FLOPs: 2 per multiply-add over convs, linears and attention
matmuls, norms and elementwise ops left out (SD-1.5 U-Net: 0.803 TFLOP per 64x64-latent frame).
diffusers + transformers are needed only for the comparison columns.
    python bench.py --device cpu      # reduced size, 1 thread, < 2 min
    python bench.py --device cuda     # full size, bf16; --json out.json keeps every number
"""
import argparse
import gc
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

import model as M
from clip_text import CLIPTextConfig, CLIPTextModel, byte_vocab, save_tokenizer
from sample import Pipeline, alphas_cumprod, animate, load_pipeline, save_pipeline
from train import cross_frame_layers, is_trainable, set_alignment, unet_loss
from vae import VAE, VAEConfig

PRESETS = {  # U-Net (UNetConfig fields), VAE (VAEConfig fields), CLIP (hidden, layers, heads), latent side, frames
    "full": dict(unet={}, vae={}, clip=(768, 12, 12), latent=64, frames=16),
    "cpu": dict(unet=dict(block_out_channels=(32, 64, 128, 128), attention_heads=2, motion_heads=2,
                          cross_attention_dim=64), vae=dict(block_out_channels=(32, 64, 128, 128)), clip=(64, 2, 2),
                latent=16, frames=8),
    "tiny": dict(unet=dict(block_out_channels=(32, 32, 64, 64), attention_heads=2, motion_heads=2, norm_num_groups=8,
                           cross_attention_dim=16), vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8),
                 clip=(16, 1, 2), latent=8, frames=4),
}
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "4090": 165, "3090": 71}  # dense bf16
PROMPT = "a person is dancing"


# ----------------------------------------------------------------------------- FLOPs (2 per MAC; norms ignored)

def unet_flops(cfg, h, w, frames, batch=1, ctx_len=77, cross_frame=False):
    """U-Net forward on `batch` videos of `frames` h x w latents: convs, linears, attention matmuls.
    Returns (forward FLOPs, weight-grad FLOPs of train.py's trainable set: motion modules, attn1.to_k/to_v)."""
    ch, L, temb = cfg.block_out_channels, cfg.layers_per_block, 4 * cfg.block_out_channels[0]
    conv = lambda cin, cout, n, k=3: 2 * cin * cout * k * k * n
    res = lambda cin, cout, n: (conv(cin, cout, n) + conv(cout, cout, n) + 2 * temb * cout
                                + (conv(cin, cout, n, 1) if cin != cout else 0))
    keys = lambda n: 2 * n if cross_frame else n  # FLASH attn1: the first frame's tokens + the frame's own
    attn = lambda c, n: 2 * (20 * c * c * n + 2 * n * keys(n) * c + 2 * cfg.cross_attention_dim * c * ctx_len
                             + 2 * n * ctx_len * c)  # proj_in/out 2C², attn1 4C², attn2 q,o 2C², GEGLU FF 12C²
    mm = lambda c, n: 2 * (22 * c * c * n + 4 * frames * c * n)  # proj_in/out, 2 x (q,k,v,o), FF; 2 x (QK^T, AV)
    n = [h * w]
    for _ in ch[1:]:
        h, w = (h + 1) // 2, (w + 1) // 2
        n.append(h * w)
    tot = [conv(cfg.in_channels, ch[0], n[0]) + conv(ch[0], cfg.out_channels, n[0]), 0]

    def layer(cin, c, i, has_attn, has_mm=cfg.motion_modules):
        tot[0] += res(cin, c, n[i]) + (attn(c, n[i]) if has_attn else 0) + (mm(c, n[i]) if has_mm else 0)
        tot[1] += (4 * c * c * n[i] if has_attn else 0) + (44 * c * c * n[i] if has_mm else 0)

    for i, c in enumerate(ch):
        for j in range(L):
            layer(ch[max(i - 1, 0)] if j == 0 else c, c, i, cfg.down_attention[i])
        tot[0] += conv(c, c, n[i + 1]) if i < len(ch) - 1 else 0  # downsampler
    layer(ch[-1], ch[-1], -1, True, cfg.motion_modules and cfg.motion_mid_block)
    tot[0] += res(ch[-1], ch[-1], n[-1])
    for k in reversed(range(len(ch))):
        for j in range(L + 1):
            cin = (ch[min(k + 1, len(ch) - 1)] if j == 0 else ch[k]) + (ch[max(k - 1, 0)] if j == L else ch[k])
            layer(cin, ch[k], k, cfg.down_attention[k])
        tot[0] += conv(ch[k], ch[k], n[k - 1]) if k > 0 else 0  # upsampler
    return tot[0] * frames * batch, tot[1] * frames * batch


def decoder_flops(cfg, h, w, frames):
    """SD VAE decoder on `frames` latents of h x w, its mid block's single-head attention included."""
    conv = lambda cin, cout, n, k=3: 2 * cin * cout * k * k * n
    res = lambda cin, cout, n: conv(cin, cout, n) + conv(cout, cout, n) + (conv(cin, cout, n, 1) if cin != cout else 0)
    ch, n, z = cfg.block_out_channels[::-1], h * w, cfg.latent_channels
    f = conv(z, z, n, 1) + conv(z, ch[0], n) + 2 * res(ch[0], ch[0], n) + 2 * (4 * ch[0] ** 2 * n + 2 * n * n * ch[0])
    for i, c in enumerate(ch):
        f += sum(res(ch[max(i - 1, 0)] if j == 0 else c, c, n) for j in range(cfg.layers_per_block + 1))
        n *= 4 if i < len(ch) - 1 else 1
        f += conv(c, c, n) if i < len(ch) - 1 else 0  # upsampler
    return (f + conv(ch[-1], cfg.out_channels, n)) * frames


def train_flops(fwd, wgrad, checkpointing=True):
    """Frozen layers need no weight grads: forward + input grads (~1 forward) + the trainable set's weight grads,
    + one more forward when gradient checkpointing recomputes."""
    return fwd * (3 if checkpointing else 2) + wgrad


# ----------------------------------------------------------------------------- weights, timing

def randomize_(module, gen):
    """Seeded weights: fan-in scaled matrices, norm scales around 1, small biases (zero-inits replaced too)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = float("norm" in name and name.endswith("weight"))
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5 if p.ndim > 1 else
                    base + 0.1 * torch.randn(p.shape, generator=gen))
    return module


def write_weights(folder, p, seed=0):
    """One random SD-1.5 + v2 motion module in diffusers layout -> (motion-module path, {name: diffusers/transformers
    model} or None). They are written by diffusers itself when it is installed: both sides read the same files."""
    gen, cfg, vcfg, (hid, layers, heads) = torch.Generator().manual_seed(seed), M.UNetConfig(**p["unet"]), \
        VAEConfig(**p["vae"]), p["clip"]
    save_tokenizer(byte_vocab(), folder / "tokenizer")
    try:
        import diffusers
        import transformers
    except ImportError:  # ours only, through our own writers
        te = CLIPTextModel(CLIPTextConfig(hidden_size=hid, intermediate_size=4 * hid, num_hidden_layers=layers,
                                          num_attention_heads=heads))
        save_pipeline(Pipeline(*(randomize_(m, gen) for m in (M.UNet(cfg), VAE(vcfg), te)), byte_vocab(), "cpu",
                               torch.float32), folder)
        return folder / "motion_module.safetensors", None
    for lib in (diffusers, transformers):  # no dtype notices, no progress bars
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    types = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.down_attention]
    n = len(vcfg.block_out_channels)
    d = dict(unet=diffusers.UNet2DConditionModel(
        sample_size=p["latent"], block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_heads, cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups, down_block_types=types,
        up_block_types=[t.replace("Down", "Up") for t in types[::-1]]),
        motion_adapter=diffusers.MotionAdapter(
            block_out_channels=cfg.block_out_channels, motion_layers_per_block=cfg.layers_per_block,
            motion_num_attention_heads=cfg.motion_heads, motion_norm_num_groups=cfg.norm_num_groups,
            motion_max_seq_length=cfg.motion_max_len, use_motion_mid_block=cfg.motion_mid_block),
        vae=diffusers.AutoencoderKL(
            block_out_channels=vcfg.block_out_channels, layers_per_block=vcfg.layers_per_block, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
            norm_num_groups=vcfg.norm_num_groups),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=hid, intermediate_size=4 * hid, num_hidden_layers=layers, num_attention_heads=heads)))
    for name, m in d.items():
        randomize_(m, gen).eval().save_pretrained(folder / name)
    return folder / "motion_adapter", d


class PerFrameGN(torch.nn.Module):
    """AnimateDiff normalises motion-module inputs per frame, diffusers over all frames: the parity oracle's fix."""

    def __init__(self, gn):
        super().__init__()
        self.gn = gn

    def forward(self, x):  # B C F H W
        b, c, f, h, w = x.shape
        return self.gn(x.transpose(1, 2).reshape(b * f, c, h, w)).view(b, f, c, h, w).transpose(1, 2)


def clocked(s, fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs), queued GPU work included."""
    s.sync()
    t0 = s.clock()
    out = fn(*args, **kwargs)
    s.sync()
    return s.clock() - t0, out


def timeit(s, fns, repeats, warmup):
    """Seconds of each fn per repeat, called round-robin so that load drifts hit all of them alike."""
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            dt = clocked(s, fn)[0]
            times[k] += [dt] if i >= warmup else []
    return times


def unet_timer(s, unet):
    """Wraps unet.forward; returns the list that collects the seconds of every call."""
    calls, forward = [], unet.forward

    def timed(*args, **kwargs):
        dt, out = clocked(s, forward, *args, **kwargs)
        calls.append(dt)
        return out

    unet.forward = timed
    return calls


def stats(ts, who="ours"):
    med = statistics.median(ts)
    return {f"{who}_s": med, f"{who}_spread": (max(ts) - min(ts)) / 2 / med, f"{who}_times": ts}


def compiled(unet, a):
    if a.compile:  # forward only: the module and its attributes stay as they are
        unet.forward = torch.compile(unet.forward)
    return unet


# ----------------------------------------------------------------------------- the rows

def bench_unet(a, s, rows):
    x, t, ctx = s.inputs
    ours = [compiled(M.load_unet(s.folder, s.mm, cross_frame=cf).to(s.dev, s.dt).eval(), a) for cf in (0, 1)]
    fns = {cf: (lambda u=u: u(x, t, ctx)) for cf, u in enumerate(ours)}
    if s.diffusers:
        from diffusers import UNetMotionModel
        ref = UNetMotionModel.from_unet2d(s.diffusers["unet"], s.diffusers["motion_adapter"]).to(s.dev, s.dt).eval()
        ctx_f = ctx.repeat_interleave(s.frames, 0)  # diffusers takes the text embeddings repeated per frame
        fns["diffusers"] = lambda: ref(x, t, encoder_hidden_states=ctx_f).sample
        print("attention: ours SDPA | diffusers", sorted({type(v).__name__ for v in ref.attn_processors.values()}))
    with torch.no_grad():
        times = timeit(s, fns, a.repeats, a.warmup)
        if s.diffusers:  # parity oracle: diffusers with AnimateDiff's per-frame motion-module GroupNorm (timed without)
            tm = [m for m in ref.modules() if type(m).__name__ == "AnimateDiffTransformer3D"]
            for m in tm:
                m.norm = PerFrameGN(m.norm)
            want, got = ref(x, t, encoder_hidden_states=ctx_f).sample.float(), ours[0](x, t, ctx).float()
            for m in tm:
                m.norm = m.norm.gn
    for cf in (0, 1):
        r = dict(**stats(times[cf]), flops=unet_flops(s.cfg, s.latent, s.latent, s.frames, 2, cross_frame=cf)[0])
        if s.diffusers:
            r.update(**stats(times["diffusers"], "diffusers"))
            r["ratio"] = r["ours_s"] / r["diffusers_s"]
            if not cf:
                err = (got - want).abs().max().item()
                r.update(max_abs_diff=err, rel_diff=err / want.abs().max().item())
            else:
                r["note"] = "FLASH attn1 (2x keys) vs diffusers' plain attn1"
        rows[f"unet fwd, cross-frame {'on' if cf else 'off'}"] = r


def bench_sample(a, s, rows):
    F, px = s.frames, 8 * s.latent
    pipe = load_pipeline(s.folder, s.mm, device=s.dev, dtype=s.dt, vae_dtype=s.dt, verbose=False)
    img = torch.linspace(-1, 1, px)[None, None].expand(3, px, -1).contiguous()  # FLASH's first frame: a gradient
    run = {"ours": lambda n: animate(pipe, img, PROMPT, frames=F, steps=n, height=px, width=px, progress=False)}
    calls = {"ours": unet_timer(s, compiled(pipe.unet, a))}
    if s.diffusers:
        from diffusers import AnimateDiffPipeline, DDIMScheduler
        from transformers import CLIPTokenizer
        d, tok = s.diffusers, s.folder / "tokenizer"
        dp = AnimateDiffPipeline(  # the scheduler of AnimateDiff's inference configs, as sample.py
            vae=d["vae"], text_encoder=d["text_encoder"], unet=d["unet"], motion_adapter=d["motion_adapter"],
            tokenizer=CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77),
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                                    clip_sample=False)).to(s.dev, s.dt)
        dp.set_progress_bar_config(disable=True)
        run["diffusers"] = lambda n: dp(PROMPT, num_frames=F, height=px, width=px, num_inference_steps=n,
                                        guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                                        output_type="np").frames
        calls["diffusers"] = unet_timer(s, dp.unet)
    for k, fn in run.items():
        if a.warmup:
            fn(2)  # a 2-step sample warms every kernel
        calls[k].clear()
    times = timeit(s, {k: (lambda fn=fn: fn(a.steps)) for k, fn in run.items()}, a.sample_repeats, 0)
    dec = decoder_flops(VAEConfig(**PRESETS[a.size]["vae"]), s.latent, s.latent, F)
    fl = {k: a.steps * unet_flops(s.cfg, s.latent, s.latent, F, 2, cross_frame=k == "ours")[0] + dec for k in run}
    r = dict(steps=a.steps, flops=fl["ours"])
    for k in run:  # U-Net seconds per sample: every forward call (one per step, CFG batched) of the timed runs
        r.update(**stats(times[k], k), **{f"{k}_unet_s": sum(calls[k]) / a.sample_repeats, f"{k}_flops": fl[k]})
    if s.diffusers:
        r.update(ratio=r["ours_s"] / r["diffusers_s"], unet_ratio=r["ours_unet_s"] / r["diffusers_unet_s"])
    rows[f"sample {a.steps} steps + decode"] = r


def bench_train(a, s, rows):
    F, lat, dev = s.frames, s.latent, s.dev
    unet, trainable = M.load_unet(s.folder, s.mm).requires_grad_(False), []
    for name, q in unet.named_parameters():  # fp32 master weights train, the frozen ones sit in the autocast dtype
        q.data = q.data.float() if is_trainable(name, "unet") else q.data.to(s.dt)
        trainable += [q.requires_grad_(True)] if is_trainable(name, "unet") else []
    unet.gradient_checkpointing = True
    compiled(unet.to(dev), a).train()
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    clips, noise = (torch.randn(n, 4, F, lat, lat, generator=g).to(dev) for n in (2, 1))
    ctx, acp = torch.randn(1, 77, s.cfg.cross_attention_dim, generator=g).to(dev), alphas_cumprod().to(dev)
    autocast = torch.autocast(dev.type, dtype=s.dt) if s.dt != torch.float32 else nullcontext()
    half = set(range(0, len(cross_frame_layers(unet)), 2))  # correspondence alignment in half the attn1 layers

    def step(tau, corr):  # [original; augmented] clip, one t, as train.py
        unet_loss(unet, clips, 500, noise, ctx, acp, autocast, tau, corr).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        set_alignment(unet)

    fns = {"on": lambda: step(90.0, half), "off": lambda: step(None, ())}
    times = timeit(s, fns, a.train_repeats, max(a.warmup, 1))  # the first step allocates AdamW's state
    flops = train_flops(*unet_flops(s.cfg, lat, lat, F, 2, cross_frame=True))
    for k, fn in fns.items():
        peak = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak = torch.cuda.max_memory_allocated()
        rows[f"train step, align {k}"] = dict(**stats(times[k]), peak_bytes=peak, flops=flops,
                                              trainable_params=sum(q.numel() for q in trainable))


def bench(a, folder):
    dev, p = torch.device(a.device), PRESETS[a.size]
    s = SimpleNamespace(dev=dev, dt={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype],
                        sync=torch.cuda.synchronize if dev.type == "cuda" else (lambda: None),
                        clock=time.process_time if a.clock == "cpu" else time.perf_counter,
                        cfg=M.UNetConfig(**p["unet"]), frames=a.frames or p["frames"], latent=p["latent"],
                        folder=folder)
    s.mm, s.diffusers = write_weights(s.folder, p)
    print(f"weights {s.folder} ({'diffusers-built' if s.diffusers else 'diffusers absent: ours only'}) | preset "
          f"{a.size}: U-Net {json.dumps(p['unet'])} VAE {json.dumps(p['vae'])} CLIP {p['clip']} | {s.frames} frames "
          f"of {s.latent}² latents ({8 * s.latent} px) | {dev} {a.dtype} | threads {torch.get_num_threads()} | "
          f"{a.clock} clock", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, s.frames, s.latent, s.latent, generator=g).to(dev, s.dt)  # a CFG batch: 2 videos
    s.inputs = (x, torch.tensor([500, 500], device=dev),
                torch.randn(2, 77, s.cfg.cross_attention_dim, generator=g).to(dev, s.dt))
    rows = {}
    for name, fn in (("unet", bench_unet), ("sample", bench_sample), ("train", bench_train)):
        if name in a.rows:
            t0 = time.time()
            fn(a, s, rows)
            print(f"{name} rows: {time.time() - t0:.0f}s", flush=True)
        if name == "sample":
            s.diffusers = None  # nothing of diffusers stays resident during the training step
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def table(res, peak):
    si = lambda v: f"{v / 1e12:.3g} T" if v >= 1e12 else f"{v / 1e9:.3g} G"
    fmt = lambda r, who: f"{r[who + '_s']:.3f}s ±{100 * r[who + '_spread']:.0f}%" if who + "_s" in r else "-"
    out = [f"{'row':27s} {'ours':>14s} {'diffusers':>14s} {'ratio':>5s}  notes"]
    for name, r in res["rows"].items():
        notes = [f"{si(r['flops'])}FLOP, {si(r['flops'] / r['ours_s'])}FLOP/s"
                 + (f", MFU {100 * r['flops'] / r['ours_s'] / 1e12 / peak:.1f}%" if peak else "")]
        if "max_abs_diff" in r:
            notes.append(f"maxdiff {r['max_abs_diff']:.1e} (rel {r['rel_diff']:.1e})")
        if "ours_unet_s" in r:
            notes.append(f"U-Net share {100 * r['ours_unet_s'] / r['ours_s']:.0f}%" + (
                f" / {100 * r['diffusers_unet_s'] / r['diffusers_s']:.0f}%, U-Net-time ratio {r['unet_ratio']:.2f}"
                if "unet_ratio" in r else ""))
        notes += [r["note"]] if "note" in r else []
        if "peak_bytes" in r:
            notes.append(f"peak {r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] else "peak n/a on CPU")
        ratio = f"{r['ratio']:5.2f}" if "ratio" in r else "    -"
        out.append(f"{name:27s} {fmt(r, 'ours'):>14s} {fmt(r, 'diffusers'):>14s} {ratio}  {' | '.join(notes)}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="both implementations (default: CUDA bf16)")
    ap.add_argument("--size", choices=list(PRESETS), help="default: full on CUDA, cpu on CPU")
    ap.add_argument("--tiny", action="store_true", help="= --size tiny --steps 2 (smoke test)")
    ap.add_argument("--frames", type=int, help="override the preset's frame count")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--rows", default="unet,sample,train", help="a subset of unet,sample,train")
    ap.add_argument("--repeats", type=int, default=10, help="timed U-Net forwards per implementation (median)")
    ap.add_argument("--sample-repeats", type=int, help="timed samples per pipeline (default CUDA 3, CPU 1)")
    ap.add_argument("--train-repeats", type=int, help="timed training steps per variant (default CUDA 5, CPU 3)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default CUDA 3, CPU 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], help="cpu = this process's CPU time: robust to other "
                                                             "processes on a shared machine (default on CPU, 1 thread)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our U-Net's forward")
    ap.add_argument("--sdpa", choices=["default", "flash", "efficient", "cudnn", "math"], default="default",
                    help="one SDPA backend for both implementations")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: from the GPU's name)")
    ap.add_argument("--json", help="write every number, raw times included, to this file")
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.size, a.steps = ("tiny", 2) if a.tiny else (a.size or ("full" if gpu else "cpu"), a.steps)
    a.dtype, a.rows = a.dtype or ("bf16" if gpu else "fp32"), a.rows.split(",")
    a.warmup = (3 if gpu else 1) if a.warmup is None else a.warmup
    a.sample_repeats, a.train_repeats = a.sample_repeats or (3 if gpu else 1), a.train_repeats or (5 if gpu else 3)
    if not gpu and a.threads:
        torch.set_num_threads(a.threads)
    a.clock = a.clock or ("cpu" if not gpu and torch.get_num_threads() == 1 else "wall")
    name = torch.cuda.get_device_name(torch.device(a.device)) if gpu else "cpu"
    if a.peak_tflops is None and gpu:
        a.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        print(f"MFU against {a.peak_tflops} TFLOP/s ({name})" if a.peak_tflops else f"{name}: pass --peak-tflops")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(a.sdpa)
    with sdpa_kernel(backend) if backend else nullcontext(), tempfile.TemporaryDirectory(prefix="flash_bench_") as tmp:
        res = dict(**bench(a, Path(tmp)), args=vars(a), device=name, torch=torch.__version__)
    print(f"\n{name} | {a.dtype} | {a.clock} clock | median of repeats ± half their range\n"
          + table(res, a.peak_tflops))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
