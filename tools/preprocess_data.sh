#!/usr/bin/env bash
# jsonl / jsonl.zst / txt -> megatron-core indexed dataset (OUTPUT_PREFIX_{JSON_KEY}_document.bin/.idx,
# or _sentence with SPLIT_SENTENCES=1), tokenized as Megatron-LM's tools/preprocess_data.py does.
#
# Environment (defaults in brackets); extra arguments are passed to the preprocessor:
#   INPUT            input files, space-separated; globs allowed (.jsonl .json .txt, optionally .zst)  [required]
#   TOKENIZER        SentencePiece .model file or HF tokenizer directory                               [required]
#   OUTPUT_PREFIX    output path prefix                                                                [required]
#   JSON_KEY         JSON key holding the document text                                                [text]
#   WORKERS          tokenizer processes                                                               [$(nproc)]
#   SPLIT_SENTENCES  1: one sequence per sentence (needs NLTK punkt_tab data, see NLTK_DATA)           [0]
#   APPEND_EOD       1: append the EOS token to every document                                         [1]
#   NLTK_DATA        folder holding tokenizers/punkt_tab (only with SPLIT_SENTENCES=1)                  [nltk's defaults]
#   PYTHON           Python interpreter                                                                [python3]
#
# Example: INPUT='data/pile/*.jsonl.zst' TOKENIZER=llama-2-7b/tokenizer.model OUTPUT_PREFIX=data/pile \
#          bash tools/preprocess_data.sh --overwrite
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exec "$PYTHON" -m megatron_prune preprocess --help
fi
: "${INPUT:?set INPUT to the input file(s) (see --help)}"
: "${TOKENIZER:?set TOKENIZER to a SentencePiece .model file or an HF tokenizer directory (see --help)}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX to the output path prefix (see --help)}"
read -r -a inputs <<< "$INPUT"  # word-split only; the preprocessor expands globs itself
args=(--input "${inputs[@]}" --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT_PREFIX"
      --json-key "${JSON_KEY:-text}" --workers "${WORKERS:-$(nproc)}")
[[ "${SPLIT_SENTENCES:-0}" == 1 ]] && args+=(--split-sentences)
[[ "${APPEND_EOD:-1}" == 1 ]] && args+=(--append-eod)
exec "$PYTHON" -m megatron_prune preprocess "${args[@]}" "$@"
