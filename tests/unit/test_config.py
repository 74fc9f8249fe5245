"""Layout and batch validation: each inconsistency is a ConfigError naming the flags, before any work."""

import re

import pytest

from megatron_patch.checkpoint.layout import TRACKER
from megatron_patch.config.flags import FLAGS, GROUPS, parse_args
from megatron_patch.config.schema import ConfigError


def _args(corpus, *flags, budget=("--train-iters", "10")):
    return ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
            "--patch-size", "4", "--micro-batch-size", "2", *budget, "--lr", "1e-3", "--lr-warmup-iters", "1",
            "--data-path", corpus["aligned4"], "--tokenizer-model", corpus["tokenizer"], *flags]


@pytest.mark.parametrize("world,flags,message", [
    (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--hidden-size", "63"],
     "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (3, ["--tensor-model-parallel-size", "2"], "world size 3 is not divisible by tensor x pipeline parallel size 2"),
    (4, ["--tensor-model-parallel-size", "2", "--global-batch-size", "6"],
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "12"],
     "--tensor-model-parallel-size 2 to divide the 3 positions per sample"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "must divide the 2 layers of each stage"),
    (1, ["--lr-warmup-iters", "10"], "--lr-warmup-iters 10 must be smaller than --lr-decay-iters 10"),
    (1, ["--train-tokens", "1000"], "give exactly one of --train-iters, --train-tokens and --train-samples"),
    (1, ["--pretrained-checkpoint", "/nonexistent"], f"/nonexistent: no {TRACKER}"),
])
def test_inconsistent_settings_are_rejected(corpus, world, flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(_args(corpus, *flags)).resolve(world)


def test_derived_values(corpus):
    cfg = parse_args(_args(corpus, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--num-layers-per-virtual-pipeline-stage", "1")).resolve(8)
    assert cfg.global_batch_size == 2 * 2  # micro-batch x data-parallel size (8 / (2 x 2))
    assert cfg.num_patches == 32 and cfg.model.max_position_embeddings == 32
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 2
    cfg = parse_args(_args(corpus, "--global-batch-size", "8", budget=("--train-tokens", "5000"))).resolve(1)
    assert cfg.train_iters == 5  # ceil(5000 tokens / (8 samples x 128 tokens))


def test_a_preset_sets_the_model_and_explicit_flags_win():
    cfg = parse_args(["--model-preset", "paper-1.3b", "--num-layers", "12", "--no-untie-embeddings-and-output-weights"],
                     required=())
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (12, 2048, 16, 5504)
    assert (m.normalization, m.swiglu, m.position_embedding_type, m.add_bias_linear) == ("RMSNorm", True, "rope", False)
    assert not m.untie_embeddings_and_output_weights and m.hidden_dropout == 0.0
    plain = parse_args([], required=()).model  # no preset: Megatron-LM's GPT-2-style defaults
    assert (plain.normalization, plain.swiglu, plain.add_bias_linear) == ("LayerNorm", False, True)


def test_help_lists_every_flag_with_a_text_in_its_group(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"\n{group}:\n" in text
    for flag in FLAGS:
        assert flag.name in text and flag.help


def test_every_unknown_flag_is_named_in_one_message_with_its_closest_flag(capsys):
    with pytest.raises(SystemExit) as exit_code:
        parse_args(["--hiden-size", "64", "--use-flash-attn", "--lr-decay-iter=10", "--seq-length", "64",
                    "--flash-attention"], required=())
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "pretrain_patch_gpt: error: 3 unknown flags: --hiden-size (did you mean --hidden-size?), --lr-decay-iter (did "
        "you mean --lr-decay-iters?), --flash-attention (see --help)"]


def test_a_flag_is_never_taken_for_a_longer_one_it_starts():
    """argparse's abbreviations would read Megatron-LM's --seq (or any prefix) as one of our flags."""
    with pytest.raises(SystemExit):
        parse_args(["--seq-len", "64"], required=())
    assert parse_args(["--seq-length", "64"], required=()).seq_length == 64
