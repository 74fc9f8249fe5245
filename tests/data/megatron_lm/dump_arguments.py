"""Writes arguments.json: every flag of Megatron-LM's pretraining parser (megatron/training/arguments.py) with its
action, default and choices, as the tests compare ours with them. Run with Megatron-LM's checkout first on the
path and a Python where its megatron-core imports (here: .venv-py312, megatron-core 0.19.2):

  git -C Megatron-LM checkout d98e8a64ddf34856e74b24714e3bedb2f5a39553
  cd Megatron-LM && ../.venv-py312/bin/python ../tests/data/megatron_lm/dump_arguments.py \
      > ../tests/data/megatron_lm/arguments.json
"""

import argparse
import enum
import json
import subprocess
import sys

sys.argv = [sys.argv[0]]
sys.path.insert(0, ".")  # the checkout's megatron/, not an installed one
import megatron.training.arguments as arguments  # noqa: E402

parsers = []
parse_known_args = argparse.ArgumentParser.parse_known_args


def remember(self, *args, **kwargs):
    parsers.append(self)
    return parse_known_args(self, *args, **kwargs)


argparse.ArgumentParser.parse_known_args = remember
arguments.parse_args(ignore_unknown_args=True)


def plain(value):
    if isinstance(value, enum.Enum):
        return value.name
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
rows = [dict(flags=a.option_strings, dest=a.dest, default=plain(a.default), action=type(a).__name__,
             nargs=plain(a.nargs), choices=[plain(c) for c in a.choices] if a.choices else None)
        for a in max(parsers, key=lambda p: len(p._actions))._actions if a.option_strings]
json.dump({"source": "https://github.com/NVIDIA/Megatron-LM megatron/training/arguments.py", "commit": commit,
           "arguments": rows}, sys.stdout, indent=0)
