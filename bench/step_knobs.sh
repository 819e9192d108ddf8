#!/usr/bin/env bash
# TensorFlow kernel and thread settings against M8's whole training step (64/256/256, fp32),
# each setting REPEATS times, alternating, so that a slow spell of the machine spreads over all.
# On a quiet machine (~90 s per run on 2 cores):
#     bash bench/step_knobs.sh [REPEATS]      # writes results/bench-step-knobs.json
#     bash bench/step_knobs.sh 3 default,fpmath-bf16   # results/bench-step-knobs-fpmath-bf16.json
# A setting must be in the environment before TensorFlow starts, hence one process per run.
set -euo pipefail
cd "$(dirname "$0")"
repeats=${1:-3}
all=default,onednn-off,intra2-inter1,intra2-inter2,fpmath-bf16
configs=${2:-default,onednn-off,intra2-inter1,intra2-inter2}
name=bench-step-knobs
[[ -n ${2:-} ]] && name+=-$(tr , '\n' <<< "$configs" | grep -v '^default$' | paste -sd+)
for cfg in ${configs//,/ }; do   # before any run: a typo fails at once
  [[ ,$all, == *,$cfg,* ]] || { echo "unknown setting '$cfg'; known: $all" >&2; exit 2; }
done
out=$(mktemp -d)
for rep in $(seq "$repeats"); do
  for cfg in ${configs//,/ }; do
    env=(); args=()
    case $cfg in
      default) ;;
      onednn-off) env=(TF_ENABLE_ONEDNN_OPTS=0);;   # TensorFlow's Eigen kernels, not oneDNN's
      intra2-inter1) args=(--threads 2 --inter-threads 1);;
      intra2-inter2) args=(--threads 2 --inter-threads 2);;
      # oneDNN may compute float32 convs and matmuls in bf16 (needs AVX-512 BF16 or AMX).
      fpmath-bf16) env=(ONEDNN_DEFAULT_FPMATH_MODE=BF16);;
    esac
    env "${env[@]}" python step_profile.py --model M8 --settings '{"widths": "64,256,256"}' \
      --step-only --steps 20 --seconds 1.5 "${args[@]}" --out "$out/$cfg-$rep" > "$out/$cfg-$rep.log" 2>&1
  done
done
python - "$out" "$name" <<'PY'
import glob, json, sys
from common import REPO, spread
runs = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/*/bench-step-profile.json")):
    payload = json.load(open(path))
    cfg = path.split("/")[-2].rsplit("-", 1)[0]
    runs.setdefault(cfg, []).append(payload)
summary = {cfg: {"fit_ms_per_step": spread([p["fit_ms_per_step"] for p in ps]),
                 "conv_peak_gflops": spread([p["conv_peak_gflops"] for p in ps]),
                 "environment": ps[0]["environment"], "threads": ps[0]["threads"],
                 "provenance": ps[0]["provenance"]} for cfg, ps in runs.items()}
(REPO / "results" / f"{sys.argv[2]}.json").write_text(json.dumps(summary, indent=1) + "\n")
for cfg, s in summary.items():
    ms = s["fit_ms_per_step"]
    print(f"{cfg}: {ms['median']:.0f} ms/step (min {ms['min']:.0f}, max {ms['max']:.0f}, "
          f"{ms['repeats']} runs)")
PY
