#!/usr/bin/env bash
# The fine-tuning recipes measured on a GPU where OpenAI's weights cannot be downloaded:
# GPT-2 small first continued on Tiny Shakespeare (a model we can train here), then the tutorial's
# `spam` recipe from it and from random weights, and the `instruct` recipe from random GPT-2 medium
# and from the Shakespeare model. Usage: OUT=dir bash bench/gpu_finetune_recipes.sh
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu-recipes}
work=$(mktemp -d)
mkdir -p "$OUT"
python - "$work" <<'PY'
import sys, torch
from glassgpt.model import GPT
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import save_model
torch.manual_seed(123)
for preset in ("gpt2", "gpt2-medium"):
    save_model(GPT.from_preset(preset), f"{sys.argv[1]}/random-{preset}", get_tokenizer("gpt2"))
PY
time python -m glassgpt train --model gpt2 --corpus bundled:tinyshakespeare.txt --tokenizer gpt2 \
    --context-length 256 --batch-size 32 --max-steps 400 --lr 6e-4 --schedule cosine --warmup-steps 40 \
    --grad-clip 1.0 --drop-rate 0.1 --precision bf16 --eval-every 100 --eval-batches 20 --no-progress \
    --out "$work/shakespeare"
python -m glassgpt eval --model "$work/shakespeare" --data bundled:tinyshakespeare.txt --json | tee "$OUT/shakespeare-eval.json"
for start in shakespeare random-gpt2; do
    time python -m glassgpt finetune classify --recipe spam --model "$work/$start" --device cuda --out "$work/spam-$start"
    cp "$work/spam-$start/results.json" "$OUT/spam-$start.json"
done
for start in random-gpt2-medium shakespeare; do
    time python -m glassgpt finetune instruct --recipe instruct --model "$work/$start" --device cuda --no-progress --out "$work/instruct-$start"
    cp "$work/instruct-$start/results.json" "$OUT/instruct-$start.json"
    head -c 3000 "$work/instruct-$start/test_responses.jsonl" > "$OUT/instruct-$start-responses.jsonl"
done
