"""The plateau gauge (megatron_patch/data/unigram.py): token counts in the sidecar equal the .bin's, the bound is
the unigram entropy a NumPy computation gives (pad left out, blends mixed with their weights), datasets without
counts are counted once and cached, and a patch-level run logs it, puts it in its summary and says where phase 1
ended against it."""

import json
import shutil

import numpy
import pytest

from helpers import PYTHON, phase_flags, run
from megatron_patch.data.indexed import TOKEN_COUNTS, check_dataset, read_sidecar
from megatron_patch.data.unigram import context_free_bound, token_counts
from megatron_patch.training import json_log


def tokens_of(prefix):
    header, num_tokens = check_dataset(prefix)
    return numpy.fromfile(prefix + ".bin", dtype=header.dtype, count=num_tokens).astype(numpy.int64)


def entropy(distribution):
    q = distribution[distribution > 0]
    return float(-(q * numpy.log(q)).sum())


def frequencies(prefix, pad_id, size):
    counts = numpy.bincount(tokens_of(prefix), minlength=size).astype(float)
    if pad_id is not None:
        counts[pad_id] = 0
    return counts / counts.sum()


@pytest.mark.parametrize("name", ["aligned4", "plain"])
def test_the_sidecar_counts_every_token_of_the_bin(corpus, name):
    counts = numpy.asarray(read_sidecar(corpus[name])[TOKEN_COUNTS])
    tokens = tokens_of(corpus[name])
    assert numpy.array_equal(counts, numpy.bincount(tokens)) and counts.sum() == len(tokens)


def test_the_bound_is_the_unigram_entropy_without_the_pad(corpus):
    pad = read_sidecar(corpus["aligned4"])["pad_id"]
    expected = entropy(frequencies(corpus["aligned4"], pad, 1000))
    assert context_free_bound([corpus["aligned4"]], None, pad) == pytest.approx(expected, rel=1e-12)
    with_pad = entropy(frequencies(corpus["aligned4"], None, 1000))
    assert context_free_bound([corpus["aligned4"]], None, None) == pytest.approx(with_pad, rel=1e-12) != expected


def test_a_dataset_without_counts_is_counted_from_its_bin_once_and_cached(corpus, tmp_path, capsys):
    prefix = str(tmp_path / "old")
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus["aligned4"] + suffix, prefix + suffix)
    sidecar = read_sidecar(corpus["aligned4"])
    del sidecar[TOKEN_COUNTS]
    (tmp_path / "old.meta.json").write_text(json.dumps(sidecar))  # as preprocessing wrote it before the counts
    cache = tmp_path / "cache"
    counted = token_counts(prefix, str(cache))
    assert numpy.array_equal(counted, numpy.bincount(tokens_of(prefix)))
    cached = list(cache.glob("old.*.token_counts.npy"))
    assert len(cached) == 1 and numpy.array_equal(numpy.load(cached[0]), counted)
    numpy.save(cached[0], counted * 2)  # the cache is what a second call reads
    assert numpy.array_equal(token_counts(prefix, str(cache)), counted * 2)


def test_a_blend_mixes_the_datasets_frequencies_as_they_are_sampled(corpus):
    a, b = corpus["aligned4"], corpus["plain"]
    pad = read_sidecar(a)["pad_id"]
    qa, qb = frequencies(a, pad, 1000), frequencies(b, pad, 1000)
    weighted = context_free_bound([a, b], [0.3, 0.7], pad)
    assert weighted == pytest.approx(entropy(0.3 * qa + 0.7 * qb), rel=1e-12)
    # Without weights megatron-core draws in proportion to the datasets' sizes.
    na, nb = (len(tokens_of(p)) - numpy.sum(tokens_of(p) == pad) for p in (a, b))
    sized = context_free_bound([a, b], None, pad)
    assert sized == pytest.approx(entropy((na * qa + nb * qb) / (na + nb)), rel=1e-9)
    assert context_free_bound([a, b], [1, 0.0001], pad) == pytest.approx(entropy(qa), abs=1e-3)


def test_merged_datasets_count_their_inputs_tokens(corpus, tmp_path):
    out = tmp_path / "merged"
    run([PYTHON, "tools/merge_datasets.py", "--input", corpus["aligned4"], corpus["aligned4"], "--output-prefix",
         str(out)])
    counts = numpy.asarray(read_sidecar(str(out))[TOKEN_COUNTS])
    assert numpy.array_equal(counts, 2 * numpy.asarray(read_sidecar(corpus["aligned4"])[TOKEN_COUNTS]))


def test_a_patch_level_run_says_where_it_ended_against_the_bound(corpus, tmp_path):
    log = tmp_path / "log.jsonl"
    result = run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path, 4, [
        "--log-json", str(log), "--split", "90,10,0"], steps=3)])
    bound = context_free_bound([corpus["aligned4"]], None, read_sidecar(corpus["aligned4"])["pad_id"])
    summary = json_log.last_summary(str(log))
    assert summary["unigram_entropy"] == pytest.approx(bound, rel=1e-12)
    assert f"unigram entropy of the training data: {bound:.4f} nats" in result.stdout
    where = "below" if summary["valid_loss"] <= bound else "ABOVE"
    assert (f"K=4 phase ended {abs(bound - summary['valid_loss']):.4f} nats {where} the unigram entropy "
            f"(validation loss {summary['valid_loss']:.4f}") in result.stdout
    # 3 steps of a tiny model learn nothing beyond frequencies: the warning.
    learned = "not even the token frequencies" if where == "ABOVE" else "little beyond token frequencies (less than"
    assert f"warning: this phase learned {learned}" in result.stdout
    token_level = run([PYTHON, "pretrain_patch_gpt.py", *phase_flags(corpus, tmp_path / "k1", 1, [
        "--log-json", str(tmp_path / "k1.jsonl"), "--data-path", corpus["plain"]], steps=2)])
    assert json_log.last_summary(str(tmp_path / "k1.jsonl"))["unigram_entropy"] is None
    assert "unigram entropy of the training data" not in token_level.stdout
