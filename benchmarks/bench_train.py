"""Training throughput (slices/s) and peak memory of each U-Net preset on this machine.

Data loading is left out (random tensors of the right shapes), so the numbers are those of the
network + diffusion loss + AdamW + EMA step alone. Each (preset, mode) runs in its own
subprocess, so "peak memory" is that configuration's own peak: CUDA's max allocated memory on
GPU, the process's maximum resident set size on CPU.

Modes: "fp32-eager" everywhere; on CUDA also "bf16-compile" (bf16 autocast + torch.compile
+ channels_last), and the speed-up of the latter over the former is printed.

    python benchmarks/bench_train.py                      # all presets, device defaults
    python benchmarks/bench_train.py --presets tiny small --size 64 --batch 4 --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(preset: str, mode: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    import torch

    from brainpaint.config.settings import Config
    from brainpaint.diffusion.process import GaussianDiffusion
    from brainpaint.train.ema import EMA
    from brainpaint.model.unet import build_unet, count_parameters
    from brainpaint.conditioning.layout import network_channels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config.from_dict({"model": {"preset": preset}})
    in_ch, out_ch = network_channels(cfg)
    model = build_unet(cfg.model, in_ch, out_ch).to(device)
    fast = mode == "bf16-compile"
    if fast:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if fast else model
    diffusion = GaussianDiffusion(cfg.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.9999)
    x0 = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    cond = torch.rand(batch, in_ch - 1, size, size, device=device)
    if fast:
        x0, cond = (t.contiguous(memory_format=torch.channels_last) for t in (x0, cond))

    def step():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if fast and device.type == "cuda" else _null()
        with ctx:
            loss = diffusion.training_losses(net, x0, cond)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "GPU max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "CPU max RSS"
    return {
        "preset": preset,
        "mode": mode,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "params_m": count_parameters(model) / 1e6,
        "size": size,
        "batch": batch,
        "steps": steps,
        "slices_per_s": steps * batch / seconds,
        "s_per_step": seconds / steps,
        "peak_mib": peak,
        "peak_kind": peak_kind,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"])
    parser.add_argument("--size", type=int, default=None, help="slice size (default 224 on GPU, 64 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default 8 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    size = args.size or (224 if gpu else 64)
    batch = args.batch or (8 if gpu else 2)
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], size, batch, steps, warmup)))
        return

    modes = ["fp32-eager", "bf16-compile"] if gpu else ["fp32-eager"]
    print(f"device: {'cuda ' + torch.cuda.get_device_name() if gpu else 'cpu'}; slice {size}x{size}, batch {batch}, "
          f"{steps} timed steps after {warmup} warm-up")
    print(f"{'preset':8} {'mode':13} {'params':>8} {'slices/s':>9} {'s/step':>8} {'peak MiB':>9}  peak of")
    results = {}
    for preset in args.presets:
        for mode in modes:
            cmd = [sys.executable, __file__, "--one", preset, mode, "--size", str(size), "--batch", str(batch),
                   "--steps", str(steps), "--warmup", str(warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                print(f"{preset:8} {mode:13} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(preset, mode)] = r
            print(f"{preset:8} {mode:13} {r['params_m']:7.2f}M {r['slices_per_s']:9.2f} {r['s_per_step']:8.3f} "
                  f"{r['peak_mib']:9.0f}  {r['peak_kind']}")
    if gpu:
        for preset in args.presets:
            a, b = results.get((preset, "fp32-eager")), results.get((preset, "bf16-compile"))
            if a and b:
                print(f"speed-up bf16+compile over fp32 eager, {preset}: {b['slices_per_s'] / a['slices_per_s']:.2f}x"
                      + ("  (target >= 2.5x)" if preset == "paper" else ""))


if __name__ == "__main__":
    main()
