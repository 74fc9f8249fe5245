"""PatchGPTDataset: K-aligned samples shifted by K, and exactly GPTDataset's samples at K=1."""

import json

import numpy
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from helpers import PYTHON, run
from megatron_patch.data.dataset import NotPatchAlignedError, build_datasets
from megatron_patch.data.tokenizers.wrappers import SentencePieceTokenizer

T = 32  # positions per sample


def _patch_datasets(corpus, tmp_path, prefix, k, samples=200, train_data_range=(0.0, 1.0)):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    return build_datasets([corpus[prefix]], None, "90,10,0", tok, k, T, [samples, 20, 0], seed=7,
                          pad_id=tok.pad, cache_path=str(tmp_path / "cache"), is_built_on_rank=lambda: True,
                          train_data_range=train_data_range)


def test_k1_reproduces_gpt_dataset(megatron_process, corpus, tmp_path):
    ours, _, _ = _patch_datasets(corpus, tmp_path, "plain", 1)
    config = GPTDatasetConfig(random_seed=7, sequence_length=T, blend=([corpus["plain"]], None), split="90,10,0",
                              path_to_cache=str(tmp_path / "cache"),
                              tokenizer=SentencePieceTokenizer(corpus["tokenizer"]),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False)
    theirs, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, 20, 0], lambda: True, config).build()
    assert len(ours) == len(theirs) > 0
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"]), i


def test_mock_data_is_megatron_core_s_mock_documents(megatron_process, corpus, tmp_path):
    """--mock-data: at K=1 exactly megatron-core's MockGPTDataset samples; at K=4 its documents, each padded to whole
    patches, in samples shifted by one patch."""
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    mock = [build_datasets([], None, "90,10,0", tok, k, T, [50, 10, 0], seed=7, pad_id=tok.pad,
                           cache_path=str(tmp_path / "cache"), is_built_on_rank=lambda: True)[0] for k in (1, 4)]
    config = GPTDatasetConfig(random_seed=7, sequence_length=T, blend=None, split="90,10,0",
                              path_to_cache=str(tmp_path / "cache"), tokenizer=tok, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    theirs, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [50, 10, 0], lambda: True, config).build()
    assert len(mock[0]) == len(theirs) > 50  # one epoch of its 100,000 documents
    for i in range(50):  # GPTDataset writes 0 for the pad id (3 here, a mock token like any other) in its samples
        ours = mock[0][i]
        for key in ("tokens", "labels"):
            assert torch.equal(ours[key].masked_fill(ours[key] == tok.pad, 0), theirs[i][key]), (i, key)
        assert torch.equal(ours["loss_mask"], theirs[i]["loss_mask"]), i
    view = mock[1].dataset
    for d in range(20):
        document = theirs.dataset[d]
        padded = view.get(d).reshape(-1)
        assert len(padded) % 4 == 0 and len(padded) - len(document) < 4
        assert numpy.array_equal(padded[:len(document)], document) and (padded[len(document):] == tok.pad).all()
    for i in range(10):
        sample = mock[1][i]
        assert sample["tokens"].numel() == sample["labels"].numel() == 4 * T
        assert torch.equal(sample["tokens"][4:], sample["labels"][:-4])
        assert torch.equal(sample["loss_mask"] == 0, sample["labels"] == tok.pad)


def test_k4_samples_are_patch_aligned_and_shifted_by_one_patch(megatron_process, corpus, tmp_path):
    k = 4
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    train, valid, _ = _patch_datasets(corpus, tmp_path, "aligned4", k)
    documents = IndexedDataset(corpus["aligned4"])  # keep it alive: its items are views of its memory map
    stream = numpy.concatenate([documents[i] for i in range(len(documents))])
    aligned_patches = set(map(tuple, stream.reshape(-1, k).tolist()))
    for dataset in (train, valid):
        for i in range(len(dataset)):
            s = dataset[i]
            tokens, labels, mask = s["tokens"], s["labels"], s["loss_mask"]
            assert tokens.shape == labels.shape == mask.shape == (T * k,)
            assert torch.equal(tokens[k:], labels[:-k])  # labels of patch i = tokens of patch i+1
            assert torch.equal(mask, (labels != tok.pad).float())
            for row in torch.cat([tokens, labels[-k:]]).view(-1, k).tolist():
                # Each patch is a patch of the corpus starting at a multiple of K ...
                assert tuple(row) in aligned_patches, (i, row)
                # ... so an EOD is only ever followed by padding up to the patch boundary.
                if tok.eod in row:
                    assert all(t == tok.pad for t in row[row.index(tok.eod) + 1:])
            assert mask.sum() > 0


def test_unaligned_dataset_is_rejected_with_a_clear_message(megatron_process, corpus, tmp_path):
    with pytest.raises(NotPatchAlignedError, match="--patch-size 4"):
        _patch_datasets(corpus, tmp_path, "plain", 4)


def test_patch_size_is_part_of_the_cache_key(megatron_process, corpus, tmp_path):
    k1, _, _ = _patch_datasets(corpus, tmp_path, "aligned4", 1)
    k4, _, _ = _patch_datasets(corpus, tmp_path, "aligned4", 4)
    assert k1.unique_description_hash != k4.unique_description_hash


def test_phase_data_ranges_partition_the_training_documents(megatron_process, corpus, tmp_path):
    """A plan's phase 1 reads [0, lambda) of the training split's tokens and phase 2 [lambda, 1): disjoint
    documents that together are the whole split; validation is the same for both."""
    lam = 0.6
    (whole, valid, _), (phase1, valid1, _), (phase2, valid2, _) = (
        _patch_datasets(corpus, tmp_path, "aligned4", 4, train_data_range=r)
        for r in [(0.0, 1.0), (0.0, lam), (lam, 1.0)])
    docs = [set(d.document_index.tolist()) for d in (whole, phase1, phase2)]
    assert docs[1] and docs[2] and not docs[1] & docs[2] and docs[1] | docs[2] == docs[0]
    documents = IndexedDataset(corpus["aligned4"])  # keep it alive: its lengths are a view of its memory map
    lengths = documents.sequence_lengths
    share = lengths[sorted(docs[1])].sum() / lengths[sorted(docs[0])].sum()
    assert abs(share - lam) <= lengths.max() / lengths[sorted(docs[0])].sum()  # within one document of lambda
    assert len(valid) == len(valid1) == len(valid2)
    assert all(torch.equal(valid[i]["tokens"], v[i]["tokens"]) for v in (valid1, valid2) for i in range(len(valid)))
    assert len({whole.unique_description_hash, phase1.unique_description_hash, phase2.unique_description_hash}) == 3


@pytest.fixture(scope="module")
def second_dataset(corpus, tmp_path_factory):
    """Another patch-aligned dataset (other documents of the corpus) to blend with `aligned4`."""
    out = tmp_path_factory.mktemp("second")
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus["texts"][100:140]))
    run([PYTHON, "tools/preprocess_data.py", "--input", str(out / "docs.jsonl"), "--output-prefix",
         str(out / "second"), "--tokenizer-model", corpus["tokenizer"], "--append-eod", "--patch-size", "4"])
    return str(out / "second_text_document")


def _blend(corpus, second, cache, seed=7):
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    train, _, _ = build_datasets([corpus["aligned4"], second], [0.7, 0.3], "90,10,0", tok, 4, T, [400, 20, 0],
                                 seed=seed, pad_id=tok.pad, cache_path=str(cache), is_built_on_rank=lambda: True)
    return train


def test_blend_follows_its_weights_is_seeded_and_cached(megatron_process, corpus, second_dataset, tmp_path):
    blend = _blend(corpus, second_dataset, tmp_path / "cache")
    share = numpy.bincount(blend.dataset_index, minlength=2) / len(blend)
    assert len(blend) >= 400 and abs(share[0] - 0.7) < 0.01
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    again = _blend(corpus, second_dataset, tmp_path / "cache")  # from the cache: no new index files
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == cached
    assert all(torch.equal(blend[i]["tokens"], again[i]["tokens"]) for i in range(len(blend)))
    reseeded = _blend(corpus, second_dataset, tmp_path / "cache", seed=8)
    assert not all(torch.equal(blend[i]["tokens"], reseeded[i]["tokens"]) for i in range(20))


def test_per_split_blends_are_megatron_core_s(megatron_process, corpus, second_dataset, tmp_path):
    """--train/valid/test-data-path: each split is the whole of its own blend, exactly as megatron-core's builder
    reads `blend_per_split` (K=1); at K=4 a plan's data range cuts the training blend only."""
    tok = SentencePieceTokenizer(corpus["tokenizer"])
    per_split = [([corpus["plain"]], None), ([corpus["plain"]], None), None]
    ours = build_datasets([], None, None, tok, 1, T, [200, 20, 0], seed=7, pad_id=tok.pad,
                          cache_path=str(tmp_path / "cache"), is_built_on_rank=lambda: True, blend_per_split=per_split)
    config = GPTDatasetConfig(random_seed=7, sequence_length=T, blend_per_split=per_split, split=None,
                              path_to_cache=str(tmp_path / "cache"), tokenizer=tok, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    theirs = BlendedMegatronDatasetBuilder(GPTDataset, [200, 20, 0], lambda: True, config).build()
    assert ours[2] is None and theirs[2] is None
    for a, b in zip(ours[:2], theirs[:2]):
        assert len(a) == len(b) > 0
        assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    documents = len(IndexedDataset(corpus["plain"]))
    assert len(set(ours[0].document_index.tolist())) == len(set(ours[1].document_index.tolist())) == documents

    cut = [([corpus["aligned4"]], None), ([second_dataset], None), None]
    (whole, valid, _), (half, valid_half, _) = (
        build_datasets([], None, None, tok, 4, T, [100, 10, 0], seed=7, pad_id=tok.pad,
                       cache_path=str(tmp_path / "cache"), is_built_on_rank=lambda: True, train_data_range=r,
                       blend_per_split=cut) for r in [(0.0, 1.0), (0.0, 0.5)])
    assert set(half.document_index.tolist()) < set(whole.document_index.tolist()) == set(range(len(
        IndexedDataset(corpus["aligned4"]))))
    assert len(valid) == len(valid_half) and torch.equal(valid[0]["tokens"], valid_half[0]["tokens"])
    assert len(set(valid.document_index.tolist())) == len(IndexedDataset(second_dataset))
