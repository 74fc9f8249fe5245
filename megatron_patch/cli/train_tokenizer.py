"""Train a tokenizer on JSONL or plain-text files: SentencePiece (default) or a byte-level BPE (--type bpe).

  python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok --vocab-size 8000
  python tools/train_tokenizer.py --type bpe --input corpus.jsonl --model-prefix tok --vocab-size 8000

SentencePiece writes tok.model (--tokenizer-model tok.model): ids 0 <unk>, 1 <s>, 2 </s> (EOD), 3 <pad>
(patch-alignment padding); byte fallback keeps every input encodable, as in LLaMA's tokenizer.
--type bpe trains GPT-2-style byte-level BPE with the `tokenizers` library and writes the HuggingFace tokenizer
directory tok/ (tokenizer.json, tokenizer_config.json; --tokenizer-model tok, HuggingFaceTokenizer): ids
0 <|endoftext|> (EOD), 1 <|pad|>.
"""

from __future__ import annotations

import argparse
import os

from megatron_patch.data.tokenizers.training import train_byte_level_bpe, train_sentencepiece
from megatron_patch.errors import OneLineErrorParser, one_line_errors


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (one object per line) or .txt files")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--type", default="sentencepiece", choices=["sentencepiece", "bpe"],
                        help="sentencepiece: a SentencePiece model; bpe: byte-level BPE (HuggingFace tokenizer.json)")
    parser.add_argument("--model-prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab (--type bpe: the directory PREFIX)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece's algorithm")
    parser.add_argument("--input-sentence-size", type=int, default=1_000_000, help="sentences sampled for training")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"--input: no such file: {path}")
    with one_line_errors(parser.prog):
        if args.type == "bpe":
            path = train_byte_level_bpe(args.input, args.json_key, args.model_prefix, args.vocab_size)
            print(f"wrote {path} ({args.vocab_size} tokens)")
            return
        train_sentencepiece(args.input, args.json_key, args.model_prefix, args.vocab_size, args.model_type,
                            args.input_sentence_size, args.threads)
    print(f"wrote {args.model_prefix}.model ({args.vocab_size} pieces)")
