"""Summarise a demo run (scripts/demo.sh): print the before/after figures and write report.html,
a self-contained page with the numbers and the planner's before/after heatmaps (SVG, plotters)."""
import html
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
gens = []
for g in (0, 1):
    rep = json.loads((out / f"loadgen-{g}.json").read_text())
    plan = json.loads((out / f"plan-{g}.json").read_text())
    gens.append((g, rep, plan))

rows = []
print(f"{'gen':>3} {'plan':>12} {'algorithm':>10} {'R':>3} {'balancedness':>13} {'tokens/s':>10} {'p50 step ms':>12} {'failed':>7}")
for g, rep, plan in gens:
    p50 = rep["stepSeconds"]["p50"] * 1e3
    print(f"{g:>3} {plan['hash'][:12]:>12} {plan['algorithm']:>10} {plan['replicasPerGpu']:>3} "
          f"{rep['balancedness']:>13.4f} {rep['tokensPerSecond']:>10.0f} {p50:>12.2f} {rep['failedRequests']:>7}")
    rows.append(f"<tr><td>{g}</td><td><code>{plan['hash'][:12]}</code></td><td>{plan['algorithm']}</td>"
                f"<td>{plan['replicasPerGpu']}</td><td>{rep['balancedness']:.4f}</td>"
                f"<td>{rep['tokensPerSecond']:.0f}</td><td>{p50:.2f}</td><td>{rep['failedRequests']}</td></tr>")
b0, b1 = gens[0][1]["balancedness"], gens[1][1]["balancedness"]
t0, t1 = gens[0][1]["tokensPerSecond"], gens[1][1]["tokensPerSecond"]
verdict = f"balancedness {b0:.3f} -> {b1:.3f}, tokens/s {t0:.0f} -> {t1:.0f} ({t1 / t0:.2f}x)"
print(verdict)

def bars(title, values, fmt):
    top = max(v for _, v in values) or 1.0
    parts = [f'<svg width="420" height="{40 + 40 * len(values)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="10" y="20" font-family="sans-serif" font-size="14">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(values):
        y = 35 + 40 * i
        w = 300 * v / top
        parts.append(f'<text x="10" y="{y + 18}" font-family="sans-serif" font-size="12">{label}</text>')
        parts.append(f'<rect x="90" y="{y}" width="{w:.1f}" height="26" fill="#1f77b4"/>')
        parts.append(f'<text x="{95 + w:.1f}" y="{y + 18}" font-family="sans-serif" font-size="12">{fmt(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)

labels = [f"gen {g}" for g, _, _ in gens]
heat = (out / "heatmap.svg").read_text() if (out / "heatmap.svg").exists() else ""
page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moe-operator demo</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>moe-operator local demo</h1>
<p>Real CPU <code>moe-worker</code>s (2 nodes x 2 ranks) serving a synthetic Qwen3-MoE-layout checkpoint; traffic
routed by <code>moectl loadgen</code> from real OLMoE routing counts; load observed from the workers' <code>/metrics</code>;
a CRAFT plan rolled out in place with <code>PUT /v1/plan</code>. {html.escape(verdict)}.</p>
<table><tr><th>generation</th><th>plan</th><th>algorithm</th><th>R</th><th>balancedness</th><th>tokens/s</th><th>p50 layer step ms</th><th>failed requests</th></tr>
{''.join(rows)}</table>
{bars("balancedness (observed by the router)", [(l, r["balancedness"]) for l, (_, r, _) in zip(labels, gens)], lambda v: f"{v:.3f}")}
{bars("throughput (tokens/s)", [(l, r["tokensPerSecond"]) for l, (_, r, _) in zip(labels, gens)], lambda v: f"{v:.0f}")}
<h2>Per-layer x per-GPU load, before and after (relative to each layer's mean)</h2>
{heat}
</body></html>"""
(out / "report.html").write_text(page)
print(f"report: {out / 'report.html'}")
