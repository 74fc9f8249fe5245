"""The training log in JSON lines (`--log-json`): one record per step, `{"summary": ...}` when a phase ends.
A resumed run appends to the same file and logs again the steps it redoes; readers keep the last record of each
iteration. No torch: plots, job scripts and tests read logs anywhere.

  python -m megatron_patch.training.json_log LOG.jsonl   prints the last summary's iteration and train_iters
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional


class JsonLinesLog:
    """Appends records to `path` (created with its directory), flushed after each: a crash loses nothing logged."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonLinesLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps(path: str) -> Dict[int, dict]:
    """iteration -> the last step record logged for it, in iteration order."""
    by_iteration = {r["iteration"]: r for r in read_records(path) if "iteration" in r and "summary" not in r}
    return dict(sorted(by_iteration.items()))


def summaries(path: str) -> List[dict]:
    return [r["summary"] for r in read_records(path) if "summary" in r]


def last_summary(path: str) -> Optional[dict]:
    found = summaries(path)
    return found[-1] if found else None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m megatron_patch.training.json_log LOG.jsonl")
    summary = last_summary(argv[0]) if os.path.isfile(argv[0]) else None
    if summary is None:
        sys.exit(f"{argv[0]}: no phase summary")
    print(summary["iteration"], summary["train_iters"])


if __name__ == "__main__":
    main()
