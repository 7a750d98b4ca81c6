#!/usr/bin/env bash
# Every GPU-side check of the speed work, in one go: the CUDA tests, each bench variant, the GroupNorm
# micro-benchmark, then a short table. Each part runs under `timeout`; the whole stays inside a budget (default
# 570 s, an H100 command's 10 minutes less a margin); all results go to one folder, in five files (a device
# call brings back at most 8): env.txt, parts.txt (part, status, seconds), logs.txt (every part's output, appended
# as it ends), results.json (every bench JSON by part name, rewritten as each ends) and summary.md (the table,
# also printed last).
#
#   tools/gpu_check.sh [OUT_DIR]          # OUT_DIR, else $OUT, else ./gpu_check_out
#   PARTS="tests bench" tools/gpu_check.sh ...   # only some parts (default: all but levers, in the order below)
#   BUDGET=600 tools/gpu_check.sh ...            # seconds for all parts together
#
# Parts: tests (tests/test_graph.py, tests/test_levers.py, tests/test_bench.py but its slow CPU run), norm
# (tools/bench_norm.py), bench (defaults: channels_last on CUDA; with the diffusers baseline (c) when diffusers
# imports; --profile 3, text encoders and VAE graphed), nchw (--no-channels-last), gn (--nhwc-groupnorm), geglu
# (--split-geglu), levers (both; not in the default list), batch4 (--batch 4), compile ((c) and (d):
# --compile-baseline; last, with what is left of the budget). On a CPU the same parts run the tiny configuration
# (the bench's CPU defaults). Wheels in .whl/ (diffusers, for a machine without it) go to /tmp/site first.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
budget=${BUDGET:-570}
parts=${PARTS:-"tests norm bench nchw gn geglu batch4 compile"}
work=$(mktemp -d)  # per-part logs and JSONs; merged into $out as each part ends
start=$SECONDS
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
py=python3
command -v $py >/dev/null || py=python

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    $py -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
    git log -1 --format='commit %H %s' 2>/dev/null
    git status --short 2>/dev/null | head -20
} > "$out/env.txt" 2>&1
if $py -c "import diffusers" 2>/dev/null; then baseline=(); else baseline=(--skip-baseline); fi
if $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then cuda=1; runs=(--runs 1); else
    cuda=0; runs=(); fi
: > "$out/parts.txt"
: > "$out/logs.txt"

merge() {  # every part's JSON so far -> results.json, keyed by part name
    $py - "$work" "$out/results.json" <<'EOF'
import json, sys
from pathlib import Path
work, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}, indent=1) + "\n")
EOF
}

# part NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of the budget), log to NAME.log
part() {
    local name=$1 limit=$2 left=$((budget - (SECONDS - start))) t0=$SECONDS rc
    shift 2
    case " $parts " in *" $name "*) ;; *) return ;; esac
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name skipped 0 (budget spent)" >> "$out/parts.txt"
        return
    fi
    echo "== $name (limit ${limit} s): $*" >&2
    timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    local status=ok
    [ $rc -ne 0 ] && status="failed(rc=$rc)"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed-out"
    echo "$name $status $((SECONDS - t0))" >> "$out/parts.txt"
    { echo "===== $name: $status, $((SECONDS - t0)) s: $*"; cat "$work/$name.log"; echo; } >> "$out/logs.txt"
    merge
    tail -3 "$work/$name.log" >&2
}

bench=($py tools/bench.py --quiet)
part tests 150 $py -m pytest -q -x tests/test_graph.py tests/test_levers.py tests/test_bench.py -k "not runs_and"
part norm 40 $py tools/bench_norm.py --json "$work/norm.json"
part bench 150 "${bench[@]}" "${baseline[@]}" "${runs[@]}" --profile 3 --graph-text --graph-vae \
    --json "$work/bench.json"
part nchw 70 "${bench[@]}" --skip-baseline "${runs[@]}" --no-channels-last --json "$work/nchw.json"
part gn 70 "${bench[@]}" --skip-baseline "${runs[@]}" --nhwc-groupnorm --profile 3 --json "$work/gn.json"
part geglu 70 "${bench[@]}" --skip-baseline "${runs[@]}" --split-geglu --json "$work/geglu.json"
part levers 70 "${bench[@]}" --skip-baseline "${runs[@]}" --nhwc-groupnorm --split-geglu --json "$work/levers.json"
part batch4 80 "${bench[@]}" --skip-baseline "${runs[@]}" --batch 4 --timed-steps 10 --json "$work/batch4.json"
if [ ${#baseline[@]} -eq 0 ]; then
    part compile 600 "${bench[@]}" "${runs[@]}" --compile-baseline --timed-steps 10 --json "$work/compile.json"
else
    echo "compile skipped 0 (no diffusers: carry its wheel, see docs/benchmarks.md)" >> "$out/parts.txt"
fi

$py - "$out" > "$out/summary.md" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
print("| part | status | s |\n|---|---|---|")
for line in (out / "parts.txt").read_text().splitlines():
    name, status, secs = (line.split(" ", 2) + ["", ""])[:3]
    print(f"| {name} | {status} | {secs} |")
def f(v, d=3):
    return "—" if v is None else f"{v:.{d}g}"
print("\n| run | fused a / b / c / d (ms) | single b (ms) | text a / b (ms) | VAE a / b (ms) | e2e b (s) | "
      "peak b (GiB) | (d) compile (s) |\n|---|---|---|---|---|---|---|---|")
for name in ("bench", "nchw", "gn", "geglu", "levers", "batch4", "compile"):
    if name not in results:
        continue
    r = results[name]
    fs, ss, t, v, e = r["fused_step_ms"], r["single_step_ms"], r["text_ms"], r["vae_ms"], r["e2e_s"]
    peak = (r["peak_gib"] or {}).get("b")
    comp = r.get("compile_s") or {}
    print(f"| {name} (batch {r['env']['batch']}) | {' / '.join(f(fs.get(k)) for k in 'abcd')} | {f(ss['b'])} | "
          f"{f(t['a'])} / {f(t['b'])} | {f(v['a'])} / {f(v['b'])} | {f(e['b'])} | {f(peak)} | {f(comp.get('fused'))} |")
if "norm" in results:
    n = results["norm"]["ms_per_fused_step"]
    print(f"\nGroupNorm+SiLU per fused step (ms): native on channels_last {n['native_cl']:.3f}, native on NCHW "
          f"{n['native_nchw']:.3f}, nhwc lever {n['nhwc']:.3f}")
EOF
echo
cat "$out/summary.md"
rm -rf "$work"
echo "(all outputs in $out; total $((SECONDS - start)) s)"
