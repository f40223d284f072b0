#!/usr/bin/env bash
# ./run.sh        set up .venv, then run one quick MNIST experiment (SAM, rho 0.1, ~2 minutes;
#                 outputs in /tmp/sam_eos_demo)
# ./run.sh test   set up .venv, then run the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Install only when requirements.txt changed since the last install.
stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$wanted" > "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

case "${1:-}" in
  test)
    shift
    # Two workers: the suite is mostly XLA compilation, one core each. Work stealing: a worker
    # that runs out of tests takes queued ones from the other, so no core idles at the end.
    exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=15 "$@"
    ;;
  ""|--*)
    # Use pre-downloaded TFDS data beside the project when there is some (offline machines).
    if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/data/tfds/mnist ]; then
      export TFDS_DATA_DIR=$(cd ../shared/data/tfds && pwd)
    fi
    # Full-batch SAM on 2000 images; a check every 100 steps (not by time), so most of the
    # ~2 minutes is training. Outputs go to their own folder (raw.txt, eigs.pdf, ...).
    exec .venv/bin/python -m image_classification --rho=0.1 --step_size=1 \
      --mlp_width=200 --batch_size=2000 --mini_training_set_num_batches=1 \
      --mini_test_set_num_batches=1 --time_limit_in_hours=0.03 \
      --hessian_check_gap=none --hessian_check_every_steps=100 \
      --output_dir="${SAM_EOS_DEMO_DIR:-/tmp/sam_eos_demo}" "$@"
    ;;
  *)
    echo "usage: ./run.sh [--flag=value ...] | ./run.sh test [pytest arguments]" >&2
    exit 2
    ;;
esac
