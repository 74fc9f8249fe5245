"""Activation recompute and grouped-query attention across processes: full recompute gives the steps of the same
layout without it under tensor parallelism (with dropout), and those of one process under pipeline parallelism; a
grouped-query model trains at TP=2 and PP=2 as in one process (each TP rank holds whole key/value groups), and its
checkpoint reshards TP=2 -> TP=1."""

import itertools

import pytest

from helpers import PP2, TP2, assert_same_run, launcher, phase_flags, run, train_losses, train_run
from megatron_patch.training import json_log

RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
GQA = ["--group-query-attention", "--num-query-groups", "2"]  # the tiny preset's 4 heads share 2 key/value groups
_LOG_IDS = itertools.count()


def test_full_recompute_under_tensor_parallelism_gives_the_same_steps(corpus, tmp_path):
    # Dropout on: the recomputed forward must replay the tensor-parallel RNG tracker's states too.
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    reference = train_losses(corpus, tmp_path, 4, 2, [*TP2, *dropout])
    assert_same_run(reference, train_losses(corpus, tmp_path, 4, 2, [*TP2, *dropout, *RECOMPUTE]), tolerance=1e-6)


def test_full_recompute_under_pipeline_parallelism_gives_the_steps_of_one_process(corpus, tmp_path,
                                                                                   start_checkpoint, one_process):
    common = ["--num-layers", "4", "--pretrained-checkpoint", start_checkpoint, "--micro-batch-size", "1"]
    assert_same_run(one_process(4, common), train_losses(corpus, tmp_path, 4, 2, [*common, *PP2, *RECOMPUTE]))


@pytest.fixture(scope="module")
def gqa_tp2(corpus, tmp_path_factory):
    """(series, checkpoint) of a phase-1 (K=4) run of the grouped-query model at TP=2."""
    out = tmp_path_factory.mktemp("gqa_tp2")
    series, _ = train_run(corpus, out, 4, [*GQA, *TP2, "--save", str(out / "ckpt")], launch=launcher(2))
    return series, str(out / "ckpt")


def test_grouped_query_attention_at_tp2_matches_one_process(one_process, gqa_tp2):
    assert_same_run(one_process(4, GQA), gqa_tp2[0])


def test_grouped_query_attention_at_pp2_matches_one_process(corpus, tmp_path, one_process, gqa_tp2):
    """Both from the TP=2 run's weights (pipeline stages would seed their own layers)."""
    flags = [*GQA, "--pretrained-checkpoint", gqa_tp2[1]]
    assert_same_run(one_process(4, flags), train_losses(corpus, tmp_path, 4, 2, [*flags, *PP2]))


def _first_step_loss(corpus, out, layout, pretrained):
    log = out / f"handoff{next(_LOG_IDS)}.jsonl"
    run([*launcher(2 if layout else 1), "pretrain_patch_gpt.py", *phase_flags(corpus, out, 1, [
        *GQA, *layout, "--lr-warmup-iters", "0", "--pretrained-checkpoint", pretrained, "--log-json", str(log)],
        steps=1)])
    return json_log.steps(str(log))[1]["loss"]


def test_grouped_query_checkpoint_hands_off_from_tp2_to_tp1(corpus, tmp_path, gqa_tp2):
    """linear_qkv rows are [q heads of a group; k; v] per group: split along dim 0, each TP rank has whole groups,
    so merging the shards and splitting again (here: not at all) keeps every group intact."""
    same_layout = _first_step_loss(corpus, tmp_path, TP2, gqa_tp2[1])
    resharded = _first_step_loss(corpus, tmp_path, [], gqa_tp2[1])
    assert resharded == pytest.approx(same_layout, rel=1e-6, abs=0)


def test_hand_off_to_another_key_value_layout_is_refused(corpus, tmp_path, gqa_tp2):
    result = run([*launcher(1), "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 1, [
        "--lr-warmup-iters", "0", "--pretrained-checkpoint", gqa_tp2[1]], steps=1)], check=False)
    assert result.returncode != 0
    assert "group_query_attention=True (this run: False, --group-query-attention)" in result.stderr + result.stdout
