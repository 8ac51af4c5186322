"""Vocabulary pruning: count token frequencies of a corpus, keep an N-token vocabulary (specials, byte fallbacks,
then the most frequent tokens with the pieces they are merged through), and slice the embedding / output rows of
Megatron (TP/PP) and HF checkpoints to match.

    counts.py           token counts of a corpus (multiprocess), counts.json, the top ids (--keep-min)
    plan.py             the kept ids for a final vocabulary size (--keep)
    tokenizer_files.py  a tokenizer on disk (SentencePiece .model / HF tokenizer.json / both) read into memory
    spm.py              SentencePiece ModelProto surgery (pure)
    hf_tokenizer.py     tokenizer.json surgery (pure)
    slice.py            the old -> new id map and state-dict slicing (pure)
    run.py              file drivers (validate first, atomic output)
"""
