"""
Peak GPU memory of a FLASH training step (train.py) or a sample (sample.py) at full size, predicted on the CPU with
no weights allocated: the models are built on the meta device as the scripts hold them on the GPU, and train.py's own
step (train.unet_step / decoder_step, backward, clipping, AdamW) or sample.py's own sampler runs on meta tensors
while a tracker counts the live tensor bytes, split by kind, and torch's FLOP formulas. The same numbers three ways:
    python train.py --estimate-memory [train.py's flags: --frames 16 --height 512 --no-gradient-checkpointing ...]
    python sample.py --estimate-memory [sample.py's flags: --frames 64 --height 512 --vae-dtype bf16 ...]
    python bench.py --estimate train|sample [flags]          (bench.py's alias; bench.py --all compares them with
                                                               the measured CUDA peaks)
"""
import time
import weakref
from collections import Counter
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

import model as M
import sample as S
import train as T
from clip_text import CLIPTextConfig, CLIPTextModel, Tokenizer, byte_vocab
from vae import VAE, VAEConfig

PRESETS = {  # U-Net (UNetConfig fields), VAE (VAEConfig fields), CLIP (hidden, layers, heads), latent side, frames
    "full": dict(unet={}, vae={}, clip=(768, 12, 12), latent=64, frames=16),
    "cpu": dict(unet=dict(block_out_channels=(32, 64, 128, 128), attention_heads=2, motion_heads=2,
                          cross_attention_dim=64), vae=dict(block_out_channels=(32, 64, 128, 128)), clip=(64, 2, 2),
                latent=16, frames=8),
    "tiny": dict(unet=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_heads=2, motion_heads=2,
                           norm_num_groups=8, cross_attention_dim=16),
                 vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8), clip=(16, 1, 2),
                 latent=8, frames=4),
}
PROMPT = "a person is dancing"

# ----------------------------------------------------------------------------- memory estimate (no GPU, no weights)

class LiveBytes(TorchDispatchMode):
    """Live bytes of meta-tensor storages: each is counted when an op creates it (rounded up to the CUDA caching
    allocator's 512-byte blocks, as torch.cuda.max_memory_allocated counts) and dropped by a finalizer when it dies.
    `peak` is the most ever live at once, `at_peak` its split by kind, `peak_phase` the phase it fell in, `phases`
    each phase's peak; `flops` sums torch's FLOP formulas (torch.utils.flop_counter) over the ops run. Meta tensors
    hold no values: `.item()` (a loss for a log line) reads 0."""

    def __init__(self, block=512):
        super().__init__()
        self.block, self.live, self.kinds, self.total, self.peak, self.flops = block, {}, Counter(), 0, 0, 0
        self.at_peak, self.phase, self.peak_phase, self.phases = {}, "", "", {}

    def add(self, t, kind="activations, workspace"):
        st = t.untyped_storage()
        if id(st) in self.live:  # a view, an in-place result, a tensor already counted
            return
        n = -(-st.nbytes() // self.block) * self.block
        self.live[id(st)] = [n, kind]
        self.kinds[kind] += n
        self.total += n
        weakref.finalize(st, self.free, id(st))
        self.phases[self.phase] = max(self.phases.get(self.phase, 0), self.total)
        if self.total > self.peak:
            self.peak, self.at_peak, self.peak_phase = self.total, dict(self.kinds), self.phase

    def label(self, t, kind):
        entry = self.live[id(t.untyped_storage())]
        self.kinds[entry[1]] -= entry[0]
        self.kinds[kind] += entry[0]
        entry[1] = kind

    def free(self, key):
        n, kind = self.live.pop(key)
        self.kinds[kind] -= n
        self.total -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return 0
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                self.add(t)
        return out


class MetaAutocast:
    """CUDA autocast's cast policy (ATen autocast_mode.h) for meta tensors, which no autocast touches. While CPU
    autocast is on (train.py's `with autocast:`, here torch.autocast("cpu", dtype); gradient checkpointing re-enters
    it for its recompute as it would CUDA's), torch.nn.functional's convolutions and linears run in `dtype`, its
    norms, upsampling and MSE in fp32; a trainable fp32 weight is cast once and the copy kept until autocast exits,
    as autocast's weight cache does. Patches those six functions while the `with` block lasts."""
    LOW, FP32 = ("conv2d", "linear"), ("group_norm", "layer_norm", "interpolate", "mse_loss")

    def __init__(self, dtype):
        self.dtype, self.cache, self.saved = dtype, {}, {}

    def cast(self, a, to):
        if not (isinstance(a, torch.Tensor) and a.is_meta and a.is_floating_point()) or a.dtype == to:
            return a
        if to == torch.float32 or not (torch.is_autocast_cache_enabled() and a.is_leaf and a.requires_grad):
            return a.to(to)
        if id(a) not in self.cache:
            self.cache[id(a)] = a.to(to)
        return self.cache[id(a)]

    def policy(self, name, fn):
        def cast_then(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                to = self.dtype if name in self.LOW else torch.float32
                args, kwargs = tree_map(lambda a: self.cast(a, to), (args, kwargs))
            return fn(*args, **kwargs)
        return cast_then

    def clear(self):  # torch.autocast's exit calls torch.clear_autocast_cache() when the outermost one ends
        self.cache.clear()
        self.saved["clear_autocast_cache"]()

    def __enter__(self):
        for name in self.LOW + self.FP32:
            self.saved[name] = getattr(F, name)
            setattr(F, name, self.policy(name, self.saved[name]))
        self.saved["clear_autocast_cache"], torch.clear_autocast_cache = torch.clear_autocast_cache, self.clear
        return self

    def __exit__(self, *exc):
        torch.clear_autocast_cache = self.saved.pop("clear_autocast_cache")
        for name, fn in self.saved.items():
            setattr(F, name, fn)
        self.saved.clear()


def train_args(stage="unet", frames=16, height=512, width=512, argv=()):
    """train.py's settings: its own parser and defaults (stage None: argv's --stage)."""
    return train_settings(T.get_parser().parse_args([*argv, *(["--stage", stage] if stage else []), "--frames",
                                                     str(frames), "--height", str(height), "--width", str(width)]))


def train_settings(t):
    """train.py's parsed flags -> the settings its step runs with (train.check_args' defaults and implications)."""
    t.lr = t.lr or (5e-5 if t.stage == "unet" else 1e-4)  # as train.check_args
    if not t.strong_aug:  # alignment needs the augmented clip
        t.motion_align = t.corr_align = False
    return t


def train_setup(t, pipe):
    """train.train()'s set-up on any device: the stage's trainable set in fp32, AdamW (foreach, CUDA's default),
    gradient checkpointing as set -> (params, optimizer)."""
    model = pipe.unet if t.stage == "unet" else pipe.vae
    params = T.trainable_parameters(model, t.stage)
    opt = torch.optim.AdamW(params.values(), lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    if t.stage == "unet":
        pipe.unet.gradient_checkpointing = t.gradient_checkpointing
    else:
        pipe.vae.decoder.gradient_checkpointing = t.gradient_checkpointing
    model.train()
    return params, opt


def train_data(t, pipe, embed, seed=0):
    """What train.train() hands its step: a clip in [-1, 1] (F, 3, H, W) on the device, the caption's embedding
    (also standing in for the empty prompt's: same shape, same cost), a CPU generator, the noise schedule, the
    timestep weights, the count of cross-frame layers."""
    g = torch.Generator().manual_seed(seed)
    clip = (torch.rand(t.frames, 3, t.height, t.width, generator=g) * 2 - 1).to(pipe.device)  # as train.py moves it
    return SimpleNamespace(clip=clip, embed=embed, gen=g,
                           seed=seed, acp=S.alphas_cumprod().to(pipe.device), t_weights=T.timestep_weights(
                               t.timestep_alpha if t.timesteps == "cosine" else 0.0),
                           n_layers=len(T.cross_frame_layers(pipe.unet)) if pipe.unet is not None else 0)


def flash_step(t, pipe, params, opt, d, autocast):
    """One iteration of train.train()'s loop for either stage, through train.py's own unet_step / decoder_step
    (augmentation included, on the device as train.py runs it). The generator is reseeded: every call runs the same t,
    augmentation and aligned layers (torch.compile then traces one graph)."""
    d.gen.manual_seed(d.seed)
    if t.stage == "unet":
        loss, _ = T.unet_step(t, pipe, d.clip, d.embed, d.embed, d.gen, autocast, d.acp, d.t_weights, d.n_layers)
    else:
        loss, _ = T.decoder_step(t, pipe, d.clip, d.gen, autocast)
    loss.backward()
    if t.stage == "unet":
        T.set_alignment(pipe.unet)
    torch.nn.utils.clip_grad_norm_(params.values(), t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def sample_pass(pipe, frames, height, width, guidance=7.5, steps=2, context=None, text_only=False, stg=0.0):
    """sample.animate()'s device work through the sampler's own functions (sample.sampling_plan, encode, the mode
    sample.py picks, decode): the prompt and the first frame encoded, `steps` guided DDIM steps (every step holds
    the same memory), the decode in chunks of 4 with the reference's encoder features."""
    img = None if text_only else torch.zeros(3, height, width)
    run = S.sampling_plan(pipe, frames, steps, guidance, text_only, "off", context=context, stg=stg)
    img, noise = S.encode(run, img, PROMPT, "", height, width, seed=0, mixed_noise=0.0)
    run.bar = iter(range(run.calls))
    with S.cross_frame_attention(pipe.unet, on=not text_only):
        x = S.MODES[run.mode](run, noise)
    return S.decode(pipe, x, img)[0]


def estimate(kind, size="full", frames=16, height=512, width=512, dtype="bf16", train=None, vae_dtype="fp32",
             guidance=7.5, detail=True, context=None, text_only=False, block=512, stg=0.0):
    """Peak GPU memory of one training step (kind "train"; `train` = train_args(), its stage and switches) or one
    sample (kind "sample"), the models built on the meta device as train.py / sample.py hold them on the GPU.
    Returns bytes at the peak by kind, the resident bytes before the step, the phase of the peak and the FLOPs."""
    t = train or train_args("unet", frames, height, width)
    frames, height, width = (t.frames, t.height, t.width) if kind == "train" else (frames, height, width)
    S.check_size(height, width)
    if frames < 2 or (kind == "train" and t.stage == "decoder" and not 1 <= t.decoder_frames <= frames):
        raise ValueError(f"--frames {frames}: want at least 2 (and --decoder-frames between 1 and --frames)")
    p, dt, dev, t0 = PRESETS[size], M.DTYPES[dtype], torch.device("meta"), time.time()
    stage = t.stage if kind == "train" else "sample"
    with torch.device("meta"):
        unet = M.UNet(M.UNetConfig(**p["unet"])).to(dt) if stage != "decoder" else None
        # the decoder a GPU run trains: train.py's --detail-branches, --detail-full-res auto = on under CUDA
        branches = tuple(t.detail_branches.split(",")) if stage == "decoder" else ("warp", "patch")
        full_res = t.detail_full_res != "off" if stage == "decoder" else True
        vae = VAE(VAEConfig(**p["vae"], detail=stage == "decoder" or (stage == "sample" and detail),
                            detail_branches=branches, detail_full_res=full_res))
        hid, layers, heads = p["clip"]
        te = CLIPTextModel(CLIPTextConfig(hidden_size=hid, intermediate_size=4 * hid, num_hidden_layers=layers,
                                          num_attention_heads=heads)) if stage == "sample" else None
    vae.to(M.DTYPES[vae_dtype] if stage == "sample" else torch.float32)  # train.py: the VAE in fp32
    pipe = S.Pipeline(unet, vae, te, Tokenizer(*byte_vocab()), dev, dt)
    params, opt = train_setup(t, pipe) if kind == "train" else ({}, None)
    if opt is not None:  # AdamW's state, as the first real step allocates it
        for q in params.values():
            q.grad = torch.zeros_like(q)
        opt.step()
        opt.zero_grad(set_to_none=True)
    models = [m for m in (unet, vae, te) if m is not None]
    with LiveBytes(block) as track, MetaAutocast(dt):
        trainable = {id(q) for q in params.values()}
        for m in models:
            for q in [*m.parameters(), *m.buffers()]:
                track.add(q, "trainable (fp32)" if id(q) in trainable else "frozen weights")
        for state in opt.state.values() if opt else ():
            for v in state.values():
                if torch.is_tensor(v) and v.is_meta:
                    track.add(v, "AdamW state")
        resident = dict(track.kinds)
        for q in params.values():
            q.register_post_accumulate_grad_hook(lambda q: track.label(q.grad, "gradients"))
        for m, name in ((vae.encoder, "VAE encode"), (vae.decoder, "VAE decode"), (unet, "U-Net forward"),
                        (te, "text encoder")):
            if m is not None:
                m.register_forward_pre_hook(lambda *_, name=name: setattr(track, "phase", name))
        if kind == "train":  # after the forward that carries the graph: loss, backward (with recompute), clipping
            (unet if stage == "unet" else vae.decoder).register_forward_hook(
                lambda *_: setattr(track, "phase", "backward"))
            opt.register_step_pre_hook(lambda *_: setattr(track, "phase", "AdamW step"))
            data = train_data(t, pipe, torch.zeros(1, 77, p["unet"].get("cross_attention_dim", 768)))
            flash_step(t, pipe, params, opt, data, torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32))
        else:
            sample_pass(pipe, frames, height, width, guidance, context=context, text_only=text_only, stg=stg)
    what = (f"{'training step, ' + stage + ' stage' if kind == 'train' else 'sample'} ({size} size) | {frames} "
            f"frames {height}x{width}")
    if kind == "train" and stage == "unet":
        what += (f", {2 if t.strong_aug else 1} clip(s), motion alignment {'on' if t.motion_align else 'off'}, "
                 f"correspondence alignment {'on' if t.corr_align else 'off'}, gradient checkpointing "
                 f"{'on' if t.gradient_checkpointing else 'off'}, frozen weights {dtype}, VAE fp32")
    elif kind == "train":
        what += (f", {t.decoder_frames} frames decoded, branches {'+'.join(branches)}"
                 f"{' (patch attention at full resolution too)' * full_res}, gradient checkpointing "
                 f"{'on' if t.gradient_checkpointing else 'off'}, VAE fp32 under {dtype} autocast")
    else:
        plan = S.sampling_plan(pipe, frames, 25, guidance, text_only, "off", context=context)
        how = "" if plan.mode == "plain" else f" ({plan.mode}, {plan.calls} U-Net calls at 25 steps)"
        dec = "on (full-resolution patch attention, as a GPU-trained one)" if detail and not text_only else "off"
        what += (f" over {plan.context}-frame U-Net calls{how}{', text-to-video' * text_only}, CFG batch of "
                 f"{2 if guidance > 1 else 1}{' + 1 for STG' * bool(stg)}, U-Net {dtype}, VAE {vae_dtype}, "
                 f"detail decoder {dec}, text encoder fp32")
    return dict(kind=kind, what=what, peak=track.peak, at_peak=track.at_peak, resident=resident,
                phase=track.peak_phase, phases={k: v for k, v in track.phases.items() if k}, flops=track.flops,
                trainable_params=sum(q.numel() for q in params.values()), seconds=time.time() - t0)


def report(e, gpu_gib=(12, 16, 24, 48, 80)):
    """The estimate as the lines the CLI prints."""
    gib = lambda b: f"{b / 2**30:6.2f} GiB"
    out = [f"memory estimate: {e['what']} | meta tensors, no weights allocated ({e['seconds']:.0f} s)"]
    for kind, b in e["at_peak"].items():
        extra = f"   {e['trainable_params'] / 1e6:.1f}M parameters" if kind.startswith("trainable") else ""
        out.append(f"  {kind:24s} {gib(b)}{extra}")
    out.append(f"  {'peak':24s} {gib(e['peak'])}   ({e['peak'] / 1e9:.1f} GB) during {e['phase']}")
    out.append(f"  peak of each phase: {', '.join(f'{k} {v / 2**30:.2f}' for k, v in e['phases'].items())} GiB")
    fits = [f"{g} GiB {'yes' if e['peak'] + 2**30 <= g * 2**30 else 'no'}" for g in gpu_gib]
    out.append(f"  fits (1 GiB left for the CUDA context and fragmentation): {', '.join(fits)}")
    if e["kind"] == "train":
        out.append(f"  FLOPs per step {e['flops'] / 1e12:.1f} T (counted): >= {e['flops'] / 71e12:.1f} s on an "
                   f"RTX 3090 (71 TFLOP/s dense bf16), {e['flops'] / 71e12 / 0.4:.1f} s at 40 % MFU")
    out.append("  assumed: SDPA runs a fused kernel (flash / memory-efficient: O(L) memory, no L x L scores); CUDA "
               "autocast's cast policy; not counted: the CUDA context, cuDNN / cuBLAS workspaces, allocator "
               "fragmentation (torch.cuda.memory_reserved() above max_memory_allocated())")
    return "\n".join(out)


