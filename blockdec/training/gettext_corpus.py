"""Translation pairs from the installed gettext catalogs (`*.mo` files).

Every Debian-like system carries human translations of its programs'
messages: `/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo`, one compiled
catalog per program ("domain", e.g. `coreutils`) and language. A catalog maps
the English source strings (msgids) to their translations (msgstrs), so the
catalogs of one language are a small, real, English-<lang> parallel corpus
of user-interface text: menu items, error messages, option help.

    splits = load_pairs("en", "de")          # msgid -> German msgstr
    print(splits.summary())
    tok = train_translation_bpe(splits.train, vocab_size=8000)
    train = encode_pairs(tok, splits.train, max_source_len=64,
                         max_target_len=64)
    batches = PairBatches(train, batch_size=32, seed=0)
    batch = batches.batch(step)  # {"source": [32, 64], "target": [32, 65], ...}

Directions: "en" always means the msgid side. en->de pairs msgids with the
German msgstrs, de->en swaps them, and two other languages (de->fr) are
joined on (context, msgid, plural form) within the same domain.

Reading. `read_catalog` parses the .mo layout itself (`gettext.GNUTranslations`
merges contexts into keys and drops msgid_plural). Strings are decoded with the
charset the header entry declares (UTF-8 if it declares none); an entry that is
not valid in that charset is skipped, not decoded into U+FFFD, and counted
(`TranslationSplits.dropped["undecodable_entry"]`). The header (empty msgid)
and untranslated entries are skipped, and so are the system-dependent
strings ("%<PRIu64>") that revision 1 files keep in tables of their own. A
plural entry gives two pairs: (singular msgid, form 0) and (plural msgid,
form 1); form 1 is the "many" form in the usual two-form languages and is
used as is for languages with more forms (the Plural-Forms formula is not
evaluated).

Cleaning, in order, and why:
  1. Keyboard accelerators ("_File" for GTK, "&File" for Qt/KDE) are removed,
     since they are UI markup, not language: a marker is an accelerator when
     it is followed by a letter or digit, preceded by the start of the text,
     whitespace or punctuation (but not by `_ & $ % @ # . \\ * = +`, which
     join identifiers and escapes), and the non-space run that holds it
     holds no other `_` ("_NET_WM_NAME", "_http._tcp" are identifiers). A
     `&` that starts an entity ("&amp;", "&#38;") is not a marker, nor is a
     doubled "&&" or "__". A marker kind is removed only when the msgid
     holds exactly one such marker: from the msgid, and from a translation
     that holds exactly one marker followed by a letter or digit, wherever
     it sits, since translators put it inside words ("Ei_genschaften"). So
     "snake_case", "$_POST", "AT&T", "Q&A" and "Drag && drop" stay as they
     are, and a translation keeps its "_" when the msgid had none.
  2. Leading and trailing whitespace is stripped; inner newlines and tabs
     are kept (multi-line help texts are part of the data).
  3. Placeholders must agree: the multiset of printf conversions ("%s",
     "%5.2f" -> "f", "%ld" -> "ld", positional "%1$s" -> "s", "%X" -> "x",
     each "*" width counts as one more), Python "%(name)s", Qt "%1" and brace
     "{name}" / "{0}" must be equal on both sides ("%%", "{{", "}}" are
     literal text). A translation whose placeholders differ is broken (it
     would crash or print the wrong value), and a model should not learn it.
  4. Length: the source has at least `min_chars` characters (shorter strings
     are mostly single words and codes with no context) and both sides at
     most `max_chars`.

Splits are by catalog, so the test programs are unseen in training: a
domain's split is `data.split_of(f"{seed}/{domain}")`, a SHA-256 hash of the
seed and the domain name, the same on every machine. When there are at least
three domains, no split with a positive fraction is left empty: an empty
train split takes the largest domain of the biggest held-out split, an empty
valid or test split takes the smallest domain (fewest pairs, then name) of
the split with the most domains (train on ties). Only domains with at least
one pair after cleaning take part. Then, per split, exact
duplicate (source, target) pairs are kept once; a valid or test pair whose
source also occurs in train is dropped (the same string often sits in
several catalogs, e.g. gnulib's messages, iso_639 and iso_639-2); and in
valid and test a source keeps only its first target in sorted order, so each
held-out source has one reference. Every split is sorted by
(source, target, domain).

`write_mo` writes .mo files (tests build synthetic catalogs with it); its
code documents the file format.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import pathlib
import re
import struct
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from blockdec.training import data
from blockdec.training.tokenizers import BPETokenizer, train_bpe

DEFAULT_LOCALE_DIR = "/usr/share/locale"
ENGLISH = "en"  # The msgid side of every catalog.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # At ids PAD_ID, BOS_ID, EOS_ID.
DECODE_ERRORS = ("skip", "replace", "strict")

_MAGIC = 0x950412DE
_HEADER_BYTES = 28  # magic, revision, N, O, T, hash size, hash offset.
_CONTEXT_SEP = "\x04"
_PLURAL_SEP = "\x00"


# --------------------------------------------------------------------------
# Catalog entries and the .mo format.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One translated message of a catalog.

  For a plural entry `msgid_plural` is set and `plural_forms` holds every
  translated form (form 0 is also `msgstr`); otherwise they are None and ().
  """
  msgid: str
  msgstr: str
  context: str | None = None  # msgctxt, which disambiguates equal msgids.
  domain: str = ""  # The catalog's file stem, e.g. "coreutils".
  msgid_plural: str | None = None
  plural_forms: tuple[str, ...] = ()

  def __post_init__(self):
    if self.msgid_plural is None and self.plural_forms:
      raise ValueError(f"entry {self.msgid!r} has plural_forms="
                       f"{self.plural_forms!r} but no msgid_plural.")
    if self.msgid_plural is not None and (
        not self.plural_forms or self.plural_forms[0] != self.msgstr):
      raise ValueError(f"plural entry {self.msgid!r} needs plural_forms with "
                       f"form 0 equal to msgstr={self.msgstr!r}; got "
                       f"{self.plural_forms!r}.")

  @classmethod
  def plural(cls, msgid: str, msgid_plural: str, forms: Sequence[str],
             context: str | None = None, domain: str = "") -> "Entry":
    """A plural entry from its translated forms (form 0 first)."""
    forms = tuple(forms)
    return cls(msgid, forms[0] if forms else "", context, domain,
               msgid_plural, forms)


def read_catalog(path, *, errors: str = "skip") -> list[Entry]:
  """The translated entries of one .mo file, in file order.

  The header and untranslated entries are left out. `errors` says what to do
  with an entry that is not valid in the header's charset: "skip" it (the
  default), "replace" the bad bytes with U+FFFD, or "strict" (ValueError).
  Raises ValueError for a file that is not a .mo catalog.
  """
  return _read_catalog(path, errors)[0]


def _read_catalog(path, errors: str) -> tuple[list[Entry], int]:
  """(entries, number of entries skipped as undecodable)."""
  if errors not in DECODE_ERRORS:
    raise ValueError(f"errors={errors!r} is not supported; allowed: "
                     f"{DECODE_ERRORS}.")
  path = pathlib.Path(path)
  blob = path.read_bytes()
  if len(blob) < 20:
    raise ValueError(f"{path} is not a .mo catalog: it has {len(blob)} bytes, "
                     "fewer than the 20-byte header.")
  for order in "<>":
    if struct.unpack_from(order + "I", blob)[0] == _MAGIC:
      break
  else:
    raise ValueError(f"{path} is not a .mo catalog: it starts with "
                     f"{blob[:4].hex()}, not the magic number 0x950412de in "
                     "either byte order.")
  revision, n, originals, translations = struct.unpack_from(order + "4I",
                                                            blob, 4)
  if revision >> 16 not in (0, 1):
    raise ValueError(f"{path} has .mo major revision {revision >> 16}; "
                     "allowed: 0 and 1.")

  def table(offset, name):  # [2 * n]: length, offset of each string.
    if offset + 8 * n > len(blob):
      raise ValueError(f"{path}: the {name} table ({n} entries at offset "
                       f"{offset}) runs past the end of the file "
                       f"({len(blob)} bytes).")
    return struct.unpack_from(f"{order}{2 * n}I", blob, offset)

  def string(tab, i, name) -> bytes:
    length, start = tab[2 * i], tab[2 * i + 1]
    if start + length > len(blob):
      raise ValueError(f"{path}: {name} {i} (offset {start}, length {length}) "
                       f"runs past the end of the file ({len(blob)} bytes).")
    return blob[start:start + length]

  keys, values = table(originals, "msgid"), table(translations, "msgstr")
  raw = [(string(keys, i, "msgid"), string(values, i, "msgstr"))
         for i in range(n)]
  charset = "UTF-8"
  for key, value in raw:
    if key == b"":
      charset = _header_charset(value.decode("ascii", "replace"), path)
      break
  domain = path.stem
  entries, undecodable = [], 0
  for i, (key, value) in enumerate(raw):
    try:
      key_text = key.decode(charset, "replace" if errors == "replace"
                            else "strict")
      value_text = value.decode(charset, "replace" if errors == "replace"
                                else "strict")
    except UnicodeDecodeError as e:
      if errors == "strict":
        raise ValueError(f"{path}: entry {i} is not valid {charset}: {e}"
                         ) from None
      undecodable += 1
      continue
    context, sep, msgid = key_text.partition(_CONTEXT_SEP)
    if not sep:
      context, msgid = None, key_text
    msgid, plural_sep, msgid_plural = msgid.partition(_PLURAL_SEP)
    if msgid == "":  # The header (or a context with an empty msgid).
      continue
    if plural_sep:
      forms = tuple(value_text.split(_PLURAL_SEP))
      if any(forms):
        entries.append(Entry(msgid, forms[0], context, domain, msgid_plural,
                             forms))
    elif value_text:
      entries.append(Entry(msgid, value_text, context, domain))
  return entries, undecodable


def _header_charset(header: str, path) -> str:
  """The charset of `Content-Type: text/plain; charset=...`, else UTF-8."""
  match = re.search(r"^content-type:.*?charset=\s*([^\s;]+)", header,
                    re.IGNORECASE | re.MULTILINE)
  if not match or match.group(1).upper() == "CHARSET":  # A .pot template.
    return "UTF-8"
  charset = match.group(1)
  try:
    codecs.lookup(charset)
  except LookupError:
    raise ValueError(f"{path} declares charset={charset!r}, which Python "
                     "cannot decode.") from None
  return charset


def write_mo(path, entries: Iterable[Entry], charset: str = "UTF-8", *,
             byteorder: str = "<",
             plural_forms: str = "nplurals=2; plural=(n != 1);"
             ) -> pathlib.Path:
  """Writes `entries` as a .mo catalog (GNU layout, revision 0); returns path.

  The layout, all integers uint32 in `byteorder` ("<" little, ">" big):

    0   magic 0x950412de        16  T: offset of the translations table
    4   revision 0              20  hash table size (0: no hash table)
    8   N: number of strings    24  hash table offset
    12  O: offset of the originals table
    O   N (length, offset) pairs of the keys, sorted by their bytes
    T   N (length, offset) pairs of the translations, in the same order
        then the strings, each followed by a NUL the length leaves out.

  A key is "context\\x04msgid" for an entry with a context and
  "msgid\\x00msgid_plural" for a plural entry, whose translation is the forms
  joined by NUL. The first key is "" and its translation the header, which
  declares `charset` (the encoding of every string) and `plural_forms`.
  """
  if byteorder not in ("<", ">"):
    raise ValueError(f"byteorder={byteorder!r}; allowed: '<' and '>'.")
  try:
    codecs.lookup(charset)
  except LookupError:
    raise ValueError(f"charset={charset!r} is not an encoding Python "
                     "knows.") from None
  header = ("Content-Type: text/plain; charset=" + charset + "\n"
            "Content-Transfer-Encoding: 8bit\n"
            "Plural-Forms: " + plural_forms + "\n")
  items = {b"": header.encode("ascii")}
  for e in entries:
    key = e.msgid if e.msgid_plural is None else (
        e.msgid + _PLURAL_SEP + e.msgid_plural)
    if e.context is not None:
      key = e.context + _CONTEXT_SEP + key
    value = e.msgstr if e.msgid_plural is None else _PLURAL_SEP.join(
        e.plural_forms)
    key_bytes = key.encode(charset)
    if key_bytes in items:
      what = "the header's key" if not key_bytes else "a duplicate"
      raise ValueError(f"entry msgid={e.msgid!r} context={e.context!r} is "
                       f"{what}; every (context, msgid) must be unique and "
                       "non-empty.")
    items[key_bytes] = value.encode(charset)
  keys = sorted(items)
  n = len(keys)
  originals, translations = _HEADER_BYTES, _HEADER_BYTES + 8 * n
  strings = bytearray()
  key_table, value_table = [], []
  start = _HEADER_BYTES + 16 * n
  for table, blobs in ((key_table, keys), (value_table,
                                           [items[k] for k in keys])):
    for b in blobs:
      table += [len(b), start + len(strings)]
      strings += b + b"\0"
  out = struct.pack(f"{byteorder}7I", _MAGIC, 0, n, originals, translations,
                    0, 0)
  out += struct.pack(f"{byteorder}{4 * n}I", *key_table, *value_table)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(out + bytes(strings))
  return path


# --------------------------------------------------------------------------
# Cleaning: accelerators and placeholders.

# Characters that may not precede an accelerator: they join identifiers
# ("snake_case" is excluded anyway: letters never precede one) or escapes.
_NOT_BEFORE_MARKER = frozenset("_&$%@#.\\*=+")
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")
_CONVERSION_ALIASES = {"X": "x", "i": "d", "E": "e", "F": "f", "G": "g",
                       "A": "a"}


def _in_identifier(text: str, i: int) -> bool:
  """Whether the non-space run around text[i] holds another "_"."""
  start = end = i
  while start > 0 and not text[start - 1].isspace():
    start -= 1
  while end + 1 < len(text) and not text[end + 1].isspace():
    end += 1
  return "_" in text[start:i] + text[i + 1:end + 1]


def _marker_positions(text: str, marker: str,
                      inside_words: bool = False) -> list[int]:
  """Indices of accelerator markers `marker` ("_" or "&") in `text`.

  With `inside_words` any marker followed by a letter or digit counts
  (doubled markers and "&" entities aside), whatever precedes it.
  """
  out = []
  start = text.find(marker)
  while start >= 0:
    i, start = start, text.find(marker, start + 1)
    if not text[i + 1:i + 2].isalnum():
      continue
    before = text[i - 1] if i > 0 else " "
    if before == marker or (marker == "&" and _ENTITY.match(text, i)):
      continue
    if not inside_words and (
        before.isalnum() or before in _NOT_BEFORE_MARKER
        or _in_identifier(text, i)):
      continue
    out.append(i)
  return out


def accelerator_markers(msgid: str) -> str:
  """The marker kinds ("_", "&") that occur exactly once in `msgid`.

  >>> accelerator_markers("_Open File"), accelerator_markers("pg_dump")
  ('_', '')
  """
  return "".join(m for m in "_&" if len(_marker_positions(msgid, m)) == 1)


def strip_accelerators(text: str, markers: str = "_&", *,
                       inside_words: bool = False) -> str:
  """`text` without its keyboard-accelerator markers of kinds `markers`.

  A kind is removed only when `text` holds exactly one such marker (see the
  module docstring for what counts as one). For a translation pass the
  msgid's `accelerator_markers` and `inside_words=True`, as translators put
  the marker inside words ("Ei_genschaften").

  >>> strip_accelerators("Save _As…"), strip_accelerators("&Datei")
  ('Save As…', 'Datei')
  >>> strip_accelerators("snake_case and $_POST, Q&A && &amp;")
  'snake_case and $_POST, Q&A && &amp;'
  """
  for marker in markers:
    positions = _marker_positions(text, marker, inside_words)
    if len(positions) == 1:
      i = positions[0]
      text = text[:i] + text[i + 1:]
  return text


_PLACEHOLDER = re.compile(r"""
    (?P<literal> %% | \{\{ | \}\} )
  | %\((?P<py_name>\w+)\) [-+\ #0]* (?:\d+)? (?:\.\d+)?
      (?P<py_conv>[diouxXeEfFgGcrsa])
  | % (?:\d+\$)? [-+#0']* (?P<width>\d+|\*(?:\d+\$)?)?
      (?:\.(?P<precision>\d+|\*(?:\d+\$)?))?
      (?P<conv> (?:hh|h|ll|l|L|q|j|z|Z|t)? [diouxXeEfFgGaAcCsSpnm])
  | %(?P<qt>\d+)
  | \{(?P<brace>[A-Za-z_]\w*|\d*) (?:\.\w+|\[\w+\])* (?:![rsa])? (?::[^{}]*)? \}
""", re.VERBOSE)


def _same_argument(conversion: str) -> str:
  """"X" -> "x", "i" -> "d", "lX" -> "lx": equal argument, other spelling."""
  return conversion[:-1] + _CONVERSION_ALIASES.get(conversion[-1],
                                                   conversion[-1])


def placeholders(text: str) -> collections.Counter:
  """The multiset of format placeholders in `text`.

  printf conversions count by length modifier + conversion letter, so a
  positional "%1$s" equals "%s" and "%-20s" equals "%s"; conversions that
  take the same argument and differ only in spelling are equal ("%X" and
  "%x", "%i" and "%d", "%E" and "%e"); a "*" width or precision counts as
  one more ("printf", "*") argument.

  >>> sorted(placeholders("%1$s has %5.2f%% of {0} and %(n)d").elements())
  [('brace', '0'), ('printf', 'f'), ('printf', 's'), ('python', 'n', 'd')]
  """
  out = collections.Counter()
  for m in _PLACEHOLDER.finditer(text):
    if m["literal"]:
      continue
    if m["py_conv"]:
      out[("python", m["py_name"], _same_argument(m["py_conv"]))] += 1
    elif m["conv"]:
      out[("printf", _same_argument(m["conv"]))] += 1
      out[("printf", "*")] += sum(
          1 for g in (m["width"], m["precision"]) if g and g[0] == "*")
    elif m["qt"]:
      out[("qt", m["qt"])] += 1
    else:
      out[("brace", m["brace"])] += 1
  return +out  # Drops the zero "*" counts.


def placeholders_agree(source: str, target: str) -> bool:
  """Whether both sides hold the same multiset of placeholders."""
  return placeholders(source) == placeholders(target)


def _reject_reason(source: str, target: str, min_chars: int,
                   max_chars: int) -> str | None:
  if not target:
    return "empty_target"
  if len(source) < min_chars:
    return "too_short"
  if len(source) > max_chars or len(target) > max_chars:
    return "too_long"
  if not placeholders_agree(source, target):
    return "placeholder_mismatch"
  return None


def keep_pair(source: str, target: str, min_chars: int = 10,
              max_chars: int = 200) -> bool:
  """The length and placeholder rules on a cleaned (source, target) pair."""
  return _reject_reason(source, target, min_chars, max_chars) is None


def _entry_texts(entry: Entry, english: bool) -> dict[int, str]:
  """Cleaned texts of one entry's side by plural form: {0: ..., 1: ...}.

  The English side is msgid (form 0) and msgid_plural (form 1); the other
  side the translated forms 0 and 1 that are not empty.
  """
  if english:
    raw = {0: entry.msgid}
    if entry.msgid_plural is not None:
      raw[1] = entry.msgid_plural
  else:
    forms = entry.plural_forms or (entry.msgstr,)
    raw = {i: text for i, text in enumerate(forms[:2]) if text}
  markers = accelerator_markers(entry.msgid)
  return {i: strip_accelerators(text, markers,
                                inside_words=not english).strip()
          for i, text in raw.items()}


def _side(entries: Sequence[Entry], english: bool) -> dict[tuple, str]:
  """{(context, msgid, form): cleaned text} of one language's side."""
  return {(e.context, e.msgid, form): text
          for e in entries for form, text in _entry_texts(e, english).items()}


def _join(source: dict[tuple, str], target: dict[tuple, str], min_chars: int,
          max_chars: int, rejected: collections.Counter | None = None
          ) -> list[tuple[str, str]]:
  pairs = []
  for key, src in source.items():
    tgt = target.get(key)
    if tgt is None:
      continue
    reason = _reject_reason(src, tgt, min_chars, max_chars)
    if reason is None:
      pairs.append((src, tgt))
    elif rejected is not None:
      rejected[reason] += 1
  return pairs


def catalog_pairs(entries: Sequence[Entry], *, min_chars: int = 10,
                  max_chars: int = 200) -> list[tuple[str, str]]:
  """Cleaned (msgid, translation) pairs of one catalog, in entry order.

  A plural entry gives (msgid, form 0) and, if form 1 is translated,
  (msgid_plural, form 1). See the module docstring for the cleaning rules.
  """
  _check_lengths(min_chars, max_chars)
  return _join(_side(entries, True), _side(entries, False), min_chars,
               max_chars)


def _check_lengths(min_chars, max_chars):
  for name, value in (("min_chars", min_chars), ("max_chars", max_chars)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name}={value!r} must be a non-negative integer.")
  if max_chars < max(min_chars, 1):
    raise ValueError(f"max_chars={max_chars} must be >= max(min_chars, 1) = "
                     f"{max(min_chars, 1)}.")


# --------------------------------------------------------------------------
# The corpus: languages, splits by catalog, deduplication.


class Pair(NamedTuple):
  """A translation pair; a tuple so pairs sort by (source, target, domain)."""
  source: str
  target: str
  domain: str  # The catalog it came from; decides its split.


@dataclasses.dataclass(frozen=True)
class TranslationSplits:
  """The pairs of `load_pairs`, split by catalog and sorted."""
  src_lang: str
  tgt_lang: str
  train: list[Pair]
  valid: list[Pair]
  test: list[Pair]
  domains: dict[str, list[str]]  # split -> sorted domain names.
  # What the cleaning and deduplication removed, by reason (pairs or entries).
  dropped: dict[str, int]
  skipped_catalogs: dict[str, str]  # path -> why it could not be read.

  def split(self, name: str) -> list[Pair]:
    if name not in data.SPLITS:
      raise ValueError(f"split={name!r}; allowed: {data.SPLITS}.")
    return getattr(self, name)

  def summary(self) -> str:
    """A few lines of counts, e.g. for a training log."""
    lines = [f"{self.src_lang}->{self.tgt_lang}: "
             f"{sum(len(self.split(s)) for s in data.SPLITS):,} pairs from "
             f"{sum(len(d) for d in self.domains.values())} catalogs"]
    for s in data.SPLITS:
      names = self.domains[s]
      shown = ", ".join(names) if len(names) <= 8 else (
          ", ".join(names[:8]) + ", ...")
      lines.append(f"  {s:5s} {len(self.split(s)):8,} pairs  "
                   f"{len(names):3d} catalogs ({shown})")
    if self.dropped:
      lines.append("  dropped: " + ", ".join(
          f"{k} {v:,}" for k, v in sorted(self.dropped.items())))
    if self.skipped_catalogs:
      lines.append(f"  unreadable catalogs skipped: "
                   f"{', '.join(sorted(self.skipped_catalogs))}")
    return "\n".join(lines)


def available_languages(locale_dir=DEFAULT_LOCALE_DIR) -> list[str]:
  """Sorted languages with a `<lang>/LC_MESSAGES/*.mo` under `locale_dir`."""
  root = pathlib.Path(locale_dir)
  if not root.is_dir():
    return []
  return sorted(d.name for d in root.iterdir()
                if d.is_dir() and _catalog_paths(root, d.name))


def _catalog_paths(root: pathlib.Path, lang: str) -> dict[str, pathlib.Path]:
  folder = root / lang / "LC_MESSAGES"
  if not folder.is_dir():
    return {}
  return {p.stem: p for p in sorted(folder.glob("*.mo")) if p.is_file()}


def _assign_splits(sizes: dict[str, int], valid_fraction: float,
                   test_fraction: float, seed: int) -> dict[str, str]:
  """domain -> split; see the module docstring for the rebalancing rule."""
  split = {d: data.split_of(f"{seed}/{d}", valid_fraction, test_fraction)
           for d in sorted(sizes)}
  if len(split) < 3:
    return split
  wanted = [s for s, f in (("train", 1.0), ("valid", valid_fraction),
                           ("test", test_fraction)) if f > 0]
  for s in wanted:
    members = collections.defaultdict(list)
    for d, of in split.items():
      members[of].append(d)
    if members[s]:
      continue
    # The split with the most domains (>= 2 of them, since >= 3 domains sit
    # in at most two splits), train first on ties.
    donor = max((o for o in data.SPLITS if o != s),
                key=lambda o: (len(members[o]), o == "train"))
    by_size = sorted(members[donor], key=lambda d: (sizes[d], d))
    split[by_size[-1] if s == "train" else by_size[0]] = s
  return split


def _dedup(pairs: Iterable[Pair], *, one_per_source: bool,
           exclude_sources: frozenset = frozenset(),
           dropped: collections.Counter) -> list[Pair]:
  out, seen_pairs, seen_sources = [], set(), set()
  for p in sorted(pairs):
    if (p.source, p.target) in seen_pairs:
      dropped["duplicate"] += 1
    elif p.source in exclude_sources:
      dropped["source_in_train"] += 1
    elif one_per_source and p.source in seen_sources:
      dropped["second_reference"] += 1
    else:
      out.append(p)
      seen_pairs.add((p.source, p.target))
      seen_sources.add(p.source)
  return out


def load_pairs(src_lang: str = "en", tgt_lang: str = "de",
               locale_dir=DEFAULT_LOCALE_DIR, *, valid_fraction: float = 0.05,
               test_fraction: float = 0.05, min_chars: int = 10,
               max_chars: int = 200, seed: int = 0) -> TranslationSplits:
  """Cleaned src_lang -> tgt_lang pairs of the catalogs under `locale_dir`.

  "en" is the msgid side; other languages are folder names under
  `locale_dir` ("de", "pt_BR"). Only catalogs (domains) present for both
  languages are used. Catalogs that are not readable .mo files are skipped
  and listed in `skipped_catalogs`. See the module docstring for the rules.
  """
  if src_lang == tgt_lang:
    raise ValueError(f"src_lang and tgt_lang are both {src_lang!r}; they must "
                     "differ.")
  data.check_split_fractions(valid_fraction, test_fraction)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed={seed!r} must be an integer.")
  _check_lengths(min_chars, max_chars)
  root = pathlib.Path(locale_dir)
  if not root.is_dir():
    raise FileNotFoundError(
        f"locale_dir={str(locale_dir)!r} is not a folder; catalogs are "
        f"expected at <locale_dir>/<lang>/LC_MESSAGES/*.mo (on Debian "
        f"{DEFAULT_LOCALE_DIR}).")
  langs = [lang for lang in (src_lang, tgt_lang) if lang != ENGLISH]
  paths = {lang: _catalog_paths(root, lang) for lang in langs}
  for lang in langs:
    if not paths[lang]:
      available = available_languages(root)
      raise ValueError(
          f"no catalogs for language {lang!r}: {root / lang / 'LC_MESSAGES'}"
          f" holds no .mo file. Languages with catalogs under {root}: "
          f"{', '.join(available) if available else 'none'} (and "
          f"{ENGLISH!r}, the msgid side).")
  domains = sorted(set.intersection(*(set(paths[lang]) for lang in langs)))
  if not domains:
    raise ValueError(f"{src_lang} and {tgt_lang} share no catalog under "
                     f"{root}; {src_lang}: {sorted(paths[langs[0]])}, "
                     f"{tgt_lang}: {sorted(paths[langs[1]])}.")

  dropped = collections.Counter()
  skipped = {}
  by_domain = {}
  for domain in domains:
    entries = {}
    try:
      for lang in langs:
        entries[lang], undecodable = _read_catalog(paths[lang][domain], "skip")
        dropped["undecodable_entry"] += undecodable
    except (ValueError, OSError) as e:
      skipped[str(paths[lang][domain])] = str(e)
      continue

    def side(lang):
      if lang == ENGLISH:  # The msgids of the other language's catalog.
        return _side(entries[langs[0]], english=True)
      return _side(entries[lang], english=False)

    pairs = _join(side(src_lang), side(tgt_lang), min_chars, max_chars,
                  dropped)
    if pairs:
      by_domain[domain] = [Pair(s, t, domain) for s, t in pairs]

  assignment = _assign_splits({d: len(p) for d, p in by_domain.items()},
                              valid_fraction, test_fraction, seed)
  raw = {s: [] for s in data.SPLITS}
  for domain, pairs in by_domain.items():
    raw[assignment[domain]].extend(pairs)
  train = _dedup(raw["train"], one_per_source=False, dropped=dropped)
  train_sources = frozenset(p.source for p in train)
  held_out = {s: _dedup(raw[s], one_per_source=True,
                        exclude_sources=train_sources, dropped=dropped)
              for s in ("valid", "test")}
  return TranslationSplits(
      src_lang, tgt_lang, train, held_out["valid"], held_out["test"],
      domains={s: sorted(d for d, of in assignment.items() if of == s)
               for s in data.SPLITS},
      dropped={k: v for k, v in sorted(dropped.items()) if v},
      skipped_catalogs=skipped)


# --------------------------------------------------------------------------
# Vocabulary and batches.


def train_translation_bpe(pairs: Iterable[Sequence[str]], vocab_size: int, *,
                          min_frequency: int = 2) -> BPETokenizer:
  """A byte-level BPE over both sides of `pairs` (e.g. the train split).

  `SPECIAL_TOKENS` sit at PAD_ID, BOS_ID, EOS_ID (0, 1, 2); text never
  encodes to them, and `decode` leaves them out. `vocab_size` must be at
  least 260 (3 special tokens, 256 bytes, one merge).
  """
  texts = (text for pair in pairs for text in (pair[0], pair[1]))
  tok = train_bpe(texts, vocab_size, min_frequency,
                  special_tokens=SPECIAL_TOKENS)
  _check_special_ids(tok)
  return tok


def _check_special_ids(tokenizer):
  hf = getattr(tokenizer, "tokenizer", None)
  found = ({t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
           if hasattr(hf, "token_to_id") else None)
  if found != dict(zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID))):
    raise ValueError(
        f"the tokenizer must hold {SPECIAL_TOKENS} at ids {PAD_ID}, {BOS_ID}, "
        f"{EOS_ID}; found {found} ({type(tokenizer).__name__}). Train it with "
        "train_translation_bpe.")


@dataclasses.dataclass(frozen=True)
class EncodedPairs:
  """Pairs as padded id arrays; row i encodes `pairs[indices[i]]`."""
  sources: np.ndarray  # int32 [N, S]: x_1..x_m, PAD...
  source_lengths: np.ndarray  # int32 [N]: m
  targets: np.ndarray  # int32 [N, T + 1]: BOS, y_1..y_n, EOS, PAD...
  target_lengths: np.ndarray  # int32 [N]: n + 1 (y and EOS, not BOS)
  indices: np.ndarray  # int64 [N]: positions in the encoded `pairs`
  num_dropped: int  # Pairs longer than max_source_len / max_target_len.

  def __len__(self) -> int:
    return self.sources.shape[0]


def encode_pairs(tokenizer, pairs: Sequence[Sequence[str]],
                 max_source_len: int, max_target_len: int) -> EncodedPairs:
  """Encodes (source, target, ...) pairs for an encoder-decoder.

  Sources carry no BOS/EOS; a target row is BOS, y_1..y_n, EOS, then PAD, so
  `targets[:, :-1]` is the decoder input and `targets[:, 1:]` the labels,
  valid for the first `target_lengths` positions. A pair whose source has
  more than `max_source_len` tokens or whose target needs more than
  `max_target_len` (n + 1) is dropped and counted in `num_dropped`.

  Source "Datei öffnen" with ids [7, 9], target ids [5] and
  max_source_len=3, max_target_len=3:
    sources [[7, 9, PAD]], source_lengths [2],
    targets [[BOS, 5, EOS, PAD]], target_lengths [2].
  """
  _check_special_ids(tokenizer)
  for name, value in (("max_source_len", max_source_len),
                      ("max_target_len", max_target_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  pairs = list(pairs)
  src_ids = tokenizer.encode_many([p[0] for p in pairs]) if pairs else []
  tgt_ids = tokenizer.encode_many([p[1] for p in pairs]) if pairs else []
  keep = [i for i in range(len(pairs))
          if len(src_ids[i]) <= max_source_len
          and len(tgt_ids[i]) + 1 <= max_target_len]
  n = len(keep)
  sources = np.full((n, max_source_len), PAD_ID, np.int32)
  targets = np.full((n, max_target_len + 1), PAD_ID, np.int32)
  targets[:, 0] = BOS_ID
  source_lengths = np.zeros((n,), np.int32)
  target_lengths = np.zeros((n,), np.int32)
  for row, i in enumerate(keep):
    x, y = src_ids[i], tgt_ids[i]
    if (x.size and x.min() <= EOS_ID) or (y.size and y.min() <= EOS_ID):
      raise ValueError(f"pair {i} {pairs[i][:2]!r} encodes to a special id "
                       f"(<= {EOS_ID}): the tokenizer turns text into special "
                       "tokens; load it with load_tokenizer, which keeps "
                       "special tokens out of text.")
    sources[row, :len(x)] = x
    targets[row, 1:len(y) + 1] = y
    targets[row, len(y) + 1] = EOS_ID
    source_lengths[row], target_lengths[row] = len(x), len(y) + 1
  return EncodedPairs(sources, source_lengths, targets, target_lengths,
                      np.asarray(keep, np.int64), len(pairs) - n)


class PairBatches:
  """Shuffled batches of encoded pairs; `batch(step)` is a pure function.

  Epoch e visits the rows in the permutation `default_rng([seed, e])` and
  has `steps_per_epoch = N // batch_size` full batches (the remainder waits
  for a later epoch's order), so a run resumed at step s sees exactly the
  batches of an uninterrupted run.

  With `bucket` (e.g. 16), rows are grouped by their longer side rounded up
  to a multiple of `bucket`, every batch comes from one group, and its
  arrays are cut to the batch's longest source and target rounded up to a
  multiple of `bucket`: short messages (most gettext pairs) stop paying for
  the padding of the longest, and there are at most (S / bucket) x (T /
  bucket) shapes to compile. Epoch e shuffles each group's rows and then
  the order of all full batches, both from `default_rng([seed, e])`.
  """

  def __init__(self, encoded: EncodedPairs, batch_size: int, seed: int = 0,
               bucket: int | None = None):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
        or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if bucket is not None and (isinstance(bucket, bool) or
                               not isinstance(bucket, int) or bucket < 1):
      raise ValueError(f"bucket={bucket!r} must be None or a positive "
                       "integer.")
    if len(encoded) < batch_size:
      raise ValueError(f"{len(encoded)} encoded pairs are fewer than "
                       f"batch_size={batch_size}.")
    self.encoded, self.batch_size, self.seed = encoded, batch_size, seed
    self.bucket = bucket
    if bucket is None:
      self._groups = [np.arange(len(encoded))]
    else:
      longer = np.maximum(encoded.source_lengths, encoded.target_lengths)
      key = -(-longer // bucket)
      self._groups = [np.flatnonzero(key == g) for g in np.unique(key)]
    self.steps_per_epoch = sum(len(g) // batch_size for g in self._groups)
    if self.steps_per_epoch == 0:
      raise ValueError(f"no length bucket of {bucket} holds batch_size="
                       f"{batch_size} pairs; use a smaller batch or no "
                       "buckets.")
    self._epoch, self._batches = None, None

  def __len__(self) -> int:
    return self.steps_per_epoch

  def _plan(self, epoch: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    b = self.batch_size
    batches = []
    for group in self._groups:
      rows = group[rng.permutation(len(group))] if self.bucket else \
          rng.permutation(len(group))
      batches += [rows[i * b:(i + 1) * b] for i in range(len(rows) // b)]
    if self.bucket:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """{"source" [B, S], "source_lengths" [B], "target" [B, T+1],
    "target_lengths" [B]} (int32) for global `step` >= 0."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0.")
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._epoch:
      self._batches = self._plan(epoch)
      self._epoch = epoch
    rows = self._batches[i]
    e = self.encoded
    source, target = e.sources[rows], e.targets[rows]
    if self.bucket:
      up = lambda n: -(-int(n) // self.bucket) * self.bucket
      source = source[:, :min(up(e.source_lengths[rows].max()),
                              source.shape[1])]
      target = target[:, :min(up(e.target_lengths[rows].max()) + 1,
                              target.shape[1])]
    return {"source": source, "source_lengths": e.source_lengths[rows],
            "target": target, "target_lengths": e.target_lengths[rows]}
