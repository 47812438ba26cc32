"""
FLASH (arXiv 2503.00276) against diffusers on identical random weights, against the hardware limit, and against a GPU
it does not have. Rows: U-Net forward on a CFG video batch (ours with cross-frame attention off / on vs
UNetMotionModel); the guided 25-step sample + decode (vs AnimateDiffPipeline; FLASH also encodes a first frame, so the
U-Net share is shown apart); one FLASH training step as train.py runs it (both clips encoded, checkpointing, alignment
on / off); the decoder-stage step; with --all each again under torch.compile, and every measured peak beside its
estimate. FLOPs: 2 per multiply-add over convs, linears and attention matmuls, norms and elementwise ops left out
(SD-1.5 U-Net: 0.803 TFLOP per 64x64-latent frame); training steps are counted by torch's FLOP formulas on the
estimate's abstract run (recompute, backward and the VAE encode included).
--estimate: memory.py's peak GPU memory estimate (the same as train.py / sample.py --estimate-memory).
diffusers + transformers are needed only for the comparison columns.
    python bench.py --estimate train [train.py's flags: --frames 16 --height 512 --no-gradient-checkpointing ...]
    python bench.py --estimate sample [--frames 16 --height 512 --width 512 --vae-dtype fp32 --context-frames 16]
    python bench.py --device cpu          # reduced size, 1 thread, a few minutes
    python bench.py --device cuda --all   # full size, bf16, eager + compiled, writes bench_all.json
"""
import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

import model as M
from clip_text import CLIPTextConfig, CLIPTextModel, save_tokenizer, byte_vocab
from data import decoder_distort, exit_on_error, strong_augment
from memory import PRESETS, PROMPT, estimate, flash_step, report, train_args, train_data, train_setup
from sample import Pipeline, animate, encode_prompt, load_pipeline, save_pipeline
from vae import VAE, VAEConfig, load_vae

PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "4090": 165, "3090": 71}  # dense bf16


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


def compiled(module, a):
    if a.compile:  # forward only: the module and its attributes stay as they are
        module.forward = torch.compile(module.forward, backend=a.compile_backend)
    return module


def measured_peak(s, fn, *modules, opt=None):
    """CUDA peak bytes of our own objects while fn runs: its growth over what was allocated before, plus what the
    modules (and opt's state) hold, so that other models resident on the GPU do not count. None elsewhere."""
    if s.dev.type != "cuda":
        return None
    gc.collect()
    s.sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    s.sync()
    held = [q for m in modules for q in [*m.parameters(), *m.buffers()]]
    held += [v for st in (opt.state.values() if opt else ()) for v in st.values() if torch.is_tensor(v)]
    own = {q.untyped_storage().data_ptr(): q.untyped_storage().nbytes() for q in held if q.is_cuda}
    return torch.cuda.max_memory_allocated() - before + sum(-(-n // 512) * 512 for n in own.values())


def compare(a, s, r, peak, kind, **kw):
    """The row's measured peak beside bench.py --estimate's for the same settings (cached per settings)."""
    key = (kind, json.dumps({k: vars(v) if isinstance(v, argparse.Namespace) else v for k, v in kw.items()}))
    if key not in s.estimates:
        s.estimates[key] = estimate(kind, size=a.size, dtype=a.dtype, **kw)
    e = s.estimates[key]
    r.update(peak_bytes=peak, est_peak_bytes=e["peak"], est_phase=e["phase"],
             est_error=None if peak is None else e["peak"] / peak - 1)
    return e


# ----------------------------------------------------------------------------- the rows

def bench_unet(a, s, rows):
    x, t, ctx = s.inputs
    variants = (1,) if s.suffix else (0, 1)  # compiled: FLASH's cross-frame attention only
    ours = {cf: compiled(M.load_unet(s.folder, s.mm, cross_frame=cf).to(s.dev, s.dt).eval(), a) for cf in variants}
    fns = {cf: (lambda u=u: u(x, t, ctx)) for cf, u in ours.items()}
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
    for cf in variants:
        r = dict(**stats(times[cf]), flops=unet_flops(s.cfg, s.latent, s.latent, s.frames, 2, cross_frame=cf)[0])
        if s.diffusers:
            r.update(**stats(times["diffusers"], "diffusers"))
            r["ratio"] = r["ours_s"] / r["diffusers_s"]
            if not cf:
                err = (got - want).abs().max().item()
                r.update(max_abs_diff=err, rel_diff=err / want.abs().max().item())
            else:
                r["note"] = "FLASH attn1 (2x keys) vs diffusers' plain attn1"
        rows[f"unet fwd, cross-frame {'on' if cf else 'off'}{s.suffix}"] = r


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
    peak = measured_peak(s, lambda: run["ours"](a.steps), pipe.unet, pipe.vae, pipe.text_encoder)
    compare(a, s, r, peak, "sample", frames=F, height=px, width=px, vae_dtype=a.dtype, detail=False)
    rows[f"sample {a.steps} steps + decode{s.suffix}"] = r


def bench_train(a, s, rows):
    """train.py's unet-stage step (train.unet_step: strong augmentation, VAE encode of both clips, U-Net with
    checkpointing, alignment on / off), backward, clipping, AdamW; the model set up as train.main() does."""
    px = 8 * s.latent
    t = train_args("unet", s.frames, px, px)
    pipe = load_pipeline(s.folder, s.mm, device=s.dev, dtype=s.dt, verbose=False)  # the VAE in fp32, as train.py
    embed = encode_prompt(pipe, [PROMPT]).cpu()
    pipe.text_encoder.to("cpu")
    params, opt = train_setup(t, pipe)
    compiled(pipe.unet, a)
    d = train_data(t, pipe, embed)
    autocast = torch.autocast(s.dev.type, dtype=s.dt, enabled=s.dt != torch.float32)

    def step(align):
        t.motion_align = t.corr_align = align
        flash_step(t, pipe, params, opt, d, autocast)

    variants = ("on",) if s.suffix else ("on", "off")
    fns = {k: (lambda k=k: step(k == "on")) for k in variants}
    fns["augment"] = lambda: strong_augment(d.clip, d.gen)  # the augmentation's share of every step
    times = timeit(s, fns, a.train_repeats, max(a.warmup, 1))  # the first step allocates AdamW's state
    for k in variants:
        r = dict(**stats(times[k]), aug_s=statistics.median(times["augment"]), trainable_params=sum(
            q.numel() for q in params.values()))
        r["peak_bytes"] = measured_peak(s, fns[k], pipe.unet, pipe.vae, opt=opt)
        if k == "on":  # the FLASH step's estimate; alignment adds no matmul FLOPs, so "off" takes its count
            t.motion_align = t.corr_align = True
            flops = compare(a, s, r, r["peak_bytes"], "train", train=t)["flops"]
        rows[f"train step, align {k}{s.suffix}"] = dict(r, flops=flops)


def bench_decoder(a, s, rows):
    """train.py's decoder-stage step (train.decoder_step: distortion, encode, detail-decoder forward under
    autocast, MSE), backward, clipping, AdamW; the VAE with fresh detail branches alone on the device, fp32."""
    px = 8 * s.latent
    t = train_args("decoder", s.frames, px, px, ["--decoder-frames", str(min(4, s.frames))])
    pipe = Pipeline(None, load_vae(s.folder, detail=True).to(s.dev), None, None, s.dev, s.dt)
    params, opt = train_setup(t, pipe)
    compiled(pipe.vae.decoder, a)
    d = train_data(t, pipe, None)
    autocast = torch.autocast(s.dev.type, dtype=s.dt, enabled=s.dt != torch.float32)
    fns = {"step": lambda: flash_step(t, pipe, params, opt, d, autocast),
           "distort": lambda: decoder_distort(d.clip[:t.decoder_frames], d.gen)}  # the frames decoder_step distorts
    times = timeit(s, fns, a.train_repeats, max(a.warmup, 1))
    r = dict(**stats(times["step"]), aug_s=statistics.median(times["distort"]),
             trainable_params=sum(q.numel() for q in params.values()))
    peak = measured_peak(s, fns["step"], pipe.vae, opt=opt)
    r["flops"] = compare(a, s, r, peak, "train", train=t)["flops"]
    rows[f"decoder-stage step{s.suffix}"] = r


def bench(a, folder):
    dev, p, t0 = torch.device(a.device), PRESETS[a.size], time.time()
    s = SimpleNamespace(dev=dev, dt=M.DTYPES[a.dtype], sync=torch.cuda.synchronize if dev.type == "cuda" else (
        lambda: None), clock=time.process_time if a.clock == "cpu" else time.perf_counter,
                        cfg=M.UNetConfig(**p["unet"]), frames=a.frames or p["frames"], latent=p["latent"],
                        folder=folder, estimates={}, suffix="")
    s.mm, s.diffusers = write_weights(s.folder, p)
    print(f"weights {s.folder} ({'diffusers-built' if s.diffusers else 'diffusers absent: ours only'}) | preset "
          f"{a.size}: U-Net {json.dumps(p['unet'])} VAE {json.dumps(p['vae'])} CLIP {p['clip']} | {s.frames} frames "
          f"of {s.latent}² latents ({8 * s.latent} px) | {dev} {a.dtype} | threads {torch.get_num_threads()} | "
          f"{a.clock} clock", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, s.frames, s.latent, s.latent, generator=g).to(dev, s.dt)  # a CFG batch: 2 videos
    s.inputs = (x, torch.tensor([500, 500], device=dev),
                torch.randn(2, 77, s.cfg.cross_attention_dim, generator=g).to(dev, s.dt))
    rows, groups = {}, {"unet": bench_unet, "sample": bench_sample, "train": bench_train, "decoder": bench_decoder}
    for s.suffix, names in [("", a.rows)] + ([(", compiled", a.compile_rows)] if a.all else []):
        a.compile = a.compile or bool(s.suffix)
        for name in [n for n in names if n in groups]:  # in the order asked for
            if s.suffix and time.time() - t0 > a.time_budget:
                rows[f"{name}{s.suffix}"] = dict(skipped=f"--time-budget {a.time_budget:g} s spent")
                continue
            t1 = time.time()
            try:
                groups[name](a, s, rows)
            except Exception as e:  # one failed row (a compile, an out-of-memory) leaves the others their time
                if not a.all:
                    raise
                rows[f"{name}{s.suffix}"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(f"error in {name}{s.suffix} rows: {rows[f'{name}{s.suffix}']['error']}", file=sys.stderr)
            print(f"{name}{s.suffix} rows: {time.time() - t1:.0f}s", flush=True)
            if name == "sample":
                s.diffusers = None  # nothing of diffusers stays resident during the training steps
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "seconds": time.time() - t0}


def table(res, peak):
    si = lambda v: f"{v / 1e12:.3g} T" if v >= 1e12 else f"{v / 1e9:.3g} G"
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    fmt = lambda r, who: f"{r[who + '_s']:.3f}s ±{100 * r[who + '_spread']:.0f}%" if who + "_s" in r else "-"
    out = [f"{'row':34s} {'ours':>14s} {'diffusers':>14s} {'ratio':>5s}  notes"]
    for name, r in res["rows"].items():
        if "ours_s" not in r:
            out.append(f"{name:34s} {'-':>14s} {'-':>14s} {'-':>5s}  {r.get('skipped') or r.get('error')}")
            continue
        device_s = r["ours_s"] - r.get("aug_s", 0)  # MFU over the model's share of the step
        notes = [f"{si(r['flops'])}FLOP, {si(r['flops'] / device_s)}FLOP/s"
                 + (f", MFU {100 * r['flops'] / device_s / 1e12 / peak:.1f}%" if peak else "")]
        if "aug_s" in r:
            notes.append(f"augmentation {r['aug_s']:.3f}s of it")
        if "max_abs_diff" in r:
            notes.append(f"maxdiff {r['max_abs_diff']:.1e} (rel {r['rel_diff']:.1e})")
        if "ours_unet_s" in r:
            notes.append(f"U-Net share {100 * r['ours_unet_s'] / r['ours_s']:.0f}%" + (
                f" / {100 * r['diffusers_unet_s'] / r['diffusers_s']:.0f}%, U-Net-time ratio {r['unet_ratio']:.2f}"
                if "unet_ratio" in r else ""))
        notes += [r["note"]] if "note" in r else []
        if r.get("peak_bytes") and "est_peak_bytes" not in r:
            notes.append(f"peak {gib(r['peak_bytes'])}")
        if "est_peak_bytes" in r:
            notes.append(f"peak {gib(r['peak_bytes'])}, estimate {gib(r['est_peak_bytes'])} "
                         f"({100 * r['est_error']:+.1f}%)" if r["peak_bytes"] else
                         f"estimated peak {gib(r['est_peak_bytes'])} (measured: CUDA only)")
        ratio = f"{r['ratio']:5.2f}" if "ratio" in r else "    -"
        out.append(f"{name:34s} {fmt(r, 'ours'):>14s} {fmt(r, 'diffusers'):>14s} {ratio}  {' | '.join(notes)}")
    return "\n".join(out)


def estimate_main(a, rest):
    """python bench.py --estimate train|sample [flags]: the report, and its numbers as JSON with --json."""
    if a.estimate == "train":  # train.py's own flags; the size and dtype flags are shared with bench.py's
        t = train_args(None, a.frames or 16, a.height, a.width, rest)
        t.dtype = a.dtype or "bf16"
        if a.no_align:
            t.motion_align = t.corr_align = False
        e = estimate("train", size=a.size or "full", dtype=t.dtype, train=t)
    else:
        if rest:
            raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
        e = estimate("sample", size=a.size or "full", frames=a.frames or 16, height=a.height, width=a.width,
                     dtype=a.dtype or "bf16", vae_dtype=a.vae_dtype, guidance=a.guidance, detail=not a.no_detail,
                     context=a.context_frames, text_only=a.text_only, stg=a.stg)
    print(report(e))
    if a.json:
        Path(a.json).write_text(json.dumps(e, indent=2))
    return e


def get_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimate", choices=["train", "sample"], help="predict the peak GPU memory (no GPU needed); "
                    "train takes train.py's flags as well")
    ap.add_argument("--height", type=int, default=512, help="--estimate: image height")
    ap.add_argument("--width", type=int, default=512, help="--estimate: image width")
    ap.add_argument("--no-align", action="store_true", help="--estimate train: motion and correspondence alignment off")
    ap.add_argument("--vae-dtype", choices=["fp32", "bf16"], default="fp32", help="--estimate sample: the VAE's dtype")
    ap.add_argument("--guidance", type=float, default=7.5, help="--estimate sample: <= 1 means no CFG batch")
    ap.add_argument("--no-detail", action="store_true", help="--estimate sample: the plain SD decoder")
    ap.add_argument("--context-frames", type=int, help="--estimate sample: frames per U-Net call (sample.py's)")
    ap.add_argument("--text-only", action="store_true", help="--estimate sample: text-to-video (no --image)")
    ap.add_argument("--stg", type=float, default=0.0, help="--estimate sample: sample.py --stg (> 0: one more branch)")
    ap.add_argument("--all", action="store_true", help="every row, then again under torch.compile (the GPU run); "
                    "writes bench_all.json unless --json says otherwise")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="both implementations (default: CUDA bf16)")
    ap.add_argument("--size", choices=list(PRESETS), help="default: full on CUDA and for --estimate, cpu on CPU")
    ap.add_argument("--tiny", action="store_true", help="= --size tiny --steps 2 (smoke test)")
    ap.add_argument("--frames", type=int, help="override the preset's frame count")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--rows", default="unet,sample,train,decoder", help="a subset of unet,sample,train,decoder")
    ap.add_argument("--compile-rows", default="train,sample,decoder,unet", help="--all: the rows run compiled, "
                                                                                 "in this order")
    ap.add_argument("--repeats", type=int, default=10, help="timed U-Net forwards per implementation (median)")
    ap.add_argument("--sample-repeats", type=int, help="timed samples per pipeline (default CUDA 3, CPU 1)")
    ap.add_argument("--train-repeats", type=int, help="timed training steps per variant (default CUDA 5, CPU 3)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default CUDA 3, CPU 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], help="cpu = this process's CPU time: robust to other "
                                                             "processes on a shared machine (default on CPU, 1 thread)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our U-Net's (and VAE decoder's) forward")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only)")
    ap.add_argument("--time-budget", type=float, default=330, help="--all: compiled rows start only before this "
                                                                   "many seconds have passed")
    ap.add_argument("--sdpa", choices=["default", "flash", "efficient", "cudnn", "math"], default="default",
                    help="one SDPA backend for both implementations")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: from the GPU's name)")
    ap.add_argument("--json", help="write every number, raw times included, to this file")
    return ap


def main(argv=None):
    ap = get_parser()
    a, rest = ap.parse_known_args(argv)
    if a.estimate:
        return estimate_main(a, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    gpu = a.device.startswith("cuda")
    a.size, a.steps = ("tiny", 2) if a.tiny else (a.size or ("full" if gpu else "cpu"), a.steps)
    a.dtype, a.rows, a.compile_rows = a.dtype or ("bf16" if gpu else "fp32"), a.rows.split(","), \
        a.compile_rows.split(",")
    a.json = a.json or ("bench_all.json" if a.all else None)
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
    print(f"\n{name} | torch {torch.__version__} | {a.dtype} | {a.clock} clock | median of repeats ± half their "
          f"range | {res['seconds']:.0f} s\n" + table(res, a.peak_tflops))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    exit_on_error(main, oom="CUDA out of memory: try a smaller --size or --frames")
