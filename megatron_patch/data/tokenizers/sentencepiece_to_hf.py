"""A SentencePiece model as HuggingFace tokenizer files that encode exactly as SentencePiece does.

`save_hf_tokenizer(model, out_dir)` writes tokenizer.json (a `tokenizers.Tokenizer` built from the model's
protobuf), tokenizer_config.json, special_tokens_map.json and the model itself as tokenizer.model, so that
`AutoTokenizer.from_pretrained(out_dir)(text, add_special_tokens=False)["input_ids"]` is
`SentencePieceProcessor(model_file=model).encode(text)` and `decode(ids)` is SentencePiece's decode. No BOS/EOS is
added by default (our preprocessing adds none); "<s>" written in a text is text, as for SentencePiece.

Not transformers' converter: its LlamaTokenizer path returns no ids for our models, it orders merges by id rather
than score, and `normalizers.Precompiled` (its way to SentencePiece's normalisation table) rewrites a whole
grapheme by the rule of its first character ("ｅ" + U+0301 loses the accent). What is built here instead:

BPE. SentencePiece merges, anywhere in the normalised text (no pre-splitting), the adjacent pair whose
concatenation is the piece of best score; HF merges the pair of lowest rank. Merges are every split of every
normal piece into two normal pieces, ranked by the piece's score. (Splits of one piece get a fixed order where
SentencePiece takes the leftmost pair: that differs only if two overlapping pairs form the same piece at once,
which no test met: runs of every piece, random concatenations, two corpora.) Characters that are no piece become
byte pieces <0xXX> (byte fallback) or one <unk> per run, as in SentencePiece. User-defined symbols: added tokens
matched in the normalised text, as SentencePiece's BPE matches them.

Normalisation. "identity" is nothing. "nmt_nfkc"/"nfkc" is a table SentencePiece applies by longest match from the
left: NFKC of single characters (from a newer Unicode than HF's NFKC knows, keeping U+FF5E), compositions of
decomposed sequences, and (nmt_) control characters removed and other spaces made " ". Built from the model's own
table (`_table_steps`): HF's NFKC, before it one Precompiled pass (a table of single characters written here) and
literal replacements for what NFKC does not reproduce, private-use placeholders for what must not take part in
NFKC's compositions (removed controls, U+FF5E; restored after), and a placeholder wherever SentencePiece's match
certainly ends (two characters no rule has side by side) but NFKC would compose or reorder across ("ê" + U+0301
stays two characters). Every rule of the table and every character NFKC changes is then normalised both ways and
the model refused if one differs; the tests add random strings of letters, marks, jamo and odd characters.

Whitespace. remove_extra_whitespaces: leading spaces dropped, runs of spaces made one, trailing spaces (and
U+2581 left by an identity table) dropped. add_dummy_prefix: "▁" before non-empty text (without
remove_extra_whitespaces, before any text: a placeholder when the table can remove all of it). Spaces become "▁".

Decode: controls to nothing, <unk> to the model's unk surface (" ⁇ "), byte pieces to UTF-8, the dummy prefix's
"▁" dropped (every leading one with remove_extra_whitespaces), "▁" to " ". Differs from SentencePiece only for id
sequences no encode produces: byte pieces that are not UTF-8 (HF writes U+FFFD for each byte of the run) or
that spell "▁" (HF makes it a space), and, in a model without a "▁" piece, a leading <unk> (HF strips its space).

Refused (TokenizerExportError, one line naming the model file and the feature; nothing written): unigram models
(HF's Unigram finds control and byte pieces such as "<s>" or "<0x41>" inside text and adds scores in double
where SentencePiece rounds to float: they tokenize real text differently), char/word models, a custom
normalisation rule table (normalization_rule_tsv, names other than identity/nfkc/nmt_nfkc), a denormaliser,
treat_whitespace_as_suffix, escape_whitespaces off, unused pieces, user-defined symbols with add_dummy_prefix (HF
cannot put the dummy "▁" before a leading added token), byte_fallback without the 256 byte pieces, and a
normalisation table the check above finds different.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import struct
import unicodedata

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from megatron_patch.errors import MegatronPatchError

SPACE = "\u2581"  # SentencePiece's escaped whitespace
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type

# Private-use characters for placeholders during normalisation. An ESCAPE in the input is written ESCAPE + LITERAL
# first, so every ESCAPE the pipeline sees starts a placeholder and the input's own survive unchanged.
ESCAPE = "\ue000"
LITERAL = "\ue001"
BLOCK = "\ue002"  # placeholder for nothing: stops NFKC composing across a boundary SentencePiece has
DUMMY = "\ue003"  # placeholder for the dummy-prefix space (normalisation tables that can remove all text)
FIRST_CODE = 0xE004  # placeholders for characters kept out of NFKC, one per distinct result
SEPARATOR = "\uf8ff"  # separates the samples of the self-check (inert in both normalisers)


class TokenizerExportError(MegatronPatchError, ValueError):
    """The SentencePiece model cannot be expressed exactly as a HuggingFace tokenizer."""


def save_hf_tokenizer(model_path: str, out_dir: str) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and copy the .model as tokenizer.model)
    into out_dir (which exists). Raises TokenizerExportError when the model cannot be expressed exactly."""
    tokenizer, config, special = build_hf_tokenizer(model_path)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))


def check_same_ids(model_path: str, out_dir: str, texts) -> None:
    """Raise TokenizerExportError naming the first text (index and a short excerpt) whose ids differ between
    SentencePiece and AutoTokenizer.from_pretrained(out_dir); used by the export tool as a self-check."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=model_path)
    hf = AutoTokenizer.from_pretrained(out_dir)
    texts, start = iter(texts), 0
    while batch := list(itertools.islice(texts, 64)):
        for index, (text, expected, got) in enumerate(zip(batch, sp.encode(batch),
                                                          hf(batch, add_special_tokens=False)["input_ids"]), start):
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise TokenizerExportError(
                    f"{out_dir}: text {index} ({_excerpt(text)}) is tokenized differently from {model_path}: "
                    f"id {at} is {got[at] if at < len(got) else 'missing'}, SentencePiece's "
                    f"{expected[at] if at < len(expected) else 'missing'}")
        start += len(batch)


def build_hf_tokenizer(model_path: str):
    """(tokenizers.Tokenizer, tokenizer_config dict, special_tokens_map dict) for a SentencePiece model file."""
    with open(model_path, "rb") as f:
        proto = model_pb2.ModelProto()
        try:
            proto.ParseFromString(f.read())
        except Exception as e:  # protobuf's DecodeError
            reason = " ".join(str(e).split())
            raise TokenizerExportError(f"{model_path}: not a SentencePiece model ({reason})") from None

    def refuse(feature: str):
        feature = " ".join(feature.split())  # one line
        raise TokenizerExportError(f"{model_path}: {feature} has no exact HuggingFace tokenizer equivalent")

    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = list(proto.pieces)
    kinds = [p.type for p in pieces]
    if trainer.model_type == model_pb2.TrainerSpec.UNIGRAM:
        refuse("model_type UNIGRAM (HF's Unigram matches control and byte pieces inside text and sums scores in "
               "double, not float)")
    if trainer.model_type != model_pb2.TrainerSpec.BPE:
        refuse(f"model_type {model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}")
    if trainer.treat_whitespace_as_suffix:
        refuse("treat_whitespace_as_suffix")
    if not spec.escape_whitespaces:
        refuse("escape_whitespaces=false")
    if proto.HasField("denormalizer_spec") and (proto.denormalizer_spec.precompiled_charsmap
                                                or proto.denormalizer_spec.normalization_rule_tsv):
        refuse("a denormalizer")
    if UNUSED in kinds:
        refuse(f"unused piece {pieces[kinds.index(UNUSED)].piece!r}")
    if kinds.count(UNKNOWN) != 1:
        refuse(f"{kinds.count(UNKNOWN)} unknown pieces")
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    if user_defined and spec.add_dummy_prefix:
        refuse("user-defined symbols with add_dummy_prefix")
    byte_pieces = {p.piece for p in pieces if p.type == BYTE}
    if trainer.byte_fallback and byte_pieces != {f"<0x{b:02X}>" for b in range(256)}:
        refuse("byte_fallback without the 256 byte pieces")
    if len({p.piece for p in pieces}) != len(pieces):
        refuse("a repeated piece")

    table = []
    # A table can remove every character; SentencePiece still writes the dummy prefix then, unless it also
    # removes extra whitespace: the table's steps begin the text with a placeholder for it.
    dummy_placeholder = _normalization_table(proto, refuse) and spec.add_dummy_prefix
    dummy_placeholder &= not spec.remove_extra_whitespaces
    if spec.precompiled_charsmap:
        try:
            table = list(_table_steps(spec.precompiled_charsmap))
        except _Unsupported as e:
            refuse(str(e))
        if dummy_placeholder:  # after the input's own ESCAPEs are doubled, restored before they are undone
            table[1:1] = [normalizers.Prepend(ESCAPE + DUMMY)]
            table[-1:-1] = [normalizers.Replace(ESCAPE + DUMMY, " ")]
    steps = table + _whitespace_steps(spec, dummy_placeholder)
    for symbol in user_defined:
        if " " in symbol or normalizers.Sequence(steps).normalize_str(symbol) != symbol:
            refuse(f"user-defined symbol {symbol!r} that normalisation changes")

    unk = kinds.index(UNKNOWN)
    tokenizer = Tokenizer(_bpe(pieces, unk, trainer.byte_fallback))
    tokenizer.normalizer = normalizers.Sequence(steps) if steps else None
    tokenizer.decoder = _decoder(proto)
    # Control pieces and <unk> are not added tokens: added tokens are looked for in the text, where SentencePiece
    # sees only text (transformers marks them special from tokenizer_config.json, and its split_special_tokens
    # keeps them out of the text). User-defined symbols are added tokens matched in the normalised text, as
    # SentencePiece's BPE matches them.
    if user_defined:
        tokenizer.add_tokens([AddedToken(s, special=False, normalized=True) for s in user_defined])

    def piece(i: int):
        return pieces[i].piece if 0 <= i < len(pieces) else None

    special = {"bos_token": piece(trainer.bos_id), "eos_token": piece(trainer.eos_id),
               "unk_token": pieces[unk].piece, "pad_token": piece(trainer.pad_id)}
    special = {key: value for key, value in special.items() if value is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    return tokenizer, config, special


# ---- normalisation -------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """A feature of the model (its message) that has no exact HF equivalent."""


def _normalization_table(proto, refuse) -> bool:
    """Whether the model normalises with a rule table (nfkc, nmt_nfkc) rather than not at all (identity)."""
    spec = proto.normalizer_spec
    if spec.normalization_rule_tsv:
        refuse("a custom normalization rule table (normalization_rule_tsv)")
    if spec.name not in ("identity", "nfkc", "nmt_nfkc"):
        refuse(f"normalizer {spec.name!r}")
    if spec.name == "identity":
        if spec.precompiled_charsmap:
            refuse("an identity normalizer with a rule table")
        return False
    if not spec.precompiled_charsmap:
        refuse(f"normalizer {spec.name!r} without its rule table")
    return True


def _darts_offset(unit: int) -> int:
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


def _decode_charsmap(blob: bytes) -> dict:
    """SentencePiece's precompiled_charsmap: <uint32 trie size><darts-clone double array><results, NUL-ended>.
    A unit holds its label (low byte), a has-leaf bit (8) and the offset (bits 9-31) from its own index to its
    children's base: the child labelled b is at base ^ b, the leaf's value (an index into the results) at base.
    Children are found by inverting label positions (darts-clone shares suffix subtrees: bases repeat)."""
    (size,) = struct.unpack_from("<I", blob, 0)
    units = struct.unpack_from(f"<{size // 4}I", blob, 4)
    results = blob[4 + size:]
    children = {}
    for index, unit in enumerate(units):
        label = unit & ((1 << 31) | 0xFF)
        if 0 < label < 256:
            children.setdefault(index ^ label, []).append((label, index))
    rules, texts = {}, {}
    pending = [(_darts_offset(units[0]), b"")]
    while pending:
        base, prefix = pending.pop()
        for label, index in children.get(base, ()):
            key, child = prefix + bytes([label]), index ^ _darts_offset(units[index])
            if (units[index] >> 8) & 1:
                value = units[child] & ((1 << 31) - 1)
                if value not in texts:
                    texts[value] = results[value:results.index(b"\0", value)].decode()
                rules[key.decode()] = texts[value]
            pending.append((child, key))
    return rules


def _encode_charsmap(rules: dict) -> bytes:
    """A precompiled_charsmap (the format `_decode_charsmap` reads) holding `rules`: a plain double-array trie."""
    results, value_of = bytearray(), {}
    for value in sorted(set(rules.values())):
        value_of[value] = len(results)
        results += value.encode() + b"\0"
    root = {}
    for key, value in rules.items():
        node = root
        for byte in key.encode():
            node = node.setdefault(byte, {})
        node[None] = value_of[value]
    units, used, bases = {0: 0}, {0}, set()
    pending = [(root, 0)]
    while pending:
        node, index = pending.pop()
        labels = sorted(label for label in node if label is not None)
        slots = ([0] if None in node else []) + labels
        base = 1
        while base in bases or any(base ^ slot in used for slot in slots):
            base += 1
        bases.add(base)
        units[index] = units.get(index, 0) | ((index ^ base) << 10) | ((None in node) << 8)
        if None in node:
            units[base] = node[None] | (1 << 31)
            used.add(base)
        for label in labels:
            units[base ^ label] = label
            used.add(base ^ label)
            pending.append((node[label], base ^ label))
    array = [units.get(i, 0) for i in range((max(units) // 256 + 1) * 256)]  # whole blocks, as darts-clone writes
    return struct.pack(f"<I{len(array)}I", 4 * len(array), *array) + bytes(results)


@functools.lru_cache(maxsize=None)
def _unicode_roles():
    """(characters with a decomposition, characters NFKC may compose with what precedes them, characters canonical
    composition joins to a preceding one), per this Python's Unicode data. Skips blocks with none of these (CJK and
    Hangul syllables, surrogates, private use, unassigned planes)."""
    skip = [(0x3400, 0x4DC0), (0x4E00, 0xA000), (0xAC00, 0xD7A4), (0xD800, 0xF900), (0x20000, 0x2F800),
            (0x2FA20, 0xE0000), (0xF0000, 0x110000)]
    codes = [c for lo, hi in zip([0] + [h for _, h in skip], [lo for lo, _ in skip] + [0x110000])
             for c in range(lo, hi)]
    seconds = {chr(c) for c in range(0x1161, 0x1176)} | {chr(c) for c in range(0x11A8, 0x11C3)}  # Hangul V, T
    decomposable, marks = [], set()
    for code in codes:
        c = chr(code)
        mapping = unicodedata.decomposition(c)
        if mapping:
            decomposable.append(c)
            parts = mapping.split()
            if len(parts) == 2 and not mapping.startswith("<"):
                seconds.add(chr(int(parts[1], 16)))
        if unicodedata.combining(c):
            marks.add(c)
    composing = marks | seconds
    composing |= {c for c in decomposable if unicodedata.normalize("NFKD", c)[0] in composing}
    return frozenset(decomposable), frozenset(composing), frozenset(seconds)


def _char_class(chars, negate: bool = False) -> str:
    """A regex character class (onig syntax) of `chars`, as ranges."""
    codes = sorted({ord(c) for c in chars})
    ranges, start = [], None
    for i, code in enumerate(codes):
        if start is None:
            start = code
        if i + 1 == len(codes) or codes[i + 1] != code + 1:
            ranges.append(f"\\x{{{start:X}}}" if start == code else f"\\x{{{start:X}}}-\\x{{{code:X}}}")
            start = None
    return ("[^" if negate else "[") + "".join(ranges) + "]"


def _whitespace_steps(spec, dummy_placeholder: bool) -> list:
    """SentencePiece's remove_extra_whitespaces, add_dummy_prefix and escape_whitespaces, after the table."""
    steps = []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " "),
                  normalizers.Replace(Regex(r"[ \x{2581}]+\z"), "")]
    if spec.add_dummy_prefix and not dummy_placeholder:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return steps


@functools.lru_cache(maxsize=4)
def _table_steps(charsmap: bytes) -> tuple:
    """HF normalizers computing the rule table's longest-match normalisation (see the module docstring), checked
    against SentencePiece's own normaliser: the first doubles the input's ESCAPEs, the last undoes that. Raises
    _Unsupported when a rule cannot be reproduced."""
    try:
        rules = _decode_charsmap(charsmap)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError):
        raise _Unsupported("an unreadable precompiled_charsmap") from None
    singles = {k: v for k, v in rules.items() if len(k) == 1}
    multi = {k: v for k, v in rules.items() if len(k) > 1}
    bound = {c for k in multi for c in k}  # characters multi-character rules contain
    for c in (ESCAPE, LITERAL, BLOCK, DUMMY, SEPARATOR):
        if c in bound or c in singles:
            raise _Unsupported(f"a normalization rule for private-use U+{ord(c):04X}")
    decomposable, composing, seconds = _unicode_roles()
    nfkc = normalizers.NFKC()

    # Characters whose rule (or lack of one) HF's NFKC does not reproduce, and what replaces them before NFKC:
    # the rule's result, or a placeholder restored after NFKC when the result must not take part in NFKC's
    # compositions (removed characters, U+FF5E).
    candidates = sorted(set(singles) | decomposable)
    outputs = nfkc.normalize_str(SEPARATOR.join(candidates)).split(SEPARATOR)
    trie, literal, restores, isolated = {}, {}, {}, set()
    for c, output in zip(candidates, outputs):
        want = singles.get(c, c)
        if output == want:
            continue
        if want and not (unicodedata.combining(want[0]) or want[0] in seconds) and nfkc.normalize_str(want) == want:
            replacement = want
        elif c in bound:
            raise _Unsupported(f"the normalization rule for U+{ord(c):04X} inside composing rules")
        else:
            replacement = restores.setdefault(want, ESCAPE + chr(FIRST_CODE + len(restores)))
        # One Precompiled pass replaces them, character by character; it rewrites a whole grapheme by the rule
        # of its first character, so a BMP character is first cut off from what follows, unless a composing rule
        # contains it (then a literal replacement).
        if len(c.encode()) == 4 or c not in bound:
            trie[c] = replacement
            if len(c.encode()) < 4 and not (unicodedata.category(c) == "Cc" and c != "\r"):
                isolated.add(c)
        else:
            literal[c] = replacement
    if len(literal) + len(restores) > 200:
        raise _Unsupported(f"a normalization table that differs from NFKC on {len(literal) + len(restores)} results")

    # Where SentencePiece's matching certainly ends (between two characters no multi-character rule has next to
    # each other) and NFKC could compose or reorder across, a placeholder keeps the two apart. Per second
    # character: a lookbehind of the characters rules do put before it.
    preceding = {}
    for key in multi:
        for x, y in zip(key, key[1:]):
            preceding.setdefault(y, set()).add(x)
    seconds_by_firsts = {}
    for y, xs in preceding.items():
        seconds_by_firsts.setdefault(frozenset(xs), set()).add(y)
    branches = [f"(?={_char_class(composing - set(preceding))})"]
    branches += [f"(?={_char_class(ys)})(?<!{_char_class(xs)})" for xs, ys in
                 sorted(seconds_by_firsts.items(), key=lambda item: min(item[1]))]
    cuts = f"(?!\\A)(?={_char_class(composing | set(preceding))})(?:{'|'.join(branches)})"  # (HF fails on the start)
    if isolated:
        cuts += f"|(?<={_char_class(isolated)})"

    def assemble(fixes: dict) -> list:
        steps = [normalizers.Replace(ESCAPE, ESCAPE + LITERAL)]
        steps.append(normalizers.Replace(Regex(cuts), ESCAPE + BLOCK))
        for key in sorted(fixes, key=len, reverse=True):
            steps.append(normalizers.Replace(key, fixes[key]))
        steps += [normalizers.Replace(c, replacement) for c, replacement in sorted(literal.items())]
        if trie:
            steps.append(normalizers.Precompiled(_encode_charsmap(trie)))
        steps.append(nfkc)
        steps += [normalizers.Replace(code, want) for want, code in sorted(restores.items())]
        steps.append(normalizers.Replace(ESCAPE + BLOCK, ""))
        steps.append(normalizers.Replace(ESCAPE + LITERAL, ESCAPE))
        return steps

    # Multi-character rules NFKC does not compose (scripts newer than HF's Unicode data): literal replacements.
    keys = sorted(multi)
    unfixed = _normalize_samples(assemble({}), keys)
    fixes = {k: multi[k] for k, have in zip(keys, unfixed) if have != multi[k]}
    if len(fixes) > 200:
        raise _Unsupported(f"{len(fixes)} multi-character normalization rules that NFKC does not reproduce")
    steps = assemble(fixes)

    # The check: every rule's source and every character NFKC changes, each alone, against SentencePiece (the
    # rules' sources already went through the steps without the fixes: again only those the fixes can change).
    spec = model_pb2.NormalizerSpec(name="check", precompiled_charsmap=charsmap, add_dummy_prefix=False,
                                    remove_extra_whitespaces=False, escape_whitespaces=False)
    reference = spm.SentencePieceNormalizer(normalizer_spec=spec.SerializeToString())
    touched = re.compile("|".join(map(re.escape, sorted(fixes, key=len, reverse=True)))) if fixes else None
    samples = sorted(set(candidates) - set(multi)) + [k for k in keys if touched and touched.search(k)]
    expected = dict(zip(keys, unfixed))
    expected.update(zip(samples, _normalize_samples(steps, samples)))
    samples = sorted(set(rules) | set(candidates))
    for sample, want in zip(samples, reference.normalize(SEPARATOR.join(samples)).split(SEPARATOR)):
        if want != expected[sample]:
            raise _Unsupported(f"the normalization of {sample!r} (SentencePiece {want!r}, HF {expected[sample]!r})")
    return tuple(steps)


def _normalize_samples(steps: list, samples: list) -> list:
    """Each sample normalised alone by `steps`, a thousand per call."""
    sequence = normalizers.Sequence(steps)
    got = []
    for start in range(0, len(samples), 1000):  # HF's steps slow down on long texts: a thousand at a time
        got += sequence.normalize_str(SEPARATOR.join(samples[start:start + 1000])).split(SEPARATOR)
    if len(got) != len(samples):
        raise _Unsupported("normalization steps that join the samples of the check")
    return got


# ---- model and decoder ---------------------------------------------------------------------------------------


def _bpe(pieces, unk: int, byte_fallback: bool):
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type == NORMAL}
    merges = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL:
            continue
        w = p.piece
        for cut in range(len(w) - 1, 0, -1):
            if w[:cut] in mergeable and w[cut:] in mergeable:
                merges.append((-p.score, i, len(w) - cut, (w[:cut], w[cut:])))  # best score, then longer left
    merges.sort(key=lambda m: m[:3])
    return models.BPE(vocab=vocab, merges=[m[3] for m in merges], unk_token=pieces[unk].piece,
                      fuse_unk=True, byte_fallback=byte_fallback)


def _decoder(proto):
    """Pieces to text as SentencePiece decodes: controls to nothing, <unk> to its surface, "▁" to " ", byte pieces
    to UTF-8, the dummy prefix's space dropped (every leading one with remove_extra_whitespaces)."""
    spec, pieces = proto.normalizer_spec, proto.pieces
    specials = {p.piece: "" for p in pieces if p.type == CONTROL}
    specials.update({p.piece: proto.trainer_spec.unk_surface for p in pieces if p.type == UNKNOWN})
    others = [p.piece for p in pieces if p.piece not in specials]
    steps = [decoders.Replace(piece, surface) for piece, surface in sorted(specials.items(), key=lambda s: -len(s[0]))
             if not any(piece in other for other in others)]  # Replace works inside each piece
    # "▁" stays "▁" until the dummy prefix's is stripped, so spaces from <unk> or bytes stay; byte pieces never
    # spell "▁" then, as it is a piece. In a model without that piece they can, and must stay "▁": the other order.
    late = any(p.piece == SPACE and p.type == NORMAL for p in pieces)
    steps += [] if late else [decoders.Replace(SPACE, " ")]
    steps += [decoders.ByteFallback(), decoders.Fuse()]
    strip = SPACE if late else " "
    if spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(strip, 1 << 20, 0))
    elif spec.add_dummy_prefix:
        steps.append(decoders.Strip(strip, 1, 0))
    steps += [decoders.Replace(SPACE, " ")] if late else []
    return decoders.Sequence(steps)


def _excerpt(text: str, width: int = 40) -> str:
    return repr(text[:width] + ("..." if len(text) > width else ""))
