#!/usr/bin/env bash
# One entry point. `./run.sh` sets up (once) and runs the main job: on a CPU box a small model on the
# embedded tiny corpus, on a CUDA box the linux-c speedrun; extra arguments go to `train_gpt train`
# (`./run.sh --steps 30` or `./run.sh run --steps 30`; `train_gpt train --help` lists them).
# `./run.sh test` sets up and runs every CPU test. `./run.sh setup` only installs: a local venv with
# torch==2.11.0 (the libtorch that tch 0.24.0 links), the CUDA headers c10d needs and nvcc, and a release build.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=2.11.0
BIN=target/release/train_gpt

setup() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # torch's CUDA wheels carry the runtime; crt and CCCL add the headers that c10d's NCCL group is compiled against, nvcc
  # builds kernels/*.cu (nvvm pinned to 13.0: pip's newest writes PTX that the 13.0 ptxas rejects)
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" "nvidia-cuda-crt==13.0.88" "cuda-toolkit[nvcc,cccl]==13.0.2" "nvidia-nvvm==13.0.88"
  ln -sfn "$(.venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__))')" .venv/torch
  cargo build --release --quiet
}

case "${1:-run}" in
  setup) setup ;;
  test) setup; shift; cargo test --release "$@" ;;
  run | -*)
    # train options may follow ./run.sh directly: `./run.sh --steps 30` is `./run.sh run --steps 30`
    [ "${1:-}" = run ] && shift
    # RUN_SH_DRY_RUN=1: print the train options and stop, before set-up (tests/cli.rs checks the dispatch so)
    if [ -n "${RUN_SH_DRY_RUN:-}" ]; then echo "train $*"; exit 0; fi
    setup
    if $BIN has-cuda; then src=data/linux-c.jsonl.zst out=data/tokens/linux-c; else src=data/tiny out=data/tokens/tiny; fi
    [ -f "$out/val_000000.bin" ] || $BIN prepare "$src" --out "$out"
    exec $BIN train --data "$out" "$@" ;;
  *) echo "usage: ./run.sh [run] [train options] | test [cargo test args] | setup" >&2; exit 2 ;;
esac
