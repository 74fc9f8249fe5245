"""Training a tokenizer on JSONL or plain-text files: the work behind tools/train_tokenizer.py.

SentencePiece (--type bpe/unigram SentencePiece models): ids 0 <unk>, 1 <s>, 2 </s> (EOD), 3 <pad>
(patch-alignment padding); byte fallback keeps every input encodable, as in LLaMA's tokenizer.
Byte-level BPE (`train_byte_level_bpe`, the `tokenizers` library, GPT-2 / LLaMA-3 style): a HuggingFace tokenizer
directory (tokenizer.json, tokenizer_config.json) for --tokenizer-type HuggingFaceTokenizer; ids 0 <|endoftext|>
(EOD), 1 <|pad|>; every input is encodable (the 256 bytes are in the vocabulary).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import sentencepiece as spm


def iter_texts(paths, json_key):
    """The documents of `paths`: `.jsonl` files give each line's `json_key` (other lines are reported on stderr
    and skipped), other files each line."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                if not path.endswith(".jsonl"):
                    yield line.rstrip("\n")
                    continue
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"{path}:{line_number}: skipped (not a JSON object with key '{json_key}')", file=sys.stderr)


def train_sentencepiece(inputs, json_key, model_prefix, vocab_size, model_type, input_sentence_size, threads):
    """Writes model_prefix.model and model_prefix.vocab, trained on the documents of `inputs`."""
    # SentencePiece reads one sentence per line: flatten each document's lines into a temporary file.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as tmp:
        for text in iter_texts(inputs, json_key):
            for line in text.splitlines():
                if line.strip():
                    tmp.write(line.strip() + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=tmp.name,
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=2,
        )
    finally:
        os.remove(tmp.name)


BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def train_byte_level_bpe(inputs, json_key, out_dir, vocab_size):
    """Writes out_dir/tokenizer.json and out_dir/tokenizer_config.json (EOD <|endoftext|>, pad <|pad|>), trained on
    the documents of `inputs`. Returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(iter_texts(inputs, json_key), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tokenizer.save(path)
    eod, pad = BPE_SPECIAL_TOKENS
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": pad}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
