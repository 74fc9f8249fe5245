#!/usr/bin/env python3
"""An offline lm-evaluation-harness task from a JSONL corpus: sentence cloze, HellaSwag-style.

Each item is the start of a held-out document's sentence and four endings: the true one and three endings of
sentences from other documents; the model should give the true ending the highest likelihood (acc) or the highest
per-byte likelihood (acc_norm). Writes OUT/{name}.jsonl and OUT/{name}.yaml (data path absolute, so lm-eval finds
it from any directory):

  python examples/lm_eval_cloze_task.py --input corpus.jsonl --output tasks/ [--name python_docs_cloze]
  lm_eval --model hf --model_args pretrained=hf_model,dtype=float32 --include_path tasks/ --tasks python_docs_cloze

Runs without network (the task reads a local file; the model is a local directory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re


def sentences(text: str):
    """Plain sentences of a document: 8 to 40 words, split after a period."""
    for sentence in re.split(r"(?<=\.)\s+", " ".join(text.split())):
        if 8 <= len(sentence.split()) <= 40 and sentence.endswith(".") and sentence[0].isupper():
            yield sentence


def cloze_items(texts, count: int, seed: int):
    rng = random.Random(seed)
    pool = [(doc, s) for doc, text in enumerate(texts) for s in sentences(text)]
    rng.shuffle(pool)
    items = []
    for doc, sentence in pool:
        words = sentence.split()
        cut = len(words) // 2
        context, ending = " ".join(words[:cut]), " " + " ".join(words[cut:])
        others = [s for d, s in rng.sample(pool, 12) if d != doc]
        distractors = [" " + " ".join(s.split()[len(s.split()) // 2:]) for s in others][:3]
        if len(distractors) < 3 or ending in distractors:
            continue
        choices = [ending, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(ending)})
        if len(items) == count:
            break
    return items


YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL documents (key --json-key)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--output", required=True, help="directory for the task's .jsonl and .yaml")
    parser.add_argument("--name", default="python_docs_cloze")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    with open(args.input) as f:
        texts = [json.loads(line)[args.json_key] for line in f if line.strip()]
    items = cloze_items(texts, args.items, args.seed)
    if not items:
        parser.error(f"--input {args.input}: no sentences of 8 to 40 words to build items from")
    os.makedirs(args.output, exist_ok=True)
    data = os.path.abspath(os.path.join(args.output, f"{args.name}.jsonl"))
    with open(data, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    with open(os.path.join(args.output, f"{args.name}.yaml"), "w") as f:
        f.write(YAML.format(name=args.name, data=json.dumps(data)))
    print(f"wrote {len(items)} items: {data} and {args.name}.yaml (lm_eval --include_path {args.output} "
          f"--tasks {args.name})")


if __name__ == "__main__":
    main()
