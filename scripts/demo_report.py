"""The demo's report (scripts/demo.sh): reads OUT/timeline.jsonl (one line per loadgen chunk: the plan it
was routed by, what the router measured, the MoEDeployment status after it) and OUT/plans/HASH.json,
prints a summary per plan generation and writes OUT/report.json and OUT/report.html, a self-contained
page (inline SVG, no external files) with balancedness and throughput over time and per-layer x per-GPU
load heatmaps of the first and the last generation.

    python3 scripts/demo_report.py OUT [--quiet]
    python3 scripts/demo_report.py --check OUT/report.json   # exit 1 unless a later generation is better balanced
"""
import html
import json
import os
import pathlib
import platform
import sys
import time

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def check(report_path):
    """The test suite's assertion: some plan generation after the initial one has a higher measured
    balancedness than the initial one."""
    rep = json.loads(pathlib.Path(report_path).read_text())
    gens = rep["generations"]
    if not gens or gens[0]["generation"] != 0:
        print(f"check failed: {report_path} has no initial generation")
        return 1
    first = gens[0]["balancedness"]
    later = [g for g in gens[1:] if g["balancedness"] > first]
    if not later:
        print(f"check failed: no plan generation after the initial one (balancedness {first:.4f}) is better "
              f"balanced; generations: {[(g['generation'], round(g['balancedness'], 4)) for g in gens]}")
        return 1
    best = max(later, key=lambda g: g["balancedness"])
    print(f"check passed: generation {best['generation']} ({best['algorithm']}) balancedness "
          f"{best['balancedness']:.4f} > initial {first:.4f}")
    return 0


def gpu_loads(plan, expert_rows):
    """Rows per (layer, GPU): each expert's routed rows split over its replicas by the plan's shares,
    which is how the router picks replicas (the expected split; the router's draw is random)."""
    out = []
    for lp, rows in zip(plan["layers"], expert_rows):
        out.append([sum(rows[e] * s for e, s in zip(slots, shares))
                    for slots, shares in zip(lp["slots"], lp["shares"])])
    return out


def summarise(out):
    rows = [json.loads(l) for l in (out / "timeline.jsonl").read_text().splitlines() if l.strip()]
    if not rows:
        raise SystemExit(f"{out}/timeline.jsonl is empty: the demo drove no traffic")
    plans = {}
    for r in rows:
        if r["planHash"] not in plans:
            plans[r["planHash"]] = json.loads((out / "plans" / f"{r['planHash']}.json").read_text())
    gens = []
    for g in sorted({r["generation"] for r in rows}):
        rs = [r for r in rows if r["generation"] == g]
        plan = plans[rs[0]["planHash"]]
        tokens = sum(r["tokens"] for r in rs)
        busy = sum(r["tokens"] / r["tokensPerSecond"] for r in rs if r["tokensPerSecond"] > 0)
        expert_rows = [[sum(r["expertRows"][l][e] for r in rs) for e in range(len(rs[0]["expertRows"][l]))]
                       for l in range(len(rs[0]["expertRows"]))]
        # The status of the first chunk routed by this plan names its predicted balancedness.
        sp = next((r["status"]["plan"] for r in rs if (r["status"].get("plan") or {}).get("hash") == plan["hash"]), {})
        # The operator's replay of this plan on its scraped window, while the plan was in force.
        obs = [r["status"]["observed"]["balancedness"] for r in rs
               if (r["status"].get("plan") or {}).get("hash") == plan["hash"]
               and (r["status"].get("observed") or {}).get("balancedness") is not None]
        gens.append({
            "generation": g, "planHash": plan["hash"], "algorithm": plan["algorithm"],
            "replicasPerGpu": plan["replicasPerGpu"], "replicaBytesPerGpu": plan["replicaBytesPerGpu"],
            "chunks": len(rs), "tokens": tokens, "firstRoutedAt": rs[0]["start"],
            "balancedness": sum(r["balancedness"] for r in rs) / len(rs),
            "tokensPerSecond": tokens / busy if busy else 0.0,
            "stepP50Ms": 1e3 * sorted(r["stepP50"] for r in rs)[len(rs) // 2],
            "failedRequests": sum(r["failedRequests"] for r in rs),
            # Only a plan made from measured load has a meaningful prediction (the initial one is
            # planned on zero load).
            "predictedBalancedness": sp.get("predictedBalancedness") if sp.get("previousBalancedness") is not None else None,
            "operatorBalancedness": sum(obs) / len(obs) if obs else None,
            "previousBalancedness": sp.get("previousBalancedness"),
            "gpuLoads": gpu_loads(plan, expert_rows),
            "layers": [lp["layer"] for lp in plan["layers"]],
        })
    return rows, plans, gens


def line_chart(title, y_label, rows, key, extra=None, y_range=None):
    """SVG line chart of rows[key] against chunk end time, points coloured by plan generation,
    dashed lines where a new generation starts; `extra` = (label, [(t, y)]) drawn in grey."""
    w, h, l, r, t, b = 760, 320, 70, 20, 40, 45
    pts = [(row["end"], row[key], row["generation"]) for row in rows]
    xs = [p[0] for p in pts] + [0.0]
    ys = [p[1] for p in pts] + ([y for _, y in extra[1]] if extra else [])
    x0, x1 = 0.0, max(xs) or 1.0
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.08
    y0, y1 = (y0 - pad, y1 + pad) if not y_range else (y0, y1)
    X = lambda x: l + (w - l - r) * (x - x0) / (x1 - x0)
    Y = lambda y: h - b - (h - t - b) * (y - y0) / (y1 - y0)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="15">{html.escape(title)}</text>',
         f'<line x1="{l}" y1="{h - b}" x2="{w - r}" y2="{h - b}" stroke="black"/>',
         f'<line x1="{l}" y1="{t}" x2="{l}" y2="{h - b}" stroke="black"/>',
         f'<text x="{(l + w - r) / 2}" y="{h - 8}" text-anchor="middle">seconds since traffic started</text>',
         f'<text x="16" y="{(t + h - b) / 2}" text-anchor="middle" transform="rotate(-90 16 {(t + h - b) / 2})">{html.escape(y_label)}</text>']
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        s.append(f'<line x1="{l - 4}" y1="{Y(yv):.1f}" x2="{w - r}" y2="{Y(yv):.1f}" stroke="#eee"/>')
        s.append(f'<text x="{l - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        xv = x0 + (x1 - x0) * i / 5
        s.append(f'<text x="{X(xv):.1f}" y="{h - b + 16}" text-anchor="middle">{xv:.0f}</text>')
    prev = None
    for row in rows:
        if prev is not None and row["generation"] != prev:
            x = X(row["start"])
            s.append(f'<line x1="{x:.1f}" y1="{t}" x2="{x:.1f}" y2="{h - b}" stroke="#888" stroke-dasharray="4 3"/>')
            s.append(f'<text x="{x + 4:.1f}" y="{t + 12}" fill="#555">gen {row["generation"]} rolled out</text>')
        prev = row["generation"]
    if extra and extra[1]:
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in extra[1])
        s.append(f'<polyline points="{path}" fill="none" stroke="#999" stroke-width="1.5" stroke-dasharray="2 2"/>')
        s.append(f'<text x="{w - r - 4}" y="{h - b - 8}" text-anchor="end" fill="#777">dotted: {html.escape(extra[0])}</text>')
    path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y, _ in pts)
    s.append(f'<polyline points="{path}" fill="none" stroke="#444" stroke-width="1"/>')
    for x, y, g in pts:
        s.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="4" fill="{COLOURS[g % len(COLOURS)]}"><title>gen {g}: {y:.4g}</title></circle>')
    s.append("</svg>")
    return "".join(s)


def heat_colour(rel):
    t = max(-1.0, min(1.0, rel - 1.0))
    k = int(255 * (1 - abs(t)))
    return f"rgb(255,{k},{k})" if t >= 0 else f"rgb({k},{k},255)"


def heatmap(title, layers, loads):
    """Rows = MoE layers, columns = GPUs, cells = load / the layer's mean (white = mean, red above,
    blue below), each cell labelled."""
    gpus = len(loads[0]) if loads else 0
    cw, ch, l, t = 52, 34, 70, 46
    w, h = l + cw * gpus + 20, t + ch * len(loads) + 40
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for g in range(gpus):
        s.append(f'<text x="{l + cw * g + cw / 2}" y="{t - 8}" text-anchor="middle">GPU {g}</text>')
    for i, (layer, row) in enumerate(zip(layers, loads)):
        mean = sum(row) / len(row) if row else 0.0
        s.append(f'<text x="{l - 8}" y="{t + ch * i + ch / 2 + 4}" text-anchor="end">layer {layer}</text>')
        for g, v in enumerate(row):
            rel = v / mean if mean else 0.0
            x, y = l + cw * g, t + ch * i
            s.append(f'<rect x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{heat_colour(rel)}" stroke="white"/>')
            s.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle">{rel:.2f}</text>')
    bal = [sum(r) / len(r) / max(r) for r in loads if r and max(r) > 0]
    s.append(f'<text x="{l}" y="{h - 12}">mean/max per layer: {", ".join(f"{b:.3f}" for b in bal)}</text>')
    s.append("</svg>")
    return "".join(s)


def main(argv):
    if argv and argv[0] == "--check":
        return check(argv[1])
    out = pathlib.Path(argv[0])
    quiet = "--quiet" in argv
    rows, plans, gens = summarise(out)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "cpuModel": cpu_model(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    first = gens[0]
    last = gens[-1]
    improved = any(g["balancedness"] > first["balancedness"] for g in gens[1:])
    report = {"generations": [{k: v for k, v in g.items() if k != "gpuLoads"} | {"gpuLoads": g["gpuLoads"]} for g in gens],
              "chunks": len(rows), "improved": improved, "machine": machine,
              "ranks": plans[first["planHash"]]["gpus"], "nodes": plans[first["planHash"]]["nodes"]}
    (out / "report.json").write_text(json.dumps(report, indent=1))

    table = [f"{'gen':>3} {'plan':<13} {'algorithm':<10} {'R':>3} {'chunks':>6} {'balancedness':>13} "
             f"{'predicted':>10} {'operator':>9} {'tokens/s':>9} {'p50 step ms':>12} {'failed':>7}"]
    for g in gens:
        pred = f"{g['predictedBalancedness']:.4f}" if g["predictedBalancedness"] is not None else "-"
        opb = f"{g['operatorBalancedness']:.4f}" if g["operatorBalancedness"] is not None else "-"
        table.append(f"{g['generation']:>3} {g['planHash'][:12]:<13} {g['algorithm']:<10} {g['replicasPerGpu']:>3} "
                     f"{g['chunks']:>6} {g['balancedness']:>13.4f} {pred:>10} {opb:>9} {g['tokensPerSecond']:>9.0f} "
                     f"{g['stepP50Ms']:>12.2f} {g['failedRequests']:>7}")
    if len(gens) > 1:
        verdict = (f"balancedness {first['balancedness']:.3f} -> {last['balancedness']:.3f} (router-measured), "
                   f"tokens/s {first['tokensPerSecond']:.0f} -> {last['tokensPerSecond']:.0f} "
                   f"({last['tokensPerSecond'] / first['tokensPerSecond']:.2f}x)")
    else:
        verdict = f"only the initial plan ran (balancedness {first['balancedness']:.3f}): no new plan was rolled out"
    ranks = report["ranks"]
    honest = (f"The {ranks} expert-parallel ranks are emulated by CPU workers that share this machine's "
              f"{machine['cpus']} CPU cores, so tokens/s here follow the total compute and whatever else runs on "
              f"the machine, not the slowest rank: read no throughput gain or loss from balance into them. With a "
              f"GPU per rank, the layer step waits for the most loaded rank, which is what balancedness measures.")
    if not quiet:
        print("\n".join(table))
        print(verdict)
        print(honest)

    obs = [(r["end"], r["status"]["observed"]["balancedness"]) for r in rows
           if (r["status"].get("observed") or {}).get("balancedness") is not None]
    bal_chart = line_chart("Balancedness per loadgen chunk (router-measured)", "balancedness (mean/max rows per GPU)",
                           rows, "balancedness", ("operator's status.observed.balancedness", obs), (0.0, 1.0))
    tps_chart = line_chart("Throughput per loadgen chunk", "tokens/s", rows, "tokensPerSecond")
    heat = heatmap(f"before: generation 0 ({first['algorithm']}, R={first['replicasPerGpu']})", first["layers"], first["gpuLoads"])
    if len(gens) > 1:
        heat += " " + heatmap(f"after: generation {last['generation']} ({last['algorithm']}, R={last['replicasPerGpu']})",
                              last["layers"], last["gpuLoads"])
    legend = " ".join(f'<span style="color:{COLOURS[g["generation"] % len(COLOURS)]}">&#9679;</span> gen {g["generation"]} '
                      f'(<code>{g["planHash"][:12]}</code>, {g["algorithm"]})' for g in gens)
    trs = "".join(
        f"<tr><td>{g['generation']}</td><td><code>{g['planHash'][:12]}</code></td><td>{g['algorithm']}</td>"
        f"<td>{g['replicasPerGpu']}</td><td>{g['replicaBytesPerGpu'] / 2**20:.2f}</td><td>{g['firstRoutedAt']:.0f}</td>"
        f"<td>{g['chunks']}</td><td>{g['balancedness']:.4f}</td>"
        f"<td>{'-' if g['predictedBalancedness'] is None else '%.4f' % g['predictedBalancedness']}</td>"
        f"<td>{'-' if g['operatorBalancedness'] is None else '%.4f' % g['operatorBalancedness']}</td>"
        f"<td>{g['tokensPerSecond']:.0f}</td><td>{g['stepP50Ms']:.2f}</td><td>{g['failedRequests']}</td></tr>"
        for g in gens)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moe-operator demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}}
svg{{margin:8px 8px 8px 0}}</style></head><body>
<h1>moe-operator local demo</h1>
<p>The operator, installed with its Helm chart on the local control plane, runs a <code>MoEDeployment</code>
(<code>examples/demo.yaml</code>: {report['nodes']} worker pods x {ranks // report['nodes']} ranks = {ranks} expert-parallel ranks,
{len(first['layers'])} MoE layers x {plans[first['planHash']]['model']['experts']} experts, top-{plans[first['planHash']]['model']['topK']})
whose worker pods are real <code>moe-worker</code> processes on CPU serving a synthetic checkpoint. <code>moectl loadgen</code>
routes skewed traffic drawn from the real OLMoE-1B-7B arxiv routing counts, by the plan every worker confirms.
The operator scrapes the workers' <code>/metrics</code>, plans with CRAFT from what it observed, and rolls the plan
out in place (<code>PUT /v1/plan</code>, one worker at a time). <b>{html.escape(verdict)}</b>.</p>
<p>{html.escape(honest)}</p>
<table><tr><th>gen</th><th>plan</th><th>algorithm</th><th>R</th><th>replica MiB/GPU</th><th>routed from (s)</th><th>chunks</th>
<th>balancedness</th><th>predicted at planning</th><th>operator's replay</th><th>tokens/s</th><th>p50 layer step ms</th><th>failed requests</th></tr>{trs}</table>
<p>balancedness: mean over layers and batches of mean/max rows per GPU, as the router sent them.
Predicted at planning: the new plan's balancedness on the load window the operator planned it from.
Operator's replay: <code>status.observed.balancedness</code>, the plan in force replayed on the operator's scraped
window (mean over the chunks routed by it).</p>
<p>{legend}</p>
{bal_chart}
{tps_chart}
<h2>Per-layer x per-GPU load, before and after</h2>
<p>Each expert's routed rows of the generation split over its replicas by the plan's token shares (how the router picks
replicas), divided by the layer's mean: 1.00 is perfectly even, red is above the mean, blue below.</p>
{heat}
<p style="color:#777">{html.escape(machine['cpuModel'])}, {machine['cpus']} CPUs, {html.escape(machine['platform'])}; written {machine['date']}.</p>
</body></html>"""
    (out / "report.html").write_text(page)
    if not quiet:
        print(f"report: {out / 'report.html'} (data: {out / 'report.json'})")
    return 0


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
