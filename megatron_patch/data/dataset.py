"""PatchGPTDataset: megatron-core's GPTDataset over a patch view of the documents.

With documents padded to multiples of K (tools/preprocess_data.py --patch-size K), a document of n tokens is
n/K patches. GPTDataset's sample machinery (shuffling, epochs, sample index, caching, blending) then runs on
patches unchanged: a sample is T+1 consecutive patches starting at a patch boundary, tokens = its first T
patches and labels = its last T patches, i.e. the labels of patch i are the K tokens of patch i+1.
For K=1 this is exactly GPTDataset's sample.

The two phases of a plan read disjoint parts of the training split (`train_data_range`): phase 1 the documents
holding the first lambda of its tokens, phase 2 the rest, so phase 2 continues on data phase 1 has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_patch.compat.megatron_core import sample_tokens
from megatron_patch.config.schema import TrainingConfig, parse_blend
from megatron_patch.data.indexed import DatasetFormatError, check_dataset, read_sidecar
from megatron_patch.errors import MegatronPatchError


class DataError(MegatronPatchError, ValueError):
    """A dataset that cannot give what the run asks of it; reported as one line."""


class NotPatchAlignedError(DataError):
    pass


def checked_dataset(prefix: str) -> tuple:
    """indexed.check_dataset's (header, tokens) of a --data-path dataset; DataError if its files disagree."""
    try:
        return check_dataset(prefix)
    except (DatasetFormatError, OSError) as e:
        raise DataError(f"--data-path {e}" if isinstance(e, DatasetFormatError) else f"--data-path {prefix}: {e}"
                        ) from None


class PatchView:
    """An IndexedDataset seen in units of K tokens: lengths in patches, `get` returns [n, K] arrays."""

    def __init__(self, dataset: IndexedDataset, patch_size: int):
        lengths = dataset.sequence_lengths
        misaligned = numpy.flatnonzero(lengths % patch_size)
        if misaligned.size:
            raise NotPatchAlignedError(
                f"{dataset.path_prefix}: {misaligned.size} of {lengths.size} documents are not a multiple of "
                f"patch size {patch_size} tokens (first: document {misaligned[0]}, {lengths[misaligned[0]]} "
                f"tokens); preprocess with tools/preprocess_data.py --patch-size {patch_size} (or a multiple)"
            )
        self.dataset = dataset
        self.patch_size = patch_size
        self.path_prefix = dataset.path_prefix
        self.sequence_lengths = (lengths // patch_size).astype(numpy.int32)

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        k = self.patch_size
        tokens = self.dataset.get(idx, offset=offset * k, length=None if length is None else length * k)
        return tokens.reshape(-1, k)


class MockPatchView:
    """--mock-data: megatron-core's mock documents (MockGPTLowLevelDataset: ids 1, 2, 3, ... modulo the vocabulary,
    then EOD, of random lengths) seen as patches, each document padded with `pad_id` to whole patches as
    preprocessing pads real ones."""

    path_prefix = "--mock-data"

    def __init__(self, tokenizer, patch_size: int, pad_id: int):
        self.documents = MockGPTLowLevelDataset(tokenizer)
        self.patch_size, self.pad_id = patch_size, pad_id
        self.sequence_lengths = (-(-self.documents.sequence_lengths // patch_size)).astype(numpy.int32)

    def __len__(self) -> int:
        return len(self.documents)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        document = self.documents[idx]
        padded = numpy.full(int(self.sequence_lengths[idx]) * self.patch_size, self.pad_id, dtype=numpy.int64)
        padded[:len(document)] = document
        patches = padded.reshape(-1, self.patch_size)
        return patches[offset:None if length is None else offset + length]


@dataclass
class PatchGPTDatasetConfig(GPTDatasetConfig):
    patch_size: int = 1
    """K. `sequence_length` counts patches (T); a sample reads (T+1)*K tokens."""

    pad_id: int = -1
    """Id of the alignment padding written by preprocessing; labels equal to it get no loss."""

    train_data_range: Tuple[float, float] = (0.0, 1.0)
    """[start, end) as fractions of the training split's tokens; a document belongs to the range its first
    token falls in. Validation and test splits are never restricted."""


def documents_in_range(indices: numpy.ndarray, lengths: numpy.ndarray, start: float, end: float) -> numpy.ndarray:
    """The documents of `indices` whose first token lies in [start, end) of their total length: consecutive
    ranges partition the documents, so phases given [0, l) and [l, 1) never share one."""
    sizes = lengths[indices].astype(numpy.int64)
    total = max(int(sizes.sum()), 1)
    first_token = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]]) / total
    return indices[(first_token >= start) & (first_token < end)]


class PatchGPTDataset(GPTDataset):
    config: PatchGPTDatasetConfig

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        if index_split == Split.train and tuple(config.train_data_range) != (0.0, 1.0):
            indexed_indices = documents_in_range(indexed_indices, indexed_dataset.sequence_lengths,
                                                 *config.train_data_range)
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str], config: PatchGPTDatasetConfig):
        if dataset_path is None:  # megatron-core's builder with no blend: --mock-data
            return MockPatchView(config.tokenizer, config.patch_size, config.pad_id)
        return PatchView(GPTDataset.build_low_level_dataset(dataset_path, config), config.patch_size)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return GPTDataset._key_config_attributes() + ["patch_size", "pad_id", "train_data_range"]

    def _get_num_epochs(self, num_tokens_per_epoch: int) -> int:
        # megatron-core loops forever when samples are requested from a split without documents.
        if num_tokens_per_epoch == 0:
            if self.num_samples:
                rule = f" of --split {self.config.split}" if self.config.split else ""  # None: per-split paths
                raise DataError(
                    f"{self.dataset.path_prefix}: the {self.index_split.name} split{rule} has no "
                    f"documents ({len(self.dataset)} in the dataset) but {self.num_samples} samples are needed from "
                    f"it; {'change --split or ' if self.config.split else ''}use more data"
                )
            return 1
        return super()._get_num_epochs(num_tokens_per_epoch)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        patches = sample_tokens(self, idx)  # [T+1, K]
        patches = torch.from_numpy(patches).long()
        tokens = patches[:-1].reshape(-1)
        labels = patches[1:].reshape(-1)
        loss_mask = (labels != self.config.pad_id).float()
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def build_datasets(
    prefixes: List[str],
    weights: Optional[List[float]],
    split: str,
    tokenizer,
    patch_size: int,
    num_patches: int,
    num_samples: List[int],
    seed: int,
    pad_id: int,
    cache_path: Optional[str],
    is_built_on_rank,
    train_data_range: Tuple[float, float] = (0.0, 1.0),
    blend_per_split: Optional[list] = None,
):
    """train/valid/test PatchGPTDatasets (None where a split is empty), via megatron-core's builder, from the blend
    `prefixes`/`weights` divided by `split`, or from `blend_per_split` (one (prefixes, weights) or None per split,
    `prefixes` empty); neither: its mock documents (--mock-data)."""
    per_split_prefixes = [prefix for blend in blend_per_split or [] if blend for prefix in blend[0]]
    for prefix in dict.fromkeys([*prefixes, *per_split_prefixes]):
        checked_dataset(prefix)
    config = PatchGPTDatasetConfig(
        random_seed=seed,
        sequence_length=num_patches,
        blend=(prefixes, weights) if prefixes else None,
        blend_per_split=blend_per_split,
        split=None if blend_per_split else split,
        path_to_cache=cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        patch_size=patch_size,
        pad_id=pad_id,
        train_data_range=tuple(train_data_range),
    )
    return BlendedMegatronDatasetBuilder(PatchGPTDataset, num_samples, is_built_on_rank, config).build()


def dataset_sizes(prefixes: List[str], weights: Optional[List[float]]) -> List[dict]:
    """Fingerprint of a --data-path blend: weight, documents and tokens of each dataset."""
    sizes = []
    for i, prefix in enumerate(prefixes):
        header, num_tokens = checked_dataset(prefix)
        sizes.append({"weight": weights[i] if weights else None, "documents": header.num_sequences,
                      "tokens": num_tokens})
    return sizes


def alignment_pad_id(prefixes: List[str], tokenizer) -> int:
    """The id preprocessing padded documents with (their sidecars; the tokenizer's pad id for datasets without
    one): labels equal to it get no loss. Datasets of one blend must agree."""
    sidecars = [read_sidecar(prefix) for prefix in prefixes]
    for prefix, sidecar in zip(prefixes, sidecars):
        written_with = (sidecar or {}).get("tokenizer_sha256")
        if written_with and written_with != tokenizer.fingerprint:
            raise DataError(f"--data-path {prefix}: tokenized with another tokenizer than this run's (its sidecar's "
                            f"tokenizer_sha256 {written_with[:12]}..., this run's {tokenizer.fingerprint[:12]}...); "
                            f"preprocess it with this tokenizer or pass the one it was made with")
    ids = {s["pad_id"] for s in sidecars if s and s.get("patch_size", 1) > 1}
    if len(ids) > 1:
        raise DataError(f"--data-path: the datasets were padded with different pad ids {sorted(ids)}; "
                        f"preprocess them with one --pad-id")
    return ids.pop() if ids else tokenizer.pad


def datasets_for(cfg: TrainingConfig, tokenizer, samples: Optional[list] = None):
    """The (train, valid, test) PatchGPTDatasets a run of `cfg` reads (None where a split is empty); `samples`:
    other sample counts than the run's."""
    data = cfg.data
    prefixes, weights, per_split = [], None, None
    if data.per_split:
        per_split = [parse_blend(values, flag) if values else None for flag, values in data.blends().values()]
    else:
        prefixes, weights = parse_blend(data.data_path)
    train, valid, test = build_datasets(
        prefixes, weights, data.split, tokenizer, cfg.patch_size, cfg.num_patches, samples or num_samples(cfg),
        cfg.seed, alignment_pad_id(data.prefixes(), tokenizer), data.data_cache_path, lambda: True,
        data.train_data_range, per_split,
    )
    return train, valid, test


def num_samples(cfg: TrainingConfig) -> list:
    """Samples of the train, validation and test datasets a run builds (the validation samples depend on it)."""
    evals = cfg.train_iters // cfg.eval_interval + 1 if cfg.eval_interval else 1  # None: the final one only
    return [
        cfg.train_iters * cfg.global_batch_size,
        evals * cfg.eval_iters * cfg.global_batch_size,
        0,  # the test split is never read during training
    ]


class MicroBatchSampler:
    """Megatron's pretraining sampler: samples in order from `consumed_samples`; each round of
    micro_batch_size * DP samples is split across the data-parallel ranks."""

    def __init__(self, total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size):
        self.total, self.consumed = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        round_size = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed, self.total - round_size + 1, round_size):
            yield list(range(first + start, first + start + self.micro_batch_size))


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int, seed: int):
    """An iterator over this data-parallel rank's micro-batches, from `consumed_samples` on."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return iter(
        torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
            # Its own generator: a new iterator draws a seed, which from the global one would shift the dropout
            # stream of a resumed run (its iterators are made at another point of that stream).
            generator=torch.Generator().manual_seed(seed),
        )
    )
