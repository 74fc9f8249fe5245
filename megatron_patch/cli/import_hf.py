"""tools/import_hf.py / megatron-patch-import-hf: a HuggingFace LlamaForCausalLM or GPT2LMHeadModel directory as a
checkpoint of this project, in the parallel layout the next run uses.

  python tools/import_hf.py hf/llama ckpt/from_hf --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 \\
      [--tokenizer-type TYPE --tokenizer-model ...] [--overwrite]

Reads config.json and model.safetensors (or pytorch_model.bin, weights only; sharded files with their index) and
writes `OUT/iter_0000000/mp_rank_*/model_optim_rng.pt` sharded as megatron-core shards that layout, run.json (the
model config and the tokenizer's sha256) and the tracker, then prints the pretrain_patch_gpt.py flags that start
from it (`--pretrained-checkpoint OUT`: its weights, a fresh optimizer and LR schedule). The tokenizer: the
tokenizer flags given (any --tokenizer-type, as the trainer takes them), else the HF directory's own: its
tokenizer.model (SentencePiece) if it has one, else its tokenizer.json (HuggingFaceTokenizer). OUT is written as
OUT.tmp-<pid> and renamed when complete; an existing OUT is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex

from megatron_patch.checkpoint import reshard
from megatron_patch.config.flags import FLAGS
from megatron_patch.config.schema import ModelConfig
from megatron_patch.config.tokenizer import (
    FIELDS,
    TOKENIZER_FILES,
    TOKENIZER_FLAGS,
    TokenizerError,
    TokenizerSpec,
    add_tokenizer_arguments,
)
from megatron_patch.data.tokenizers.wrappers import build_tokenizer
from megatron_patch.errors import OneLineErrorParser, one_line_errors
from megatron_patch.interop.hf import convert, families, files

PROG = "import_hf.py"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="HF model directory (config.json and weights)")
    parser.add_argument("out", metavar="OUT", help="checkpoint directory to write")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP of the checkpoint (default 1)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP of the checkpoint (default 1)")
    add_tokenizer_arguments(parser.add_argument_group(
        "tokenizer (default: HF_DIR/tokenizer.model as SentencePiece, else HF_DIR's tokenizer.json)"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def model_flags(model: ModelConfig) -> list:
    """pretrain_patch_gpt.py's model flags that give exactly `model` (explicit, so no preset default can differ)."""
    args = []
    for flag in FLAGS:
        if not flag.path.startswith("model."):
            continue
        name = flag.path.split(".", 1)[1]
        value = getattr(model, name)
        if value is None or (name == "max_position_embeddings" and model.position_embedding_type == "rope"):
            continue  # rope models have no position table
        if flag.kwargs.get("action") is not None:  # --x / --no-x, or a store_true --x
            on = (not value) if flag.negated else value
            if on or flag.kwargs["action"] != "store_true":
                args.append(flag.name if on else "--no-" + flag.name[2:])
        else:
            args += [flag.name, str(value)]
    return args


def hf_dir_tokenizer(args) -> TokenizerSpec:
    """The tokenizer flags given, else the HF directory's own tokenizer (checked; file paths absolute, as the
    checkpoint records them and the printed flags give them)."""
    given = TokenizerSpec.of(args)
    if not any(getattr(given, name) for name in FIELDS):
        if os.path.isfile(os.path.join(args.hf_dir, "tokenizer.model")):
            given = TokenizerSpec(tokenizer_model=os.path.join(args.hf_dir, "tokenizer.model"))
        elif os.path.isfile(os.path.join(args.hf_dir, "tokenizer.json")):
            given = TokenizerSpec("HuggingFaceTokenizer", args.hf_dir)
        else:
            raise convert.ExportError(f"no tokenizer.model or tokenizer.json in {args.hf_dir}: give the tokenizer "
                                        "flags (--tokenizer-type, --tokenizer-model, ...)")
    try:
        spec = given.resolved()
    except TokenizerError as e:
        raise convert.ExportError(str(e)) from None
    return dataclasses.replace(spec, **{name: os.path.abspath(getattr(spec, name)) for name in TOKENIZER_FILES
                                        if getattr(spec, name) is not None})


def tokenizer_flags(spec: TokenizerSpec) -> list:
    """The trainer's flags for `spec`."""
    args = []
    for flag, name, _, kwargs in TOKENIZER_FLAGS:
        value = getattr(spec, name)
        if kwargs.get("action") == "store_true":
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def import_model(args) -> str:
    """Write the checkpoint; returns what to print. ExportError on bad input."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    files.check_output(args.out, args.overwrite)
    config = files.read_hf_config(args.hf_dir)
    model = families.model_of_hf(config)
    files.check_layout(model, tp, pp)
    spec = hf_dir_tokenizer(args)
    vocab_size = build_tokenizer(spec).vocab_size
    full, model = convert.hf_to_megatron(files.read_hf_weights(args.hf_dir), config)
    rows = full[families.EMBEDDING].size(0)
    if rows < vocab_size:
        raise convert.ExportError(f"the model's {rows}-row vocabulary is smaller than the {spec.type}'s "
                                    f"{vocab_size} ids: another tokenizer?")
    for name in reshard.VOCAB_ROWS:  # rows past the tokenizer's never occur in its data
        if name in full:
            full[name] = full[name][:vocab_size]
    cfg = files.import_config(model, tp, pp, spec)
    with files.staged_directory(args.out, args.overwrite) as staging:
        files.write_checkpoint(full, cfg, staging, tp, pp)
    flags = [*model_flags(model), *tokenizer_flags(spec), "--pretrained-checkpoint",
             os.path.abspath(args.out), "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
             str(pp)]
    return "\n".join([
        f"imported {args.hf_dir} ({type(config).__name__}: {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads, vocabulary {vocab_size} of {rows} rows) to {args.out} "
        f"(TP={tp} x PP={pp}, iteration 0)",
        "train from it with these pretrain_patch_gpt.py flags (plus data, batch and schedule flags):",
        "  " + shlex.join(flags),
    ])


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        summary = import_model(args)
    print(summary)


if __name__ == "__main__":
    main()
