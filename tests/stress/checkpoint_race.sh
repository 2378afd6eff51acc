#!/usr/bin/env bash
# Two trainings saving to one --save-checkpoint path at once, N times (tests/cli.rs runs it once): each time the file
# holds exactly one run's weights, the one whose log names that path with the file's sha256, and the other run's
# weights sit beside it under its own log's word. Usage: tests/stress/checkpoint_race.sh [N] (default 10; ~10 s a
# round on 2 cores). Needs `cargo build --release` and `train_gpt prepare data/tiny --out DIR` shards in $DATA.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10}
BIN=target/release/train_gpt
DATA=${DATA:-data/tokens/tiny}
[ -d "$DATA" ] || "$BIN" prepare data/tiny --out "$DATA" >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in $(seq 1 "$N"); do
    dir="$work/$i"
    mkdir -p "$dir"
    for seed in 1 2; do
        "$BIN" train --data "$DATA" --log-dir "$dir" --device cpu --n-layer 1 --n-head 2 --n-embd 32 --seq-len 32 \
            --batch-size 4 --steps 4 --val-every 4 --val-tokens 512 --warmup-steps 2 --lr-adam 0.1 --sample-tokens 0 \
            --seed "$seed" --save-checkpoint "$dir/m.safetensors" >"$dir/out$seed" 2>&1 &
    done
    wait
    owners=0
    for seed in 1 2; do
        line=$(grep '^checkpoint: ' "$dir/out$seed") || {
            echo "round $i: run $seed failed: $(cat "$dir/out$seed")"
            exit 1
        }
        path=${line#checkpoint: }
        path=${path% sha256:*}
        want=${line##*sha256:}
        have=$(sha256sum "$path" | cut -d' ' -f1)
        [ "$have" = "$want" ] || { echo "round $i: $path does not hold run $seed's weights"; exit 1; }
        [ "$path" = "$dir/m.safetensors" ] && owners=$((owners + 1))
    done
    [ "$owners" = 1 ] || { echo "round $i: $owners runs claim $dir/m.safetensors"; exit 1; }
    ! ls "$dir" | grep -q partial || { echo "round $i: a .partial was left: $(ls "$dir")"; exit 1; }
done
echo "checkpoint race: $N rounds, each file one run's weights"
