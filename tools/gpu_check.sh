#!/usr/bin/env bash
# GPU check of raydd: seconds per APM round (fp32 and bf16), a Ray teacher service shared by 4 group
# workers on fractions of the GPU, and one evaluation trial, with peak GPU memory per part.
# Meant for a machine with a CUDA GPU, in the environment raydd is installed in (nothing is
# activated here); it takes about 5 minutes and stops after 10. Arguments go to the script, e.g.
#   tools/gpu_check.sh --out gpu-check.json
#   tools/gpu_check.sh --device cpu --tiny       # the logic only, on any machine (~1 minute)
set -euo pipefail
exec timeout 600 "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
