"""Token-level evaluation of any checkpoint this project writes (tools/evaluate.py).

The question patch-level training must answer is whether its model predicts TOKENS as well as a token-level one,
so every checkpoint, phase 1 (K>1) included, is scored at K=1: the same weights read one token per position
(PatchGPTModel has the same parameters for every K). A phase-1 checkpoint also gets its patch-level loss at its K
on the dataset, comparable with its training log.

Sources:
  dataset  a split of a --data-path blend built exactly as the trainer builds it (same seed, split and sample
           count), so `valid` gives the trainer's validation loss for the same samples; `all` reads every token of
           each dataset once.
  text     JSONL/.txt documents tokenized here; each document is read as [EOD] + its tokens (EOD is what precedes a
           document in training) and every token is predicted once, in windows of --seq-length positions that
           advance by --stride (HF's strided perplexity: a token's context is what its window holds).

Scores: loss (mean nats per predicted token), perplexity, tokens, and bits per byte = summed nats / ln 2 / UTF-8
bytes, which compares models with different tokenizers. For text the bytes are the documents'; for a dataset they
are the bytes of the predicted tokens' pieces (SentencePiece's "▁" as a space, a byte piece as one byte).

The model runs in this process group's layout (TP, PP; data parallelism splits the samples), resharded from
whatever layout wrote the checkpoint, in fp32.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state

from megatron_patch.checkpoint.guards import locate
from megatron_patch.checkpoint.model_chunks import model_chunks
from megatron_patch.config.schema import SPLITS, ConfigError, ParallelConfig, TrainingConfig, token_level_view
from megatron_patch.config.tokenizer import TokenizerSpec
from megatron_patch.data.corpus import expand_inputs, read_documents
from megatron_patch.data.dataset import datasets_for, micro_batches, num_samples
from megatron_patch.data.tokenizers.wrappers import build_tokenizer
from megatron_patch.distributed.step import global_loss_totals, run_schedule
from megatron_patch.errors import MegatronPatchError
from megatron_patch.method.model import transformer_config


class EvaluationError(MegatronPatchError, ValueError):
    """A checkpoint, dataset or text that cannot be evaluated; reported as one line."""


@dataclass
class Scores:
    nll: float  # summed over the predicted tokens, in nats
    tokens: int
    num_bytes: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> Optional[float]:
        return self.nll / math.log(2) / self.num_bytes if self.num_bytes else None

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "bytes": self.num_bytes,
                "bits_per_byte": self.bits_per_byte}


class CheckpointModel:
    """A checkpoint's model chunks for this rank of the current layout, with its weights, in eval mode."""

    def __init__(self, root: str, iteration: Optional[int], parallel: ParallelConfig, tokenizer: TokenizerSpec):
        checkpoint = locate(root, iteration)
        self.saved, self.iteration = checkpoint.training_config, checkpoint.iteration
        self.tokenizer = build_tokenizer(tokenizer)
        config = transformer_config(self.saved.model, parallel)  # fp32: evaluation is not where to save memory
        self.chunks = model_chunks(self.saved.model, parallel, self.tokenizer.vocab_size, 1, config,
                                   weights_from=checkpoint.directory)
        for chunk in self.chunks:
            chunk.eval()

    @torch.no_grad()
    def score(self, dataset, count: int, micro_batch_size: int, patch_size: int, byte_lengths) -> Scores:
        """The first `count` samples of `dataset` (a multiple of micro_batch_size x data-parallel size) read at
        patch size K (1 = token level)."""
        for chunk in self.chunks:
            chunk.patch_size = patch_size
        dp_size = parallel_state.get_data_parallel_world_size()
        num_microbatches = count // (micro_batch_size * dp_size)
        iterators = [micro_batches(dataset, 0, micro_batch_size, parallel_state.get_data_parallel_rank(), dp_size,
                                   0, self.saved.seed) for _ in self.chunks]
        positions = len(dataset[0]["tokens"]) // patch_size
        entries = run_schedule(self.chunks, iterators, num_microbatches, positions, micro_batch_size, True)
        nll, tokens = global_loss_totals(entries, num_microbatches)
        lengths = torch.tensor(byte_lengths, dtype=torch.float64)
        num_bytes = sum(float((lengths[dataset[i]["labels"]] * dataset[i]["loss_mask"]).sum()) for i in range(count))
        return Scores(nll, tokens, int(num_bytes))


def text_windows(ids: List[int], length: int, stride: int) -> List[tuple]:
    """(tokens, labels, number of leading labels already predicted by an earlier window) of every window over one
    document's ids: tokens ids[b:b+L], labels ids[b+1:b+L+1], b = 0, S, 2S, ... until the last id is a label."""
    windows, predicted_until, begin = [], 0, 0
    while predicted_until < len(ids) - 1:
        end = min(begin + length, len(ids) - 1)
        windows.append((ids[begin:end], ids[begin + 1:end + 1], max(predicted_until - begin, 0)))
        predicted_until, begin = end, begin + stride
    return windows


class WindowDataset(torch.utils.data.Dataset):
    """Text windows as the trainer's samples: padded to `length` positions, loss only on newly predicted labels."""

    def __init__(self, windows: List[tuple], length: int, pad_id: int, multiple: int):
        self.samples = [self._sample(tokens, labels, known, length, pad_id) for tokens, labels, known in windows]
        empty = self._sample([], [], 0, length, pad_id)
        self.samples += [empty] * (-len(self.samples) % multiple)  # whole micro-batches on every rank

    @staticmethod
    def _sample(tokens, labels, known, length, pad_id):
        pad = length - len(tokens)
        mask = [0.0] * known + [1.0] * (len(labels) - known) + [0.0] * pad
        return {"tokens": torch.tensor(tokens + [pad_id] * pad, dtype=torch.long),
                "labels": torch.tensor(labels + [pad_id] * pad, dtype=torch.long),
                "loss_mask": torch.tensor(mask)}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


@dataclass
class EvaluationRequest:
    """What to evaluate; None means: as the checkpoint's run did."""

    root: str
    iteration: Optional[int] = None
    split: Optional[str] = None  # train / valid / test / all (dataset source)
    text: Optional[List[str]] = None  # files (text source)
    json_key: str = "text"
    data_path: Optional[List[str]] = None
    data_cache_path: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None  # the tokenizer flags given (the rest: the run's)
    seq_length: Optional[int] = None  # token-level positions (default: the run's positions per sample)
    stride: Optional[int] = None
    micro_batch_size: int = 1
    eval_iters: Optional[int] = None
    global_batch_size: Optional[int] = None
    parallel: ParallelConfig = None


def evaluate(request: EvaluationRequest, tokenizer: TokenizerSpec) -> dict:
    """Scores of a checkpoint on a dataset split or on text; collective over the process group."""
    model = CheckpointModel(request.root, request.iteration, request.parallel, tokenizer)
    saved = model.saved
    length = request.seq_length or saved.num_patches
    result = {"checkpoint": request.root, "iteration": model.iteration, "patch_size_trained": saved.patch_size,
              "seq_length": length}
    dp_size = parallel_state.get_data_parallel_world_size()
    if request.text:
        stride = request.stride or length
        if not 0 < stride <= length:
            raise ConfigError(f"--stride {stride} must be between 1 and --seq-length {length}")
        texts = [text for _, _, text in read_documents(expand_inputs(request.text), request.json_key)]
        windows = [w for text in texts
                   for w in text_windows([model.tokenizer.eod] + model.tokenizer.tokenize(text), length, stride)]
        num_bytes = sum(len(text.encode()) for text in texts)
        dataset = WindowDataset(windows, length, max(model.tokenizer.pad, 0), request.micro_batch_size * dp_size)
        scores = model.score(dataset, len(dataset), request.micro_batch_size, 1, model.tokenizer.piece_byte_lengths())
        scores.num_bytes = num_bytes
        result.update(source="text", inputs=request.text, stride=stride, token_level=scores.to_dict())
        return result
    result.update(source="dataset", split=request.split or "valid")
    token_view = token_level_view(saved)
    if length != token_view.seq_length:  # other positions per sample: as many tokens per batch as the run read
        token_view.seq_length, token_view.global_batch_size = length, max(saved.tokens_per_step // length, 1)
    result["token_level"] = _score_dataset(model, request, token_view).to_dict()
    if saved.patch_size > 1:
        result["patch_level"] = dict(_score_dataset(model, request, saved).to_dict(), patch_size=saved.patch_size)
    return result


def _score_dataset(model: CheckpointModel, request: EvaluationRequest, view: TrainingConfig) -> Scores:
    """A split of the dataset as a run of `view` builds it (the trainer validates a patch-level phase at K=1 on
    config.token_level_view of its config: the same samples)."""
    cfg = copy.deepcopy(view)
    if request.data_path:
        cfg.data.read_only(request.data_path)
    cfg.data.data_cache_path = request.data_cache_path
    cfg.global_batch_size = request.global_batch_size or cfg.global_batch_size
    cfg.eval_iters = request.eval_iters or cfg.eval_iters
    dp_size = parallel_state.get_data_parallel_world_size()
    split = request.split or "valid"
    byte_lengths = model.tokenizer.piece_byte_lengths()
    if split == "all":
        total = Scores(0.0, 0, 0)
        for prefix in cfg.data.prefixes():
            # Every token of every dataset once: asked for one sample of one split, megatron builds one epoch.
            cfg.data.read_only([prefix])
            cfg.data.split, cfg.data.train_data_range = "1,0,0", (0.0, 1.0)
            dataset = datasets_for(cfg, model.tokenizer, samples=[1, 0, 0])[0]
            epoch = _whole_batches(len(dataset), request.micro_batch_size * dp_size)
            if epoch == 0:
                raise EvaluationError(f"{prefix}: fewer than {request.micro_batch_size * dp_size} samples of "
                                      f"{cfg.seq_length} tokens")
            scores = model.score(dataset, epoch, request.micro_batch_size, cfg.patch_size, byte_lengths)
            total = Scores(total.nll + scores.nll, total.tokens + scores.tokens, total.num_bytes + scores.num_bytes)
        return total
    if cfg.global_batch_size % (request.micro_batch_size * dp_size):
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not divisible by --micro-batch-size "
                          f"{request.micro_batch_size} x data-parallel size {dp_size}")
    samples = num_samples(cfg)
    samples[2] = cfg.eval_iters * cfg.global_batch_size  # the test split, which training never reads
    dataset = dict(zip(SPLITS, datasets_for(cfg, model.tokenizer, samples)))[split]
    if dataset is None:
        given = f"no --{split}-data-path" if cfg.data.per_split else f"--split {cfg.data.split}"
        raise EvaluationError(f"--split-name {split}: {given} gives it no documents")
    count = cfg.eval_iters * cfg.global_batch_size
    return model.score(dataset, min(count, _whole_batches(len(dataset), request.micro_batch_size * dp_size)),
                       request.micro_batch_size, cfg.patch_size, byte_lengths)


def _whole_batches(num_samples_available: int, round_size: int) -> int:
    return num_samples_available // round_size * round_size
