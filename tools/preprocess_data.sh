#!/usr/bin/env bash
# jsonl / jsonl.zst / txt -> megatron-core indexed dataset (OUTPUT_PREFIX_{JSON_KEY}_document.bin/.idx,
# or _sentence with --split-sentences), tokenized as Megatron-LM's tools/preprocess_data.py does.
#
# Flag / Environment variable (a flag wins over its variable). Other arguments are passed
# to the preprocessor (see the options below).
#   --input          INPUT            input files, space-separated; globs allowed, quoted (.jsonl .json .txt,
#                                     optionally .zst)                                                [required]
#   --tokenizer      TOKENIZER        SentencePiece .model file or HF tokenizer directory             [required]
#   --output-prefix  OUTPUT_PREFIX    output path prefix                                              [required]
#   --json-key       JSON_KEY         JSON key holding the document text                              [text]
#   --workers        WORKERS          tokenizer processes                                             [$(nproc)]
#   --[no-]split-sentences  SPLIT_SENTENCES=1|0   one sequence per sentence (NLTK punkt_tab, see NLTK_DATA)  [0]
#   --[no-]append-eod       APPEND_EOD=1|0        append the EOS token to every document                     [1]
#                    NLTK_DATA        folder holding tokenizers/punkt_tab (only with --split-sentences) [nltk's]
#                    PYTHON           Python interpreter                 [the repository's .venv, else python3]
#
# Examples: bash tools/preprocess_data.sh --input 'data/pile/*.jsonl.zst' \
#             --tokenizer llama-2-7b/tokenizer.model --output-prefix data/pile --overwrite
#           INPUT='data/pile/*.jsonl.zst' TOKENIZER=llama-2-7b/tokenizer.model OUTPUT_PREFIX=data/pile \
#             bash tools/preprocess_data.sh --overwrite
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../scripts/lib/env.sh"
mp_help "$0" "-m megatron_prune preprocess" "$@"
mp_list --input INPUT
mp_flag --tokenizer TOKENIZER
mp_flag --output-prefix OUTPUT_PREFIX
mp_flag --json-key JSON_KEY
mp_flag --workers WORKERS
mp_switch split-sentences SPLIT_SENTENCES
mp_switch append-eod APPEND_EOD 1
mp_vars NLTK_DATA
mp_check_env
exec "$PYTHON" -m megatron_prune preprocess ${MP_FLAGS[@]+"${MP_FLAGS[@]}"} "$@"
