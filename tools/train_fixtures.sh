#!/usr/bin/env bash
# Train both fixture models on one GPU at once (tools/train_fixture.py), then score each saved fp16
# checkpoint with `ssmq eval ppl` on WikiText-2 test and Pile validation documents 0-63.
#   tools/train_fixtures.sh DATA_DIR TOKENIZER OUT_DIR
# DATA_DIR holds the shared data files; OUT_DIR gets tiny-mamba1/, tiny-mamba2/, evals.json and run.log.
set -u
data=$1 tok=$2 out=$3
mkdir -p "$out"
job() {
  local dir=$out/tiny-$1
  python3 tools/train_fixture.py --arch "$1" --data "$data" --tokenizer "$tok" --steps 400 --eval-every 25 --seed 0 \
    --out "$dir" > "$out/$1.log" 2>&1 || return
  python3 -m ssmq eval ppl "$dir" --data "$data/wikitext-2-raw-test.txt" --batch-size 16 --device cuda --json > "$out/$1.evals"
  python3 -m ssmq eval ppl "$dir" --data "$data/pile-val-512.jsonl" --docs 0-63 --batch-size 16 --device cuda --json >> "$out/$1.evals"
}
job mamba1 & job mamba2 & wait
cat "$out"/mamba1.evals "$out"/mamba2.evals > "$out/evals.json" && cat "$out"/mamba1.log "$out"/mamba2.log > "$out/run.log"
rm -f "$out"/mamba?.evals "$out"/mamba?.log
grep -h "^saved" "$out/run.log"; grep -h '"ppl"' "$out/evals.json"
