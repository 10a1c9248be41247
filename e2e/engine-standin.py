#!/usr/bin/env python3
"""A stand-in for a serving engine in engine-mode tests (spec.engine): it starts the way SGLang or
vLLM start on an expert layout, applies the rules their loaders apply to the file, and serves
the engine's HTTP surface that the operator and Prometheus read. It computes nothing.

Written from the engines' loaders, independently of the operator's own checker
(src/plan/engines.rs), so that a test running both catches a rule one of them gets wrong:
- SGLang, `--init-expert-location FILE.json` (sgl-project/sglang,
  python/sglang/srt/eplb/expert_location.py, `ExpertLocationMetadata.init_by_mapping`): the
  file's keys are passed on as keyword arguments, so it holds exactly `physical_to_logical_map`;
  one row per decoder layer (`num_hidden_layers`); every row `num_logical_experts +
  ep_num_redundant_experts` long and that count divisible by the EP size; every logical expert
  present in every layer (its dispatch table has no entry otherwise).
- vLLM, `--eplb-config '{"initial_expert_map_path": FILE, "num_redundant_experts": R}'`
  (vllm-project/vllm PR #49572): a JSON list of one row per MoE layer, or one row for all; the
  same length, divisibility, id range and coverage rules.

A layout the rules refuse ends the process with exit 1 and the reason on stderr, as the engines
refuse to start. Otherwise it serves, on `--host`:`--port`:
- `GET /health`: 200 (the readiness probe);
- `GET /metrics`: vLLM's per-logical-expert gauge
  `vllm:eplb_tokens_routed_to_expert{layer_idx, logical_expert_id}` (EPLBConfig
  `prometheus_expert_load`; MoE layers counted from 0), its values read from `--standin-load`
  (a JSON list of one list of per-expert token counts per MoE layer) at every scrape, and
  `standin_layout_info{sha256, redundant_experts, physical_experts}` naming the layout it loaded.

Model shape flags (the engines read them from the checkpoint's config.json):
`--standin-layers`, `--standin-first-moe-layer`, `--standin-experts`; the EP size is
`--ep-size` (SGLang) or `--standin-ep-size`.
"""

import argparse
import hashlib
import http.server
import json
import sys


class Refused(Exception):
    pass


def check_rows(rows, experts, redundant, ep_size, what):
    """The rules both loaders apply to the rows of one file."""
    if not isinstance(rows, list) or not rows:
        raise Refused(f"{what}: not a non-empty list of rows")
    physical = experts + redundant
    if ep_size <= 0 or physical % ep_size != 0:
        raise Refused(
            f"{what}: {physical} physical experts ({experts} logical + {redundant} redundant) "
            f"do not divide over EP size {ep_size}"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in row
        ):
            raise Refused(f"{what}: row {i} is not a list of integers")
        if len(row) != physical:
            raise Refused(
                f"{what}: row {i} has {len(row)} physical experts, the engine was started for {physical}"
            )
        bad = [x for x in row if x < 0 or x >= experts]
        if bad:
            raise Refused(f"{what}: row {i} has logical ids out of 0..{experts - 1}: {bad[:4]}")
        missing = sorted(set(range(experts)) - set(row))
        if missing:
            raise Refused(f"{what}: row {i} has no physical expert for logical {missing[:4]}")


def load_sglang(path, layers, experts, redundant, ep_size):
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or set(doc) != {"physical_to_logical_map"}:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise Refused(f"{path}: want exactly the key physical_to_logical_map, found {keys}")
    rows = doc["physical_to_logical_map"]
    if not isinstance(rows, list) or len(rows) != layers:
        n = len(rows) if isinstance(rows, list) else "no"
        raise Refused(f"{path}: {n} rows, SGLang wants one per decoder layer ({layers})")
    check_rows(rows, experts, redundant, ep_size, path)
    return rows


def load_vllm(path, moe_layers, experts, redundant, ep_size):
    with open(path) as f:
        rows = json.load(f)
    if isinstance(rows, list) and rows and all(isinstance(x, int) for x in rows):
        rows = [rows] * moe_layers
    if not isinstance(rows, list) or len(rows) != moe_layers:
        n = len(rows) if isinstance(rows, list) else "no"
        raise Refused(f"{path}: {n} rows, vLLM wants one per MoE layer ({moe_layers}) or one for all")
    check_rows(rows, experts, redundant, ep_size, path)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--init-expert-location")
    ap.add_argument("--ep-num-redundant-experts", type=int, default=0)
    ap.add_argument("--ep-size", type=int)
    ap.add_argument("--eplb-config")
    ap.add_argument("--standin-ep-size", type=int)
    ap.add_argument("--standin-layers", type=int, required=True)
    ap.add_argument("--standin-first-moe-layer", type=int, default=0)
    ap.add_argument("--standin-experts", type=int, required=True)
    ap.add_argument("--standin-load")
    ap.add_argument("--check-only", action="store_true", help="check the layout and exit")
    # The engines take many more flags (model, parallelism, multi-node); they do not matter here.
    args, _ = ap.parse_known_args()

    moe_layers = args.standin_layers - args.standin_first_moe_layer
    ep_size = args.ep_size or args.standin_ep_size
    if ep_size is None:
        sys.exit("engine-standin: --ep-size (SGLang) or --standin-ep-size is required")
    try:
        if args.init_expert_location:
            path, redundant = args.init_expert_location, args.ep_num_redundant_experts
            rows = load_sglang(path, args.standin_layers, args.standin_experts, redundant, ep_size)
        elif args.eplb_config:
            try:
                cfg = json.loads(args.eplb_config)
            except json.JSONDecodeError as e:
                raise Refused(f"--eplb-config is not JSON: {e}")
            path = cfg.get("initial_expert_map_path")
            redundant = cfg.get("num_redundant_experts", 0)
            if not path:
                raise Refused("--eplb-config has no initial_expert_map_path")
            if not isinstance(redundant, int):
                raise Refused(f"--eplb-config num_redundant_experts {redundant!r} is not an integer")
            rows = load_vllm(path, moe_layers, args.standin_experts, redundant, ep_size)
        else:
            raise Refused("no layout: give --init-expert-location or --eplb-config")
    except (OSError, json.JSONDecodeError, Refused) as e:
        print(f"engine-standin: refused the layout: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    physical = len(rows[0])
    print(
        f"engine-standin: loaded {path} ({len(rows)} rows of {physical} physical experts, "
        f"{redundant} redundant, EP size {ep_size}, sha256 {digest})",
        flush=True,
    )
    if args.check_only:
        return

    def metrics():
        out = [
            "# HELP standin_layout_info The expert layout this engine started on.",
            "# TYPE standin_layout_info gauge",
            f'standin_layout_info{{sha256="{digest}",redundant_experts="{redundant}",'
            f'physical_experts="{physical}"}} 1',
            "# HELP vllm:eplb_tokens_routed_to_expert Tokens routed to each logical expert per MoE layer for the current engine step.",
            "# TYPE vllm:eplb_tokens_routed_to_expert gauge",
        ]
        if args.standin_load:
            try:
                with open(args.standin_load) as f:
                    load = json.load(f)
            except (OSError, json.JSONDecodeError):
                load = []
            for layer, counts in enumerate(load[:moe_layers]):
                for expert, v in enumerate(counts[: args.standin_experts]):
                    out.append(
                        f'vllm:eplb_tokens_routed_to_expert{{model_name="standin",engine="0",'
                        f'layer_idx="{layer}",logical_expert_id="{expert}"}} {float(v)}'
                    )
        return ("\n".join(out) + "\n").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                body, ctype = b"ok\n", "text/plain"
            elif self.path == "/metrics":
                body, ctype = metrics(), "text/plain; version=0.0.4"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.timeout = 5
    server.serve_forever()


if __name__ == "__main__":
    main()
