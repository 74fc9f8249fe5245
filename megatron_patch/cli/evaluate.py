"""tools/evaluate.py / megatron-patch-evaluate: token-level loss, perplexity and bits per byte of a checkpoint.

  python tools/evaluate.py --load ckpt/phase2                                   # its validation split, as trained
  python tools/evaluate.py --load ckpt/phase1 --split-name test                 # + patch-level loss at its K
  python tools/evaluate.py --load ckpt/phase2 --text wiki.test.jsonl --seq-length 2048 --stride 512
  torchrun --nproc-per-node 4 tools/evaluate.py --load ckpt --tensor-model-parallel-size 2 ...   # distributed

Any checkpoint of this project (any TP/PP layout, DeepSpeed's consolidated weights, phase 1 or 2) in any layout
(resharded on load). Prints one line per score and the result as JSON (--output FILE also writes it).
See megatron_patch/evaluation/evaluate.py for what is measured.
"""

from __future__ import annotations

import argparse
import json

from megatron_patch.checkpoint.guards import locate
from megatron_patch.config.flags import non_negative_int, positive_int
from megatron_patch.config.schema import ConfigError, ParallelConfig
from megatron_patch.config.tokenizer import TokenizerError, TokenizerSpec, add_tokenizer_arguments, given_or_runs
from megatron_patch.distributed import parallel
from megatron_patch.distributed.parallel import print_rank_0
from megatron_patch.errors import OneLineErrorParser, one_line_errors
from megatron_patch.evaluation.evaluate import SPLITS, EvaluationRequest, evaluate

PROG = "evaluate.py"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="CKPT", help="checkpoint directory (its tracker's iteration)")
    parser.add_argument("--iteration", type=non_negative_int, help="another saved iteration than the latest")
    source = parser.add_argument_group("what to evaluate (default: the run's validation split)")
    source.add_argument("--split-name", choices=[*SPLITS, "all"],
                        help="a split of the dataset as the trainer builds it (--split of the run), or every token")
    source.add_argument("--text", nargs="+", metavar="FILE",
                        help="JSONL/.txt files (optionally .gz/.zst; globs, directories), one document per line")
    source.add_argument("--json-key", default="text", help="the document's key in JSONL (default: text)")
    source.add_argument("--data-path", nargs="+", help="dataset prefix(es) or blend instead of the run's")
    source.add_argument("--data-cache-path", help="where megatron-core may cache sample indices")
    add_tokenizer_arguments(parser.add_argument_group("tokenizer (default: the run's; flags given replace its own)"))
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--seq-length", type=positive_int, help="token positions per window/sample (default: the "
                                                               "positions per sample the run trained on)")
    sizes.add_argument("--stride", type=int, help="text: tokens a window advances (default: --seq-length)")
    sizes.add_argument("--micro-batch-size", type=int, default=1, help="samples per forward pass (default: 1)")
    sizes.add_argument("--eval-iters", type=positive_int, help="dataset: global batches to read (default: the run's)")
    sizes.add_argument("--global-batch-size", type=positive_int, help="dataset: samples per batch (default: the "
                                                                      "run's tokens per step)")
    layout = parser.add_argument_group("layout to run in (the weights are resharded)")
    layout.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    layout.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    parser.add_argument("--output", help="also write the result JSON here")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def _request(args) -> EvaluationRequest:
    if args.text and args.split_name:
        raise ConfigError("give --split-name or --text, not both")
    if args.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    layout = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                            pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    world = parallel.launch_from_env().world_size
    if world % (layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size):
        raise ConfigError(f"world size {world} is not divisible by tensor x pipeline parallel size")
    return EvaluationRequest(
        root=args.load, iteration=args.iteration, split=args.split_name, text=args.text, json_key=args.json_key,
        data_path=args.data_path, data_cache_path=args.data_cache_path, tokenizer=TokenizerSpec.of(args),
        seq_length=args.seq_length, stride=args.stride, micro_batch_size=args.micro_batch_size,
        eval_iters=args.eval_iters, global_batch_size=args.global_batch_size, parallel=layout)


def _check_model(request: EvaluationRequest) -> TokenizerSpec:
    """Before any process group: the checkpoint and tokenizer exist, the layout fits the model."""
    saved = locate(request.root, request.iteration).training_config
    try:
        tokenizer = given_or_runs(request.tokenizer, saved.data).resolved()
    except TokenizerError as e:
        raise ConfigError(f"{e} (the run's tokenizer, or the flags given)") from None
    m, p = saved.model, request.parallel
    if m.num_layers % p.pipeline_model_parallel_size or m.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError(f"the model ({m.num_layers} layers, {m.num_attention_heads} heads) does not split into "
                          f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size} x "
                          f"--tensor-model-parallel-size {p.tensor_model_parallel_size}")
    return tokenizer


def _print(result: dict) -> None:
    where = (f"text {' '.join(result['inputs'])} (stride {result['stride']})" if result["source"] == "text"
             else f"{result['split']} split")
    for level in ("token_level", "patch_level"):
        if level in result:
            s = result[level]
            k = f"K={s['patch_size']}" if level == "patch_level" else "K=1"
            bpb = f", {s['bits_per_byte']:.4f} bits per byte" if s["bits_per_byte"] is not None else ""
            print_rank_0(f"{result['checkpoint']} (iteration {result['iteration']}), {where}, {k}: loss "
                         f"{s['loss']:.4f}, perplexity {s['perplexity']:.3f}, {s['tokens']} tokens{bpb}")
    print_rank_0(json.dumps(result))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        request = _request(args)
        tokenizer = _check_model(request)
        parallel.initialize(request.parallel, seed=0)
        try:
            result = evaluate(request, tokenizer)
            _print(result)
            if args.output and parallel.is_rank_0():
                with open(args.output, "w") as f:
                    json.dump(result, f, indent=2)
        finally:
            parallel.destroy()


if __name__ == "__main__":
    main()
