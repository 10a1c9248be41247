#!/usr/bin/env python3
"""FP8 expert FFN (issue "7 of 10"): ours against torch._scaled_grouped_mm and against our own bf16
path, in one run, on the same row counts (DeepSeek-V3 expert shape by default: H 7168, I 2048, 32
experts on a rank).

Usage: expert_ffn_fp8.py BENCH_FFN_BINARY [--iters N] [--tpe 8,16,32,64,512,2048] [--out f.json]

- ours FP8: `bench_ffn --configs H:I:E:fp8`: weights FP8 E4M3 with 128x128 block scales resident,
  activations quantized per 1x128 by our kernel, cuBLASLt block-scaled GEMMs per expert on the
  device's streams, the fused SiLU kernel; timed with CUDA events in the binary.
- ours bf16: `bench_ffn --configs H:I:E` (Auto mode), the same rows.
- torch FP8: the same FFN with torch._scaled_grouped_mm (one grouped launch per projection;
  rowwise scales, the scaling it supports on sm_90: one per row of x and per output channel of each
  expert's weight), activations quantized rowwise in PyTorch, SiLU in eager PyTorch. Timed with
  use_fast_accum off and on; the faster counts as the peer.
Accuracy: each side against the f64 FFN on its own dequantized weights, sampled rows.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from expert_ffn import time_ms  # the same timing as the bf16 table

FP8 = torch.float8_e4m3fn


def quant_rows(t):
    amax = t.abs().amax(dim=-1).float().clamp(min=1e-12)
    s = amax / 448.0
    return (t.float() / s.unsqueeze(-1)).to(FP8), s


def torch_fp8(h, i, e, counts, iters, fast):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    total = sum(counts)
    w_gu = (torch.rand(e, 2 * i, h, device=dev, generator=g) * 2 - 1).mul_(3 ** 0.5 / h ** 0.5)
    w_d = (torch.rand(e, h, i, device=dev, generator=g) * 2 - 1).mul_(3 ** 0.5 / i ** 0.5)
    qgu, sgu = quant_rows(w_gu)  # per output channel
    qd, sd = quant_rows(w_d)
    x = (torch.rand(total, h, device=dev, generator=g) * 2 - 1).bfloat16()
    rw = torch.rand(total, device=dev, generator=g) * 0.9 + 0.1
    offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bt, dt = qgu.transpose(-2, -1), qd.transpose(-2, -1)

    def ffn():
        xq, xs = quant_rows(x)
        y = torch._scaled_grouped_mm(xq, bt, xs, sgu, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=fast)
        act = F.silu(y[:, :i].float()) * y[:, i:].float() * rw[:, None]
        aq, as_ = quant_rows(act)
        return torch._scaled_grouped_mm(aq, dt, as_, sd, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=fast)

    out = ffn()
    num = den = 0.0
    ends = offs.tolist()
    for ex in range(0, e, max(1, e // 4)):
        r = ends[ex] - 1
        wg = qgu[ex].double() * sgu[ex].double().unsqueeze(-1)
        wd = qd[ex].double() * sd[ex].double().unsqueeze(-1)
        gt = wg @ x[r].double()
        a = F.silu(gt[:i]) * gt[i:] * rw[r].double()
        ref = wd @ a
        num += ((out[r].double() - ref) ** 2).sum().item()
        den += (ref ** 2).sum().item()
    return time_ms(ffn, iters), (num / den) ** 0.5, bool(torch.isfinite(out).all().item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shape", default="7168:2048:32")
    ap.add_argument("--tpe", default="8,16,32,64,512,2048")
    ap.add_argument("--out", default="expert_ffn_fp8.json")
    a = ap.parse_args()
    h, i, e = map(int, a.shape.split(":"))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    cmd = [a.binary, "--iters", str(a.iters), "--configs", f"{a.shape}:fp8,{a.shape}", "--tpe", a.tpe]
    # FP8 compute is opt-in in the worker (docs/kernels.md).
    env = dict(os.environ, MOE_FP8_COMPUTE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    ours = []
    for line in proc.stdout:
        if line.startswith("{"):
            ours.append(json.loads(line))
            o = ours[-1]
            print(f"ours {o['mode']} tpe {o['tpe']}: {o['ms']:.3f} ms rel {o['rel_err']}", flush=True)
    if proc.wait() != 0:
        print(f"bench_ffn exited with {proc.returncode}", file=sys.stderr)
    fp8 = {o["tpe"]: o for o in ours if o["mode"] == "Fp8"}
    bf16 = {o["tpe"]: o for o in ours if o["mode"] == "Auto"}
    rows = []
    for tpe, o in sorted(fp8.items()):
        counts = o["counts"]
        peer = {}
        for fast in (False, True):
            try:
                peer[fast] = torch_fp8(h, i, e, counts, a.iters, fast)
            except Exception as ex:  # record, do not hide, a peer that refuses the shape
                peer[fast] = (float("nan"), float("nan"), False)
                print(f"torch._scaled_grouped_mm fast_accum={fast} tpe {tpe}: {type(ex).__name__}: {ex}", flush=True)
        fast = min(peer, key=lambda f: peer[f][0] if peer[f][0] == peer[f][0] else float("inf"))
        t_ms, t_rel, t_fin = peer[fast]
        total = o["tokens"]
        flops = 6.0 * total * h * i
        b = bf16.get(tpe, {}).get("ms", float("nan"))
        rows.append(dict(tpe=tpe, tokens=total, ours_fp8_ms=o["ms"], ours_fp8_rel_err=o["rel_err"],
                         ours_bf16_ms=b, ours_bf16_rel_err=bf16.get(tpe, {}).get("rel_err"),
                         torch_fp8_ms=t_ms, torch_fp8_fast_accum=fast, torch_fp8_rel_err=t_rel, torch_finite=t_fin,
                         torch_fp8_ms_both={str(k): v[0] for k, v in peer.items()},
                         x_torch=t_ms / o["ms"], x_own_bf16=b / o["ms"],
                         ours_fp8_tflops=flops / (o["ms"] * 1e-3) / 1e12,
                         ours_fp8_tbps=o["tbps"], counts=counts))
        print(json.dumps(rows[-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=[h, i, e], rows=rows, raw=ours),
                  f, indent=1)
    print(f"\nH {h}, I {i}, {e} experts")
    print("| tok/exp | tokens | ours FP8 ms | ours bf16 ms | torch._scaled_grouped_mm ms | x torch | x own bf16 "
          "| ours FP8 TFLOP/s | ours FP8 TB/s | rel err ours FP8 / torch FP8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tpe']} | {r['tokens']} | {r['ours_fp8_ms']:.3f} | {r['ours_bf16_ms']:.3f} | {r['torch_fp8_ms']:.3f}"
              f"{' (fast accum)' if r['torch_fp8_fast_accum'] else ''} | {r['x_torch']:.2f} | {r['x_own_bf16']:.2f} "
              f"| {r['ours_fp8_tflops']:.0f} | {r['ours_fp8_tbps']:.2f} | {r['ours_fp8_rel_err']:.1e} / {r['torch_fp8_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
