"""The plateau gauge: the loss of a context-free predictor on the patch-level objective.

Phase 1's loss at position i is the mean over k of -log p(token_{(i+1)K+k}) under ONE distribution p. A predictor
that ignores the context does best with p = the frequencies of the target tokens, and then scores their unigram
entropy H(q) = -sum_t q(t) log q(t) (nats). A phase-1 loss near H(q) means the model has learned token frequencies
and little else (RESULTS.md: at CPU scale it stays there). Over a blend, q is the mixture of the datasets'
frequencies with the blend's weights, as the samples are drawn. Labels equal to the alignment padding get no loss
and are left out. The frequencies are each dataset's whole (its validation documents and a plan's other phase
included): a few percent of the documents, which move the entropy little.

The counts come from each dataset's sidecar (tools/preprocess_data.py writes them); a dataset without them is
counted once from its .bin, streamed, and the counts cached under --data-cache-path (else beside the dataset).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import List, Optional

import numpy

from megatron_patch.data.indexed import TOKEN_COUNTS, add_token_counts, check_dataset, read_sidecar

_CHUNK = 1 << 26  # tokens per step of a streamed count


def token_counts(prefix: str, cache_dir: Optional[str] = None) -> numpy.ndarray:
    """Occurrences of each token id in the dataset `prefix` (sidecar, cache, or counted from the .bin)."""
    sidecar = read_sidecar(prefix) or {}
    if TOKEN_COUNTS in sidecar:
        return numpy.asarray(sidecar[TOKEN_COUNTS], dtype=numpy.int64)
    stat = os.stat(prefix + ".bin")
    key = hashlib.sha256(f"{os.path.abspath(prefix)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir or os.path.dirname(os.path.abspath(prefix)),
                         f"{os.path.basename(prefix)}.{key}.token_counts.npy")
    if os.path.exists(cache):
        return numpy.load(cache)
    header, num_tokens = check_dataset(prefix)
    tokens = numpy.memmap(prefix + ".bin", header.dtype, "r", 0, (num_tokens,)) if num_tokens else []
    counts = numpy.zeros(0, numpy.int64)
    started = last_report = time.time()
    for start in range(0, num_tokens, _CHUNK):
        counts = add_token_counts(counts, numpy.asarray(tokens[start:start + _CHUNK]))
        if time.time() - last_report > 10:
            last_report = time.time()
            done = min(start + _CHUNK, num_tokens)
            print(f"counting the tokens of {prefix}.bin (no counts in its sidecar): {done:,} of {num_tokens:,} "
                  f"({100 * done / num_tokens:.0f}%, {time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    partial = f"{cache}.tmp-{os.getpid()}.npy"
    numpy.save(partial, counts)
    os.replace(partial, cache)
    return counts


def unigram_entropy(counts: List[numpy.ndarray], weights: Optional[List[float]] = None,
                    ignored_id: Optional[int] = None) -> float:
    """H (nats) of the mixture of the datasets' token frequencies with `weights` (default: equal), leaving out
    `ignored_id`."""
    size = max(len(c) for c in counts)
    weights = weights or [1.0] * len(counts)
    mixture = numpy.zeros(size)
    for weight, c in zip(weights, counts):
        c = numpy.pad(c.astype(numpy.float64), (0, size - len(c)))
        if ignored_id is not None and 0 <= ignored_id < size:
            c[ignored_id] = 0
        mixture += weight / sum(weights) * c / c.sum()
    q = mixture[mixture > 0]
    return float(-(q * numpy.log(q)).sum())


def context_free_bound(prefixes: List[str], weights: Optional[List[float]], pad_id: Optional[int],
                       cache_dir: Optional[str] = None) -> float:
    """The unigram entropy of the blend `prefixes` with megatron-core's `weights`; without weights megatron-core
    draws from the datasets in proportion to their sizes, so their token counts weigh them."""
    counts = [token_counts(prefix, cache_dir) for prefix in prefixes]
    if weights is None:
        weights = [float(c.sum()) for c in counts]
    return unigram_entropy(counts, weights, pad_id)
