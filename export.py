"""Export a FLASH run (arXiv 2503.00276) to the formats other AnimateDiff tools load.

FLASH trains the motion modules and the spatial attn1 to_k/to_v (A3.2); train.py saves them as flash.safetensors.
  animatediff: the trained motion modules merged into the base one, in the key layout of the AnimateDiff file that
               was trained (mm_sd_v15_v2 / v3 / v1), plus the attn1 K/V deltas as a kohya-style SD-1.5 U-Net LoRA
  diffusers:   a MotionAdapter folder (MotionAdapter.from_pretrained) plus the attn1 K/V deltas as a diffusers/PEFT
               LoRA (pipe.load_lora_weights)
  lora:        the motion-module delta (trained - base) as a rank-R MotionLoRA: truncated SVD of each temporal
               attention projection's delta, in AnimateDiff's MotionLoRA layout (v2_lora_*.ckpt keys)
No export carries FLASH's cross-frame attention (attn1 keys/values from a clean first frame, Sec. 3.1), which stock
AnimateDiff tools lack: there the export gives text-to-video of the learned action; sample.py keeps the full method.
    python export.py runs/flash --to diffusers --out exported/
"""
import argparse
import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from model import DTYPES, PositionalEncoding, load_unet, read_json

LORA_PROJ = ("to_q", "to_k", "to_v", "to_out")  # MotionLoRA: the temporal attention projections (to_out = to_out.0)
AD_TO_DIFFUSERS = [(".attention_blocks.0.pos_encoder.pe", ".pos_embed.pe"),  # diffusers: one PE per block
                   (".temporal_transformer.", "."), (".norms.0.", ".norm1."), (".norms.1.", ".norm2."),
                   (".ff_norm.", ".norm3."), (".attention_blocks.0.", ".attn1."), (".attention_blocks.1.", ".attn2.")]


def get_parser():
    p = argparse.ArgumentParser(description="Export a FLASH run to AnimateDiff, diffusers or MotionLoRA files.")
    p.add_argument("run", help="train.py output folder (or one of its checkpoint-NNNNNN folders)")
    p.add_argument("--to", required=True, choices=["animatediff", "diffusers", "lora"])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--rank", type=int, help="LoRA rank: MotionLoRA (default 64, AnimateDiff's: 19 M parameters "
                                            "on SD-1.5) and the attn1 LoRA (default full rank: exact)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written tensors")
    p.add_argument("--base", help="SD-1.5 base (default: the one in the run's settings.json)")
    p.add_argument("--motion-module", help="base motion module (default: the one in the run's settings.json)")
    return p


def read_run(path):
    """A FLASH unet-stage run or checkpoint folder -> (trained tensors without the 'unet.' prefix, settings)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (want a train.py output folder)")
    folder = path
    if not os.path.isfile(os.path.join(path, "flash.safetensors")):  # a run stopped early: its newest checkpoint
        found = sorted(glob.glob(os.path.join(path, "checkpoint-??????")))
        folder = found[-1] if found else path
    file, cfg = os.path.join(folder, "flash.safetensors"), os.path.join(folder, "settings.json")
    if not (os.path.isfile(file) and os.path.isfile(cfg)):
        raise ValueError(f"{path}: not a FLASH run folder (no flash.safetensors + settings.json from train.py)")
    settings = read_json(cfg)
    if settings.get("stage", "unet") != "unet":
        raise ValueError(f"{path}: a '{settings['stage']}'-stage run; only the unet stage (motion modules, attn1 "
                         f"K/V) has an AnimateDiff counterpart (the detail decoder stays with sample.py)")
    sd = load_file(file)
    bad = [k for k in sd if not k.startswith("unet.") or not ("motion_modules." in k or ".attn1.to_k." in k
                                                               or ".attn1.to_v." in k)]
    if bad or not sd:
        raise ValueError(f"{file}: not FLASH unet-stage weights (unexpected key(s): {', '.join(bad[:3]) or 'none'})")
    return {k[len("unet."):]: v.float() for k, v in sd.items()}, settings


def load_run(args):
    """-> (base U-Net with the base motion module, trained tensors, settings); names every mismatch."""
    trained, settings = read_run(args.run)
    if args.rank is not None:  # refused before the base (GBs) is read: the trained tensors have the layers' shapes
        lora_layers = [v.shape for k, v in trained.items() if ("motion_modules." in k) == (args.to == "lora")
                       and k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))]
        check_rank(args.rank, lora_layers, "temporal attention" if args.to == "lora" else "attn1")
    base, mm = args.base or settings.get("base"), args.motion_module or settings.get("motion_module")
    if not base or not mm:
        raise ValueError(f"{args.run}: settings.json names no base / motion module: pass --base and --motion-module")
    unet = load_unet(base, mm).float().eval()
    want, have = settings.get("motion_version"), unet.info.get("motion_version")
    if want and want != have:
        raise ValueError(f"{args.run} was trained on motion module {want}, but {mm} is {have}")
    own = unet.state_dict()
    shapes = [k for k in trained if k in own and own[k].shape != trained[k].shape]
    if set(trained) - set(own) or shapes:
        raise ValueError(f"{args.run}: key(s) {', '.join((sorted(set(trained) - set(own)) + shapes)[:3])} do not fit "
                         f"the base U-Net {base}")
    return unet, trained, settings


def low_rank(delta, rank):
    """delta (out, in) -> up (out, r), down (r, in) with up @ down the best rank-r approximation (Eckart-Young:
    truncated SVD, sqrt(S) on each side), and the squared Frobenius norms (dropped, total)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), s[rank:].square().sum(), s.square().sum()


def check_rank(rank, shapes, what):
    """A rank above a layer's full rank is that layer's full rank (exact); one above every layer's is refused."""
    top = max((min(s) for s in shapes), default=0)
    if rank is not None and not 1 <= rank <= top:
        raise ValueError(f"--rank {rank}: want 1 <= rank <= {top}, the full rank of the largest {what} layer")


def attn1_lora(unet, trained, rank, kohya):
    """attn1 to_k/to_v deltas (trained - base) as a U-Net LoRA, kohya's layout (ComfyUI, A1111: lora_unet_*.lora_down
    / lora_up; no alpha key = scale 1 in every loader, also where ranks differ per layer) or diffusers/PEFT's
    (unet.*.lora_A / lora_B) -> (tensors, error, total)."""
    own, out, err, total = unet.state_dict(), {}, 0.0, 0.0
    keys = sorted(k for k in trained if ".attn1.to_" in k)
    check_rank(rank, [own[k].shape for k in keys], "attn1")
    for k in keys:
        delta = trained[k] - own[k]
        up, down, e, t = low_rank(delta, min(rank or delta.shape[0], *delta.shape))
        err, total, name = err + e, total + t, k[: -len(".weight")]
        if kohya:
            stem = "lora_unet_" + name.replace(".", "_")
            out |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}  # no .alpha: scale 1
        else:
            out |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
    return out, err, total


def merged_motion_module(unet, trained):
    """The base motion module with the trained tensors in, AnimateDiff names (pos_encoder.pe included, as its files)."""
    sd = {k: trained.get(k, v) for k, v in unet.state_dict().items() if "motion_modules." in k}
    for name, m in unet.named_modules():
        if isinstance(m, PositionalEncoding):
            sd[name + ".pe"] = m.pe
    return sd


def adapter_config(cfg):
    """diffusers MotionAdapter config.json for our UNetConfig."""
    return {"_class_name": "MotionAdapter", "block_out_channels": list(cfg.block_out_channels),
            "motion_layers_per_block": cfg.layers_per_block, "motion_mid_block_layers_per_block": 1,
            "motion_num_attention_heads": cfg.motion_heads, "motion_norm_num_groups": cfg.norm_num_groups,
            "motion_max_seq_length": cfg.motion_max_len, "use_motion_mid_block": cfg.motion_mid_block,
            "conv_in_channels": None}


def to_diffusers_name(k):
    for a, b in AD_TO_DIFFUSERS:
        k = k.replace(a, b)
    return k


def motion_lora(unet, trained, rank):
    """MotionLoRA (AnimateDiff's layout: ...attention_blocks.{a}.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}
    .weight, W = W_base + up @ down) of the motion-module delta -> (tensors, dropped, total, uncarried, all): squared
    Frobenius norms of what rank r drops of the projections' deltas, and of the delta tensors the layout cannot hold
    (proj_in/out, feed-forward, norms, biases) against the whole motion-module delta."""
    own = unet.state_dict()
    proj = {k for k in own if "motion_modules." in k and k.endswith(tuple(f".{p}.weight" for p in LORA_PROJ[:3])
                                                                    + (".to_out.0.weight",))}
    check_rank(rank, [own[k].shape for k in proj], "temporal attention")
    out, err, total, other, whole = {}, 0.0, 0.0, 0.0, 0.0
    for k in sorted(own):
        if "motion_modules." not in k:
            continue
        delta = trained.get(k, own[k]) - own[k]
        whole += delta.double().square().sum()
        if k not in proj:
            other += delta.double().square().sum()
            continue
        up, down, e, t = low_rank(delta, min(rank, *delta.shape))
        err, total = err + e, total + t
        head, p = k[: -len(".weight")].replace(".to_out.0", ".to_out").rsplit(".", 1)
        out |= {f"{head}.processor.{p}_lora.down.weight": down, f"{head}.processor.{p}_lora.up.weight": up}
    return out, err, total, other, whole


def write(tensors, path, dtype):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)  # never half a file under the final name
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {sum(v.numel() for v in tensors.values()) / 1e6:.2f}"
          f"M parameters, {dtype})")
    return path


def rel(err, total):
    return (err / total) ** 0.5 if total > 0 else 0.0


def export(args):
    """Write the files of args.to into args.out -> list of written paths."""
    unet, trained, settings = load_run(args)
    written = []
    if any(k > 1 for k in unet.config.motion_window):
        print(f"warning: this base's motion modules attend over {unet.config.motion_window} neighbourhoods (the demo "
              f"toy's switch, model.UNetConfig.motion_window); AnimateDiff tools attend at one position, so they will "
              f"not reproduce it", file=sys.stderr)
    if args.to == "lora":
        rank = args.rank or 64
        sd, err, total, other, whole = motion_lora(unet, trained, rank)
        written.append(write(sd, os.path.join(args.out, "motion_lora.safetensors"), args.dtype))
        print(f"rank {rank}: relative Frobenius error {rel(err, total):.3e} of the temporal attention deltas; the "
              f"layout cannot hold {100 * rel(other, whole):.1f}% (Frobenius) of the motion-module delta "
              f"(proj_in/out, feed-forward, norms, biases)")
        return written
    kohya = args.to == "animatediff"
    lora, err, total = attn1_lora(unet, trained, args.rank, kohya)
    mm = merged_motion_module(unet, trained)
    if kohya:
        written.append(write(mm, os.path.join(args.out, f"motion_module_{settings.get('motion_version')}"
                                                        ".safetensors"), args.dtype))
        written.append(write(lora, os.path.join(args.out, "attn1_lora.safetensors"), args.dtype))
    else:
        folder = os.path.join(args.out, "motion_adapter")
        written.append(write({to_diffusers_name(k): v for k, v in mm.items() if not k.endswith("1.pos_encoder.pe")},
                             os.path.join(folder, "diffusion_pytorch_model.safetensors"), args.dtype))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(adapter_config(unet.config), f, indent=2)
        written.append(write(lora, os.path.join(args.out, "attn1_lora", "pytorch_lora_weights.safetensors"),
                             args.dtype))
    print(f"attn1 K/V LoRA rank {args.rank or 'full'}: relative Frobenius error {rel(err, total):.3e}")
    return written


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank {args.rank}: want a positive rank")
    written = export(args)
    print(f"done: {len(written)} file(s) in {args.out}; these carry no cross-frame attention: in stock AnimateDiff "
          f"tools they give text-to-video of the learned action (image-to-video needs sample.py)")
    return written


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
