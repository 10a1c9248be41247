#!/usr/bin/env bash
# Prepares the SGLang loader check (issue "6 of 10", benches/gpu/sglang_loader.py) on this machine,
# for the GPU machine (which has PyTorch but reaches no network):
#   1. SGLang's loader, `sglang/srt/eplb/expert_location.py`, from the pinned release's wheel on PyPI
#      (version and sha256 below), unmodified;
#   2. our layouts (`moectl plan --emit sglang`) of several policies and shapes, and two broken
#      copies the loader must refuse, with cases.json describing how SGLang would be started.
# Usage: scripts/sglang-loader-prepare.sh [OUT_DIR (default .devbin)] ; MOECTL=path/to/moectl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.devbin}
M=${MOECTL:-target/debug/moectl}
VERSION=0.5.23
WHEEL=sglang-$VERSION-cp311-cp311-manylinux_2_34_x86_64.whl
SHA256=00b3cd5b265ac76c64185fbb6b95424f324ddd9f428d0306b77bc9db9d859937

SRC="$OUT/sglang-$VERSION"
L="$OUT/layouts"
mkdir -p "$SRC" "$L"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_34_x86_64 "sglang==$VERSION" -d "$tmp"
echo "$SHA256  $tmp/$WHEEL" | sha256sum -c -
python3 - "$tmp/$WHEEL" "$SRC" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
open(f"{sys.argv[2]}/expert_location.py", "wb").write(z.read("sglang/srt/eplb/expert_location.py"))
EOF

# Qwen3-30B-A3B: 48 layers, all MoE, 128 experts, on 32 GPUs of 4 nodes.
"$M" bench trace --layers 48 --experts 128 --top-k 8 --seed 1 --out "$tmp/q.trace.json" >/dev/null
# DeepSeek-V3: 61 layers, MoE from layer 3, 256 experts in 8 groups, on 64 GPUs of 8 nodes.
"$M" bench trace --layers 58 --experts 256 --top-k 8 --seed 2 --out "$tmp/d.trace.json" >/dev/null
python3 - "$tmp/d.trace.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["layers"] = [l + 3 for l in d["layers"]]
json.dump(d, open(sys.argv[1], "w"))
EOF
Q=(--layers 48 --top-k 8 --hidden-size 2048 --intermediate-size 768 --gpus 32 --nodes 4)
D=(--layers 61 --first-moe-layer 3 --top-k 8 --hidden-size 7168 --intermediate-size 2048 --gpus 64 --nodes 8)
cases=()
emit() { # name trace algo R shape...
    local name=$1 trace=$2 algo=$3 r=$4
    shift 4
    "$M" plan --load "$trace" --algo "$algo" --replicas-per-gpu "$r" "$@" --out "$tmp/$name.plan.json" \
        --emit sglang --emit-out "$L/$name.json" >"$tmp/$name.log" 2>&1 || {
        cat "$tmp/$name.log"
        exit 1
    }
    grep -o 'ep-num-redundant-experts [0-9]*' "$tmp/$name.log" | awk '{print $2}'
}
add() { cases+=("$1"); }
r=$(emit qwen3-none "$tmp/q.trace.json" none 0 "${Q[@]}")
add "{\"name\":\"qwen3-none\",\"file\":\"qwen3-none.json\",\"redundant\":$r,\"ep_size\":32,\"nnodes\":4,\"model\":{\"architecture\":\"Qwen3MoeForCausalLM\",\"num_hidden_layers\":48,\"experts\":128}}"
for p in "eplb 48" "craft 8" "craft 16"; do
    set -- $p
    r=$(emit "qwen3-$1-$2" "$tmp/q.trace.json" "$1" "$2" "${Q[@]}")
    add "{\"name\":\"qwen3-$1-$2\",\"file\":\"qwen3-$1-$2.json\",\"redundant\":$r,\"ep_size\":32,\"nnodes\":4,\"model\":{\"architecture\":\"Qwen3MoeForCausalLM\",\"num_hidden_layers\":48,\"experts\":128}}"
done
for p in "eplb 58" "craft 8"; do
    set -- $p
    r=$(emit "deepseek-$1-$2" "$tmp/d.trace.json" "$1" "$2" "${D[@]}")
    add "{\"name\":\"deepseek-$1-$2\",\"file\":\"deepseek-$1-$2.json\",\"redundant\":$r,\"ep_size\":64,\"nnodes\":8,\"model\":{\"architecture\":\"DeepseekV3ForCausalLM\",\"num_hidden_layers\":61,\"experts\":256,\"n_group\":8}}"
done
# Broken copies of qwen3-craft-8 that SGLang's loader itself must refuse.
r8=$(emit qwen3-craft-8 "$tmp/q.trace.json" craft 8 "${Q[@]}")
python3 - "$L" <<'EOF'
import json, sys
d = sys.argv[1]
m = json.load(open(f"{d}/qwen3-craft-8.json"))
bad = json.loads(json.dumps(m)); bad["physical_to_logical_map"][5][0] = 128  # no such expert
json.dump(bad, open(f"{d}/bad-expert-id.json", "w"))
bad = json.loads(json.dumps(m)); row = bad["physical_to_logical_map"][7]
row[:] = [1 if x == 0 else x for x in row]  # expert 0 has no slot in layer 7
json.dump(bad, open(f"{d}/bad-missing-expert.json", "w"))
EOF
for b in bad-expert-id bad-missing-expert; do
    add "{\"name\":\"$b\",\"file\":\"$b.json\",\"expect\":\"reject\",\"redundant\":$r8,\"ep_size\":32,\"nnodes\":4,\"model\":{\"architecture\":\"Qwen3MoeForCausalLM\",\"num_hidden_layers\":48,\"experts\":128}}"
done
(IFS=,; echo "[${cases[*]}]") | python3 -m json.tool >"$L/cases.json"
echo "SGLang $VERSION loader in $SRC; $(ls "$L" | wc -l) files in $L"
