#!/usr/bin/env python3
"""Loads our SGLang expert layouts with SGLang's own loader (issue "6 of 10").

Runs `compute_initial_expert_location_metadata` from SGLang's `sglang/srt/eplb/expert_location.py`
(the pinned release that `scripts/sglang-loader-prepare.sh` extracts, unmodified) on each layout
file, for every EP rank, exactly as an SGLang server started with `--init-expert-location FILE
--ep-num-redundant-experts R --ep-size D` does at start-up. SGLang's process-wide context (its
ServerArgs, parallel state and model registry) is not importable without a server, so the three
accessors the loader reads (`get_exec`, `get_parallel`, `get_device`) and the model class's
`get_model_config_for_expert_location` are provided here with the values those flags and the
model's config.json give; every line of the loader itself is SGLang's.

Each case must load (or, for the cases marked `expect: reject`, be refused by the loader), and the
loaded metadata must hold the file's map, one row per decoder layer, with every logical expert
reachable from every rank. Needs PyTorch (the GPU machine has it); runs on CPU tensors unless
--device cuda.

    python3 benches/gpu/sglang_loader.py --sglang-src .devbin/sglang-0.5.23 --cases .devbin/layouts/cases.json
"""

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path


def ns(**kw):
    return types.SimpleNamespace(**kw)


def install_context(case, device):
    """The modules and accessors SGLang's loader imports, set as the server's flags would."""
    moe = ns(
        ep_num_redundant_experts=case["redundant"],
        ep_join_mode="",
        eplb_algorithm="auto",
        # "static" makes the loader build each rank's dispatch map (and assert it is complete).
        ep_dispatch_algorithm="static",
        # An a2a backend makes it also resolve each rank's nearest replicas.
        moe_a2a_backend="deepep",
        init_expert_location=case["file"],
    )
    parallel = ns(
        ep_size=case["ep_size"],
        nnodes=case.get("nnodes", 1),
        tp_size=case["ep_size"],
        elastic_ep_initial_size=None,
        ep_join_rank_offset=0,
    )
    CURRENT.update(exec=ns(moe=moe), parallel=parallel, device=ns(device=device))


# What the accessors answer; the loader binds the accessors at import, so they read this.
CURRENT = {}


def load_sglang(src):
    for name in ["sglang", "sglang.srt", "sglang.srt.eplb", "sglang.srt.elastic_ep"]:
        m = types.ModuleType(name)
        m.__path__ = []
        sys.modules[name] = m
    ctx = types.ModuleType("sglang.srt.runtime_context")
    ctx.get_exec = lambda: CURRENT["exec"]
    ctx.get_parallel = lambda: CURRENT["parallel"]
    ctx.get_device = lambda: CURRENT["device"]
    ctx.get_resources = lambda: ns(expert_location_metadata=None)
    sys.modules["sglang.srt.runtime_context"] = ctx
    elastic = types.ModuleType("sglang.srt.elastic_ep.elastic_ep")
    elastic.elastic_expanded_world_enabled = lambda: False
    sys.modules["sglang.srt.elastic_ep.elastic_ep"] = elastic
    install_context({"redundant": 0, "ep_size": 1, "file": ""}, "cpu")
    path = Path(src) / "expert_location.py"
    spec = importlib.util.spec_from_file_location("sglang.srt.eplb.expert_location", path)
    el = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = el
    spec.loader.exec_module(el)

    # The model registry: the model class's own answer (Qwen3MoeForCausalLM and
    # DeepseekV2ForCausalLM in the pinned release return exactly these fields).
    loader = types.ModuleType("sglang.srt.model_loader")

    def get_model_architecture(model_config):
        hf = model_config.hf_config

        class Model:
            @staticmethod
            def get_model_config_for_expert_location(config):
                return el.ModelConfigForExpertLocation(
                    num_layers=config["num_hidden_layers"],
                    num_logical_experts=config["experts"],
                    num_groups=config.get("n_group"),
                )

        return Model, hf["architecture"]

    loader.get_model_architecture = get_model_architecture
    sys.modules["sglang.srt.model_loader"] = loader
    return el


def check_case(el, case, device):
    import torch

    install_context(case, device)
    model_config = ns(hf_config=case["model"])
    data = json.loads(Path(case["file"]).read_text())
    want = torch.tensor(data["physical_to_logical_map"])
    layers = case["model"]["num_hidden_layers"]
    experts = case["model"]["experts"]
    for rank in range(case["ep_size"]):
        md = el.compute_initial_expert_location_metadata(model_config, moe_ep_rank=rank)
        assert md is not None, "the loader returned no metadata"
        got = md.physical_to_logical_map_cpu
        assert got.shape == want.shape, f"rank {rank}: map {tuple(got.shape)} != file {tuple(want.shape)}"
        assert torch.equal(got.cpu(), want), f"rank {rank}: the loaded map differs from the file"
        assert md.num_layers == layers, f"rank {rank}: {md.num_layers} layers, model has {layers}"
        assert md.num_logical_experts == experts, f"rank {rank}: {md.num_logical_experts} logical experts"
        assert md.num_physical_experts == experts + case["redundant"]
        assert md.num_local_physical_experts * case["ep_size"] == md.num_physical_experts
        valid = md.logical_to_all_physical_map_num_valid.cpu()
        assert bool((valid >= 1).all()), f"rank {rank}: a logical expert has no physical slot"
        d = md.logical_to_rank_dispatch_physical_map.cpu()
        assert d.shape == (layers, experts) and bool((d >= 0).all())
        # The physical slot the rank dispatches to hosts the logical expert it was asked for.
        back = torch.gather(want, 1, d.long())
        assert torch.equal(back, torch.arange(experts).expand(layers, -1)), f"rank {rank}: dispatch map wrong"
    return f"loaded on all {case['ep_size']} ranks: {layers} layers x {experts + case['redundant']} physical experts"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sglang-src", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    el = load_sglang(a.sglang_src)
    cases = json.loads(Path(a.cases).read_text())
    base = Path(a.cases).parent
    failed = 0
    for case in cases:
        case["file"] = str(base / case["file"])
        expect = case.get("expect", "load")
        try:
            msg = check_case(el, case, a.device)
            ok = expect == "load"
        except Exception as e:  # the loader's refusal is an AssertionError or a torch error
            msg = f"refused: {type(e).__name__}: {e}"
            ok = expect == "reject"
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case['name']} (expect {expect}): {msg}")
    print(f"{len(cases) - failed} of {len(cases)} cases as expected")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
