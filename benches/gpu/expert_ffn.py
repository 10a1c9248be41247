#!/usr/bin/env python3
"""Times our CUDA expert FFN and PyTorch's torch._grouped_mm in the same run, on the same row counts.

Usage: expert_ffn.py BENCH_FFN_BINARY [--iters N] [--out results.json]

Ours: the `bench_ffn` example (grouped GEMM gate|up, fused SiLU*up*router-weight kernel, grouped GEMM
down), timed with CUDA events inside the binary. Torch: the same FFN with two torch._grouped_mm calls
and the activation in eager PyTorch; also the two _grouped_mm calls alone ("gemm only"). Inputs are
random (never zeros); each side is checked against an f64 reference on sampled rows.
"""
import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

PEAK_TBPS = 4.22  # copy bandwidth measured on this card (issue 4)
PEAK_TFLOPS = 788.0  # bf16 matrix rate measured on this card (issue 4)


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        per.append(a.elapsed_time(b) / iters)
    per.sort()
    return per[2]


def torch_rows(h, i, e, counts, iters):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    total = sum(counts)
    # Weights in Linear layout [out, in], viewed transposed (column-major), as _grouped_mm wants.
    w_gu = (torch.rand(e, 2 * i, h, device=dev, generator=g) * 2 - 1).mul_(3 ** 0.5 / h ** 0.5).bfloat16()
    w_d = (torch.rand(e, h, i, device=dev, generator=g) * 2 - 1).mul_(3 ** 0.5 / i ** 0.5).bfloat16()
    x = (torch.rand(total, h, device=dev, generator=g) * 2 - 1).bfloat16()
    rw = torch.rand(total, device=dev, generator=g) * 0.9 + 0.1
    offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bt, dt = w_gu.transpose(-2, -1), w_d.transpose(-2, -1)

    def ffn():
        y = torch._grouped_mm(x, bt, offs=offs)
        act = (F.silu(y[:, :i].float()) * y[:, i:].float() * rw[:, None]).bfloat16()
        return torch._grouped_mm(act, dt, offs=offs)

    act0 = (torch.rand(total, i, device=dev, generator=g) * 2 - 1).bfloat16()

    def gemms():
        torch._grouped_mm(x, bt, offs=offs)
        return torch._grouped_mm(act0, dt, offs=offs)

    out = ffn()
    # f64 reference on the last row of a few experts.
    num = den = 0.0
    ends = offs.tolist()
    for ex in range(0, e, max(1, e // 4)):
        r = ends[ex] - 1
        xr = x[r].double()
        gt = w_gu[ex].double() @ xr
        a = F.silu(gt[:i]) * gt[i:] * rw[r].double()
        ref = w_d[ex].double() @ a
        num += ((out[r].double() - ref) ** 2).sum().item()
        den += (ref ** 2).sum().item()
    rel = (num / den) ** 0.5
    finite = bool(torch.isfinite(out).all().item())
    return time_ms(ffn, iters), time_ms(gemms, iters), rel, finite


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="expert_ffn.json")
    ap.add_argument("--configs", default="2048:768:128,7168:2048:32,4096:14336:8")
    ap.add_argument("--tpe", default="8,64,512,2048")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    proc = subprocess.Popen([a.binary, "--iters", str(a.iters), "--configs", a.configs, "--tpe", a.tpe],
                            stdout=subprocess.PIPE, text=True)
    ours = []
    for line in proc.stdout:  # streamed, so a run cut short still shows what it measured
        if line.startswith("{"):
            ours.append(json.loads(line))
            o = ours[-1]
            print(f"ours {o['hidden']}:{o['inter']}:{o['experts']} tpe {o['tpe']} {o['mode']}: {o['ms']:.3f} ms rel {o['rel_err']}", flush=True)
    if proc.wait() != 0:
        print(f"bench_ffn exited with {proc.returncode}", file=sys.stderr)
    rows = []
    # "ours" is the Auto mode (what the worker runs); the fixed modes are kept for reference.
    best = {}
    for o in ours:
        if o["mode"] == "Auto":
            best[(o["hidden"], o["inter"], o["experts"], o["tpe"])] = o
    for key, o in best.items():
        h, i, e, tpe = key
        modes = {m["mode"]: m["ms"] for m in ours if (m["hidden"], m["inter"], m["experts"], m["tpe"]) == key}
        t_ffn, t_gemm, rel, finite = torch_rows(h, i, e, o["counts"], a.iters)
        total = o["tokens"]
        bytes_ = e * 3 * h * i * 2 + 2 * total * h * 2
        flops = 6.0 * total * h * i
        rows.append(dict(hidden=h, inter=i, experts=e, tpe=tpe, tokens=total, ours_ms=o["ms"], ours_mode=o["mode"],
                         ours_modes=modes, ours_rel_err=o["rel_err"], ours_finite=o["finite"],
                         torch_ffn_ms=t_ffn, torch_gemm_ms=t_gemm, torch_rel_err=rel, torch_finite=finite,
                         speedup_vs_torch_ffn=t_ffn / o["ms"], speedup_vs_torch_gemm=t_gemm / o["ms"],
                         ours_tbps=bytes_ / (o["ms"] * 1e-3) / 1e12, ours_tflops=flops / (o["ms"] * 1e-3) / 1e12,
                         torch_tbps=bytes_ / (t_ffn * 1e-3) / 1e12, torch_tflops=flops / (t_ffn * 1e-3) / 1e12))
        print(json.dumps(rows[-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, raw=ours), f, indent=1)
    print("\n| H | I | E | tok/exp | tokens | ours ms (Auto) | grouped / per-expert ms | torch FFN ms | torch GEMMs ms | x torch FFN | x torch GEMMs "
          "| ours TB/s (% of 4.22) | ours TFLOP/s (% of 788) | rel err ours / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hidden']} | {r['inter']} | {r['experts']} | {r['tpe']} | {r['tokens']} | {r['ours_ms']:.3f} | {r['ours_modes'].get('Grouped', 0):.3f} / {r['ours_modes'].get('PerExpert', 0):.3f} "
              f"| {r['torch_ffn_ms']:.3f} | {r['torch_gemm_ms']:.3f} | {r['speedup_vs_torch_ffn']:.2f} | {r['speedup_vs_torch_gemm']:.2f} "
              f"| {r['ours_tbps']:.2f} ({100 * r['ours_tbps'] / PEAK_TBPS:.0f}%) | {r['ours_tflops']:.0f} ({100 * r['ours_tflops'] / PEAK_TFLOPS:.0f}%) "
              f"| {r['ours_rel_err']:.1e} / {r['torch_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
