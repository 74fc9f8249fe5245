"""Is there anything above the unigram plateau for phase 1 to learn? (RESULTS.md, "Leaving the plateau")

Two references on the patch-level objective (the mean over k of -log p(token_{(i+1)K+k}) under one distribution per
patch), trained and scored on a preprocessed dataset without the trainer:
  - unigram: the training tokens' frequencies (ignores the context; the plateau the trainer's gauge reports);
  - bag: patch i's K token ids -> the mean of their embeddings -> one linear layer -> softmax, i.e. phase 1's input
    and output layers with no transformer between them; it sees only patch i.
The stream of tokens is cut into sequences of K*T tokens; the last `--valid-fraction` of it is held out. Labels
equal to the alignment pad get no loss, as in the trainer.

    python examples/plateau_reference.py --data-path runs/quickstart/docs_text_document --patch-size 4
"""

import argparse
import json

import numpy
import torch

from megatron_patch.data.indexed import check_dataset, read_sidecar
from megatron_patch.method.patching import patch_cross_entropy, patchify


def patch_batches(tokens: numpy.ndarray, patch_size: int, patches: int):
    """(inputs, labels), each [sequences, T*K]: T patches, and for patch i the K tokens of patch i+1."""
    length = patch_size * (patches + 1)
    count = len(tokens) // length
    sequences = torch.from_numpy(tokens[:count * length].astype(numpy.int64)).view(count, length)
    return sequences[:, :-patch_size], sequences[:, patch_size:]


def k_target_loss(logits: torch.Tensor, labels: torch.Tensor, patch_size: int, pad_id: int) -> torch.Tensor:
    """The trainer's K-target loss (one softmax per patch scores its K labels), its pad labels left out."""
    per_label = patch_cross_entropy(logits, labels, patch_size)
    keep = labels != pad_id
    return (per_label * keep).sum() / keep.sum()


def bag_logits(embedding, output, inputs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[T, b, V]: the mean of each patch's K embeddings (the trainer's patchify) -> the linear layer."""
    return output(patchify(embedding(inputs).transpose(0, 1), patch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="a dataset prefix (tools/preprocess_data.py)")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--patches", type=int, default=256, help="patches per sequence (T)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    header, num_tokens = check_dataset(args.data_path)
    sidecar = read_sidecar(args.data_path) or {}
    vocab, pad_id = sidecar["vocab_size"], sidecar.get("pad_id", -1)
    tokens = numpy.memmap(args.data_path + ".bin", header.dtype, "r", 0, (num_tokens,))
    boundary = int(num_tokens * (1 - args.valid_fraction))
    train_x, train_y = patch_batches(tokens[:boundary], args.patch_size, args.patches)
    valid_x, valid_y = patch_batches(tokens[boundary:], args.patch_size, args.patches)

    counts = numpy.bincount(numpy.asarray(tokens[:boundary]), minlength=vocab).astype(numpy.float64)
    counts[pad_id] = 0
    log_unigram = torch.from_numpy(numpy.log(numpy.maximum(counts, 1e-12) / counts.sum())).float()
    unigram_logits = log_unigram.expand(args.patches, len(valid_x), vocab)
    unigram = k_target_loss(unigram_logits, valid_y, args.patch_size, pad_id).item()

    torch.manual_seed(args.seed)
    embedding = torch.nn.Embedding(vocab, args.hidden_size)
    output = torch.nn.Linear(args.hidden_size, vocab)
    torch.nn.init.normal_(embedding.weight, std=0.02)
    parameters = list(embedding.parameters()) + list(output.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(train_x), (args.batch_size,), generator=generator)
        loss = k_target_loss(bag_logits(embedding, output, train_x[rows], args.patch_size), train_y[rows],
                             args.patch_size, pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == args.steps:
            with torch.no_grad():
                valid = k_target_loss(bag_logits(embedding, output, valid_x, args.patch_size), valid_y,
                                      args.patch_size, pad_id).item()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "valid_loss": round(valid, 4)})
            print(f"bag model step {step:4d}: train {loss.item():.4f}, valid {valid:.4f} (unigram {unigram:.4f})")
    result = {"patch_size": args.patch_size, "unigram_valid_loss": round(unigram, 4),
              "bag_valid_loss": curve[-1]["valid_loss"], "lr": args.lr, "steps": args.steps,
              "valid_tokens": int(valid_y.numel()), "nats_below_unigram": round(unigram - curve[-1]["valid_loss"], 4),
              "curve": curve}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
