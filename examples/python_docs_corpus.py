#!/usr/bin/env python3
"""A small corpus of real English text that every Python installation carries, offline.

Documents: the Python Language Reference topics that ship in the standard library (`pydoc_data.topics`, the
text `help()` shows) and the docstrings of every pure-Python standard-library module. Written by the CPython
developers; licensed under the Python Software Foundation License Version 2 (see LICENSE in the CPython
distribution, e.g. `python -c "import sys; print(sys.base_prefix)"`/lib/python3.X/LICENSE.txt).

  python examples/python_docs_corpus.py --output corpus.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pydoc_data.topics
import sysconfig

MIN_CHARS = 200


def stdlib_module_docs():
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        # Tests and vendored packages are not prose; keep the walk deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idle_test"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, definitions)]
            docs = [ast.get_docstring(n) for n in nodes]
            text = "\n\n".join(d for d in docs if d)
            if len(text) >= MIN_CHARS:
                yield os.path.relpath(path, root), text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    count, chars = 0, 0
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for topic in sorted(pydoc_data.topics.topics):
            text = pydoc_data.topics.topics[topic]
            out.write(json.dumps({"source": f"pydoc_data.topics:{topic}", "text": text}) + "\n")
            count, chars = count + 1, chars + len(text)
        for source, text in stdlib_module_docs():
            out.write(json.dumps({"source": source, "text": text}) + "\n")
            count, chars = count + 1, chars + len(text)
    os.replace(tmp, args.output)
    print(f"wrote {count} documents, {chars / 1e6:.1f}M characters of Python documentation to {args.output}")


if __name__ == "__main__":
    main()
