"""tools/export_hf.py / megatron-patch-export-hf: a checkpoint as a HuggingFace model directory.

  python tools/export_hf.py ckpt/phase2 hf/phase2 [--iteration N] [--dtype bf16|fp32] [--tokenizer-model tok.model]
  lm_eval --model hf --model_args pretrained=hf/phase2 --tasks hellaswag      # what it prints at the end

Any checkpoint of this project (any TP x PP (x virtual PP) layout, DeepSpeed's consolidated weights, phase 1 or 2:
the weights are the same for every K) becomes LlamaForCausalLM (RMSNorm, SwiGLU, RoPE) or GPT2LMHeadModel
(LayerNorm, GELU, learned positions, biases): config.json, model.safetensors, generation_config.json and the
tokenizer files. A model neither class computes exactly is refused, naming the feature. OUT is written as
OUT.tmp-<pid> and renamed when complete; an existing OUT is kept unless --overwrite.
See megatron_patch/interop/hf/families.py for the weight mapping.
"""

from __future__ import annotations

import argparse
import shlex

import torch

from megatron_patch.checkpoint import guards
from megatron_patch.config.tokenizer import TokenizerError, add_tokenizer_arguments, given_or_runs
from megatron_patch.data.tokenizers.wrappers import build_tokenizer
from megatron_patch.errors import OneLineErrorParser, one_line_errors
from megatron_patch.interop.hf import convert, families, files

PROG = "export_hf.py"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (its tracker names the iteration)")
    parser.add_argument("out", metavar="OUT", help="HF model directory to write")
    parser.add_argument("--iteration", type=int, help="another saved iteration than the tracker's")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="weights' dtype (default: the run's: bf16 for --bf16, fp16 for --fp16, else fp32)")
    add_tokenizer_arguments(parser.add_argument_group("tokenizer (default: the run's; flags given replace its own)"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def export(args) -> str:
    """Write the HF directory; returns the summary to print. ExportError / TokenizerExportError on bad input."""
    files.check_output(args.out, args.overwrite)
    saved = guards.locate(args.checkpoint, args.iteration)
    model = saved.model
    family = families.hf_family(model)
    try:
        tokenizer = build_tokenizer(given_or_runs(args, saved.config["data"]))
    except TokenizerError as e:
        raise convert.ExportError(f"{e} (the run's tokenizer, or the flags given)") from None
    trained_with = (saved.run or {}).get("tokenizer_sha256")
    if trained_with and tokenizer.fingerprint != trained_with:
        raise convert.ExportError(f"the {tokenizer.spec.type} given is not the tokenizer {saved.root} was "
                                    "trained with (its fingerprint differs)")
    vocab_size, special_tokens = tokenizer.vocab_size, tokenizer.hf_special_ids()
    dtype = DTYPES[args.dtype or next((name for name in ("bf16", "fp16") if saved.config.get(name)), "fp32")]
    full = saved.full_weights()
    rows = full[families.EMBEDDING].size(0)
    state, config = convert.megatron_to_hf(full, model, vocab_size, special_tokens)
    with files.staged_directory(args.out, args.overwrite) as staging:
        files.save_hf(staging, state, config, dtype)
        tokenizer.save_hf(staging)
    parallel = saved.config["parallel"]
    parameters = sum(t.numel() for t in state.values())
    out = shlex.quote(args.out)
    return "\n".join([
        f"exported {saved.directory} (TP={parallel['tensor_model_parallel_size']} x "
        f"PP={parallel['pipeline_model_parallel_size']}, trained at K={saved.config.get('patch_size', 1)}) to "
        f"{args.out}",
        f"  {families.HF_CLASSES[family]}: {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads, vocabulary {vocab_size} (of {rows} padded rows), "
        f"{'untied' if model.untie_embeddings_and_output_weights else 'tied'} embeddings, "
        f"{parameters / 1e6:.2f}M parameters, {str(dtype).removeprefix('torch.')}",
        "evaluate it with lm-eval (pip install -e '.[eval]'):",
        f"  lm_eval --model hf --model_args pretrained={out},dtype={str(dtype).removeprefix('torch.')} "
        "--tasks lambada_openai,hellaswag,arc_easy --batch_size 8",
    ])


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        summary = export(args)
    print(summary)


if __name__ == "__main__":
    main()
