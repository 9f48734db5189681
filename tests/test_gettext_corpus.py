"""gettext catalogs as a translation corpus: .mo reading, cleaning, splits, batches."""

import gettext
import pathlib

import numpy as np
import pytest

from blockdec.training import gettext_corpus as gc
from blockdec.training import tokenizers

Entry = gc.Entry
REAL_DE = pathlib.Path("/usr/share/locale/de/LC_MESSAGES")


def write_catalog(root, lang, domain, entries, **kwargs):
  """Writes root/lang/LC_MESSAGES/domain.mo."""
  return gc.write_mo(pathlib.Path(root) / lang / "LC_MESSAGES" /
                     f"{domain}.mo", entries, **kwargs)


SAMPLE = [
    Entry("Open file", "Datei öffnen"),
    Entry("Open", "Öffnen", context="menu"),
    Entry("Open", "Offen", context="state"),
    Entry.plural("one file", "%d files", ["eine Datei", "%d Dateien"]),
    Entry.plural("%d byte", "%d bytes", ["%d Byte"]),  # No form 1.
]


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_write_read_round_trip(tmp_path, byteorder):
  path = gc.write_mo(tmp_path / "app.mo", SAMPLE, byteorder=byteorder)
  assert path.read_bytes()[:4] == (b"\xde\x12\x04\x95" if byteorder == "<"
                                   else b"\x95\x04\x12\xde")
  entries = gc.read_catalog(path)
  expected = [Entry(e.msgid, e.msgstr, e.context, "app", e.msgid_plural,
                    e.plural_forms) for e in SAMPLE]
  assert sorted(entries, key=repr) == sorted(expected, key=repr)
  assert len(entries) == len(SAMPLE)  # The header is not an entry.

  # The standard library reads our files the same way (contexts, plurals).
  with open(path, "rb") as f:
    t = gettext.GNUTranslations(f)
  assert t.gettext("Open file") == "Datei öffnen"
  assert t.pgettext("menu", "Open") == "Öffnen"
  assert t.pgettext("state", "Open") == "Offen"
  assert t.ngettext("one file", "%d files", 1) == "eine Datei"
  assert t.ngettext("one file", "%d files", 5) == "%d Dateien"


def test_plurals_and_contexts_become_pairs():
  entries = [Entry(e.msgid, e.msgstr, e.context, "app", e.msgid_plural,
                   e.plural_forms) for e in SAMPLE]
  assert gc.catalog_pairs(entries, min_chars=0) == [
      ("Open file", "Datei öffnen"),
      ("Open", "Öffnen"),
      ("Open", "Offen"),
      ("one file", "eine Datei"),
      ("%d files", "%d Dateien"),
      ("%d byte", "%d Byte"),  # And no ("%d bytes", ...): form 1 is missing.
  ]
  # min_chars counts the source; "Open" (4) and "%d byte" (7) go.
  assert gc.catalog_pairs(entries, min_chars=8) == [
      ("Open file", "Datei öffnen"), ("one file", "eine Datei"),
      ("%d files", "%d Dateien")]
  assert gc.catalog_pairs(entries, min_chars=0, max_chars=9) == [
      ("Open", "Öffnen"), ("Open", "Offen"), ("%d byte", "%d Byte")]
  with pytest.raises(ValueError, match="max_chars=3 must be >="):
    gc.catalog_pairs(entries, min_chars=5, max_chars=3)
  with pytest.raises(ValueError, match="form 0 equal to msgstr"):
    Entry("a", "b", msgid_plural="as", plural_forms=("c", "d"))


def test_charsets_and_undecodable_entries(tmp_path):
  entries = [Entry("Size of the file", "Größe der Datei"),
             Entry("Plain ASCII text", "Nur ASCII-Text")]
  latin = gc.write_mo(tmp_path / "latin.mo", entries, charset="ISO-8859-1")
  assert "Größe".encode("latin-1") in latin.read_bytes()
  assert [e.msgstr for e in gc.read_catalog(latin)] == [
      "Nur ASCII-Text", "Größe der Datei"]  # Sorted by msgid.

  # The same bytes declared as UTF-8: the Latin-1 entry is not valid UTF-8.
  lying = tmp_path / "lying.mo"
  lying.write_bytes(latin.read_bytes().replace(b"charset=ISO-8859-1",
                                               b"charset=UTF-8     "))
  assert [e.msgstr for e in gc.read_catalog(lying)] == ["Nur ASCII-Text"]
  replaced = gc.read_catalog(lying, errors="replace")
  assert replaced[1].msgstr == "Gr\ufffd\ufffde der Datei"
  with pytest.raises(ValueError, match="entry 2 is not valid UTF-8"):
    gc.read_catalog(lying, errors="strict")
  with pytest.raises(ValueError, match="allowed: .*'skip'"):
    gc.read_catalog(lying, errors="ignore")

  garbage = tmp_path / "garbage.mo"
  garbage.write_bytes(b"\x00" * 40)
  with pytest.raises(ValueError, match="magic number"):
    gc.read_catalog(garbage)
  truncated = tmp_path / "truncated.mo"
  truncated.write_bytes(latin.read_bytes()[:60])
  with pytest.raises(ValueError, match="runs past the end"):
    gc.read_catalog(truncated)


@pytest.mark.parametrize("text, stripped", [
    ("_File", "File"),
    ("Save _As…", "Save As…"),
    ("&Open", "Open"),
    ("Open &Recent", "Open Recent"),
    ("Datei (_F)", "Datei (F)"),
    ("_3D view", "3D view"),
])
def test_accelerators_stripped(text, stripped):
  assert gc.strip_accelerators(text) == stripped
  assert gc.accelerator_markers(text) in ("_", "&")


@pytest.mark.parametrize("text", [
    "snake_case names",
    "set $_POST values",
    "_NET_WM_NAME is unset",
    "lookup _http._tcp.example.org",
    "AT&T and Q&A",
    "Drag && drop",
    "Fish &amp; chips &#38; more",
    "call __init__ first",
    "two markers: _File and _Edit",
    "a lone _ here",
])
def test_accelerators_kept(text):
  assert gc.strip_accelerators(text) == text
  assert gc.accelerator_markers(text) == ""


def test_accelerators_follow_the_msgid():
  pairs = gc.catalog_pairs([
      # Translators put the marker inside words.
      Entry("_Properties of it", "Ei_genschaften davon"),
      Entry("Save &As a copy", "Kopie speichern &unter"),
      # The msgid has none: the translation is left alone.
      Entry("Plain message text", "Schlichter _Nachrichtentext"),
      # The translation has two candidates: ambiguous, left alone.
      Entry("_Open the files", "Da_tei_en öffnen"),
  ])
  assert pairs == [("Properties of it", "Eigenschaften davon"),
                   ("Save As a copy", "Kopie speichern unter"),
                   ("Plain message text", "Schlichter _Nachrichtentext"),
                   ("Open the files", "Da_tei_en öffnen")]


@pytest.mark.parametrize("source, target", [
    ("%s: cannot open %d files", "%s: %d Dateien nicht zu öffnen"),
    ("%1$s copied to %2$s", "%2$s erhielt eine Kopie von %1$s"),
    ("%s out of %d done", "%2$d von %1$s erledigt"),  # %1$s matches %s.
    ("%(name)s has %(count)d items", "%(name)s hat %(count)d Elemente"),
    ("{0} of {total} done", "{0} von {total} erledigt"),
    ("100%% done with %s", "%s: zu 100%% erledigt"),
    ("%lu bytes were read", "%lu Bytes wurden gelesen"),
    ("Code 0x%02X seen", "Code 0x%02x gesehen"),  # Same argument.
    ("%-20s the name column", "%-30s die Namensspalte"),  # Width may change.
    ("Qt message %1 of %2", "Qt-Nachricht %1 von %2"),
])
def test_placeholders_agree(source, target):
  assert gc.placeholders_agree(source, target)
  assert gc.catalog_pairs([Entry(source, target)]) == [(source, target)]


@pytest.mark.parametrize("source, target", [
    ("%s: cannot open the file", "Datei kann nicht geöffnet werden"),
    ("%d files were found", "%s Dateien wurden gefunden"),
    ("%ld items in the list", "%d Elemente in der Liste"),
    ("%(name)s has the items", "%(nom)s hat die Elemente"),
    ("{0} of {1} are done", "{0} von {2} sind erledigt"),
    ("%s and %s are equal", "%s und %s und %s sind gleich"),
    ("%*d is the width", "%d ist die Breite"),
    ("100%% done, almost", "%s zu 100%% erledigt"),
])
def test_placeholders_disagree(source, target):
  assert not gc.placeholders_agree(source, target)
  assert gc.catalog_pairs([Entry(source, target)]) == []


def write_tree(root, domains, per_domain=4):
  """de catalogs: unique messages, one shared by all, one ambiguous."""
  for d in domains:
    write_catalog(root, "de", d, [
        *[Entry(f"Message number {j} of {d}", f"Nachricht {j} von {d}")
          for j in range(per_domain)],
        Entry("Shared message for all", "Gemeinsame Nachricht für alle"),
        Entry("Ambiguous message text", f"Mehrdeutiger Text ({d})"),
    ])


def test_splits_by_domain_deterministic_deduplicated(tmp_path):
  domains = [f"prog{i:02d}" for i in range(20)]
  write_tree(tmp_path, domains)
  kwargs = dict(locale_dir=tmp_path, valid_fraction=0.25, test_fraction=0.25)
  splits = gc.load_pairs("en", "de", **kwargs)
  assert splits == gc.load_pairs("en", "de", **kwargs)  # Deterministic.
  # No domain in two splits; every domain in one; pairs in their domain's.
  assigned = [d for s in ("train", "valid", "test") for d in splits.domains[s]]
  assert sorted(assigned) == domains
  for s in ("train", "valid", "test"):
    assert splits.domains[s], f"hash left {s} empty; pick other fractions"
    assert {p.domain for p in splits.split(s)} <= set(splits.domains[s])
    assert splits.split(s) == sorted(splits.split(s))
    assert len({(p.source, p.target) for p in splits.split(s)}) == len(
        splits.split(s))
  # No leakage: the shared and ambiguous messages live in train only.
  train_sources = {p.source for p in splits.train}
  for p in splits.valid + splits.test:
    assert p.source not in train_sources
  assert [p for p in splits.train if p.source.startswith("Shared")] == [
      gc.Pair("Shared message for all", "Gemeinsame Nachricht für alle",
              splits.domains["train"][0])]  # Kept once: the first domain.
  assert len([p for p in splits.train if p.source.startswith("Ambiguous")]
             ) == len(splits.domains["train"])  # Train keeps every target.
  n_held_out = len(splits.domains["valid"]) + len(splits.domains["test"])
  assert splits.dropped["source_in_train"] == 2 * n_held_out
  assert splits.dropped["duplicate"] == len(splits.domains["train"]) - 1
  assert "train" in splits.summary() and "catalogs" in splits.summary()

  # A source twice in test with different targets keeps the first target.
  first, second = splits.domains["test"][:2]
  for d, target in ((first, "Nur im Test (B)"), (second, "Nur im Test (A)")):
    write_catalog(tmp_path, "de", d, [Entry("Only in the test split",
                                            target)])
  again = gc.load_pairs("en", "de", **kwargs)
  assert again.domains == splits.domains
  assert [p.target for p in again.test
          if p.source == "Only in the test split"] == ["Nur im Test (A)"]

  # Another seed, another assignment of the same domains.
  other = gc.load_pairs("en", "de", seed=1, **kwargs)
  assert other.domains != splits.domains
  assert sorted(sum(other.domains.values(), [])) == domains


def test_small_held_out_splits_are_filled(tmp_path):
  for d, n in (("big", 6), ("mid", 4), ("small", 2)):
    write_catalog(tmp_path, "de", d, [
        Entry(f"Message {j} of {d}", f"Nachricht {j} von {d}")
        for j in range(n)])
  splits = gc.load_pairs("en", "de", tmp_path, valid_fraction=0.001,
                         test_fraction=0.001)
  # The hash puts all three in train; the smallest ones move out.
  assert splits.domains == {"train": ["big"], "valid": ["small"],
                            "test": ["mid"]}
  assert len(splits.valid) == 2 and len(splits.test) == 4
  no_valid = gc.load_pairs("en", "de", tmp_path, valid_fraction=0.0,
                           test_fraction=0.001)
  assert no_valid.domains["valid"] == []
  assert no_valid.domains["test"] == ["small"]


def test_errors(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    gc.load_pairs("en", "de", missing)
  write_catalog(tmp_path, "de", "app", [Entry("Open the file", "Öffnen")])
  write_catalog(tmp_path, "fr", "app", [Entry("Open the file", "Ouvrir")])
  (tmp_path / "it" / "LC_MESSAGES").mkdir(parents=True)  # No catalogs.
  assert gc.available_languages(tmp_path) == ["de", "fr"]
  with pytest.raises(ValueError, match=r"'it'.*: de, fr \(and 'en'"):
    gc.load_pairs("en", "it", tmp_path)
  with pytest.raises(ValueError, match="'xx'"):
    gc.load_pairs("xx", "de", tmp_path)
  with pytest.raises(ValueError, match="both 'de'"):
    gc.load_pairs("de", "de", tmp_path)
  with pytest.raises(ValueError, match="valid_fraction"):
    gc.load_pairs("en", "de", tmp_path, valid_fraction=1.5)

  # An unreadable catalog is skipped and named.
  (tmp_path / "de" / "LC_MESSAGES" / "broken.mo").write_bytes(b"not a catalog")
  splits = gc.load_pairs("en", "de", tmp_path, min_chars=0)
  assert [pathlib.Path(p).name for p in splits.skipped_catalogs] == [
      "broken.mo"]
  assert "broken.mo" in splits.summary()
  assert splits.train == [gc.Pair("Open the file", "Öffnen", "app")]


def test_two_translations_join_on_context_and_msgid(tmp_path):
  write_catalog(tmp_path, "de", "app", [
      Entry("Open", "Öffnen", context="menu"),
      Entry("Open", "Offen", context="state"),
      Entry("Only German", "Nur Deutsch"),
      Entry.plural("one file", "%d files", ["eine Datei", "%d Dateien"]),
  ])
  write_catalog(tmp_path, "fr", "app", [
      Entry("Open", "Ouvrir", context="menu"),
      Entry("Open", "Ouvert", context="state"),
      Entry("Only French", "Seulement français"),
      Entry.plural("one file", "%d files", ["un fichier", "%d fichiers"]),
  ])
  write_catalog(tmp_path, "de", "german_only", [Entry("Save", "Speichern")])
  kwargs = dict(locale_dir=tmp_path, min_chars=0, valid_fraction=0.0,
                test_fraction=0.0)
  splits = gc.load_pairs("de", "fr", **kwargs)
  assert splits.domains["train"] == ["app"]  # Only catalogs both have.
  assert splits.train == sorted([
      gc.Pair("Öffnen", "Ouvrir", "app"), gc.Pair("Offen", "Ouvert", "app"),
      gc.Pair("eine Datei", "un fichier", "app"),
      gc.Pair("%d Dateien", "%d fichiers", "app")])
  fr_en = gc.load_pairs("fr", "en", **kwargs)
  assert [(p.source, p.target) for p in fr_en.train] == sorted([
      ("Ouvrir", "Open"), ("Ouvert", "Open"),
      ("Seulement français", "Only French"), ("un fichier", "one file"),
      ("%d fichiers", "%d files")])


def pairs_for_bpe():
  return [gc.Pair(f"Open the file number {i}\tnow", f"Öffne die Datei Nr. {i}"
                  "\njetzt", "app") for i in range(40)]


def test_bpe_with_fixed_special_ids(tmp_path):
  tok = gc.train_translation_bpe(pairs_for_bpe(), vocab_size=300)
  hf = tok.tokenizer
  assert [hf.token_to_id(t) for t in gc.SPECIAL_TOKENS] == [
      gc.PAD_ID, gc.BOS_ID, gc.EOS_ID] == [0, 1, 2]
  for text in ("Öffne die Datei Nr. 7\njetzt", " leading space\t",
               "text with </s> and <pad> inside", "ünseen ✓ 中文"):
    ids = tok.encode(text)
    assert ids.min() > gc.EOS_ID  # Text never becomes a special token.
    assert tok.decode(ids) == text  # Exact, no prefix space.
  assert len(tok.encode("Öffne die Datei")) < len("Öffne die Datei".encode())
  assert tok.decode([gc.BOS_ID, *tok.encode("jetzt"), gc.EOS_ID,
                     gc.PAD_ID]) == "jetzt"

  tok.save(tmp_path / "tok")
  loaded = tokenizers.load_tokenizer(tmp_path / "tok")
  text = "a </s> b <s>"
  np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
  assert loaded.decode(loaded.encode(text)) == text
  with pytest.raises(ValueError, match=">= 260"):
    gc.train_translation_bpe(pairs_for_bpe(), vocab_size=259)


def test_encode_pairs_layout_and_dropping():
  tok = gc.train_translation_bpe(pairs_for_bpe(), vocab_size=300)
  short = ("Open the file number 3\tnow", "jetzt")
  x, y = tok.encode(short[0]), tok.encode(short[1])
  long_source = ("Open the file number 3\tnow " * 3, "jetzt")
  long_target = ("Open the file", "jetzt " * 5)
  exact = ("Open the file", "jetzt")  # Target fits exactly: n + 1 == T.
  pairs = [long_source, short, long_target, exact]
  enc = gc.encode_pairs(tok, pairs, max_source_len=len(x),
                        max_target_len=len(y) + 1)
  assert enc.num_dropped == 2 and len(enc) == 2
  np.testing.assert_array_equal(enc.indices, [1, 3])
  assert enc.sources.dtype == enc.targets.dtype == np.int32
  assert enc.sources.shape == (2, len(x))
  assert enc.targets.shape == (2, len(y) + 2)  # [N, T + 1].
  np.testing.assert_array_equal(enc.sources[0], x)
  np.testing.assert_array_equal(enc.targets[0],
                                [gc.BOS_ID, *y, gc.EOS_ID])
  np.testing.assert_array_equal(enc.source_lengths, [len(x), 3])
  np.testing.assert_array_equal(enc.target_lengths, [len(y) + 1] * 2)
  # Padding after shorter rows.
  x3 = tok.encode(exact[0])
  assert len(x3) == 3
  np.testing.assert_array_equal(enc.sources[1],
                                [*x3] + [gc.PAD_ID] * (len(x) - 3))

  wide = gc.encode_pairs(tok, [short], max_source_len=len(x) + 2,
                         max_target_len=len(y) + 4)
  np.testing.assert_array_equal(
      wide.targets[0], [gc.BOS_ID, *y, gc.EOS_ID, gc.PAD_ID, gc.PAD_ID,
                        gc.PAD_ID])
  assert tok.decode(wide.targets[0]) == short[1]
  with pytest.raises(ValueError, match="ids 0, 1, 2"):
    gc.encode_pairs(tokenizers.ByteTokenizer(), [short], 8, 8)
  with pytest.raises(ValueError, match="max_target_len=0"):
    gc.encode_pairs(tok, [short], 8, 0)


def test_pair_batches_deterministic_and_resumable():
  tok = gc.train_translation_bpe(pairs_for_bpe(), vocab_size=300)
  enc = gc.encode_pairs(tok, pairs_for_bpe()[:10], 32, 32)
  assert len(enc) == 10
  batches = gc.PairBatches(enc, batch_size=3, seed=0)
  assert len(batches) == batches.steps_per_epoch == 3
  run = [batches.batch(s) for s in range(8)]
  assert set(run[0]) == {"source", "source_lengths", "target",
                         "target_lengths"}
  assert run[0]["source"].shape == (3, 32) and run[0]["target"].shape == (3, 33)

  def rows(batch):
    return [tuple(r) for r in batch["source"]]

  epoch0 = sum((rows(b) for b in run[:3]), [])
  assert len(set(epoch0)) == 9  # One epoch visits distinct rows.
  assert epoch0 != sum((rows(b) for b in run[3:6]), [])  # Reshuffled.
  resumed = gc.PairBatches(enc, batch_size=3, seed=0)
  for s in (5, 2, 7):  # Any order, fresh object: same batches.
    for key in run[s]:
      np.testing.assert_array_equal(resumed.batch(s)[key], run[s][key])
  other = gc.PairBatches(enc, batch_size=3, seed=1)
  assert rows(other.batch(0)) != rows(run[0])
  with pytest.raises(ValueError, match="fewer than batch_size=11"):
    gc.PairBatches(enc, batch_size=11)


def test_bucketed_batches_group_lengths_and_cut_padding():
  rng = np.random.default_rng(0)
  n, width = 40, 48
  src_len = np.where(np.arange(n) < 30, 5, 40).astype(np.int32)
  tgt_len = np.where(np.arange(n) < 30, 7, 20).astype(np.int32)
  sources = np.zeros((n, width), np.int32)
  targets = np.zeros((n, width + 1), np.int32)
  for i in range(n):
    sources[i, :src_len[i]] = rng.integers(3, 50, src_len[i])
    targets[i, 0] = gc.BOS_ID
    targets[i, 1:tgt_len[i] + 1] = 7
  enc = gc.EncodedPairs(sources, src_len, targets, tgt_len,
                        np.arange(n), 0)
  batches = gc.PairBatches(enc, batch_size=4, seed=0, bucket=16)
  assert len(batches) == 30 // 4 + 10 // 4  # Full batches per length group.
  seen = []
  for step in range(len(batches)):
    b = batches.batch(step)
    assert len(set(b["source_lengths"].tolist())) == 1  # One group.
    short = b["source_lengths"][0] == 5
    assert b["source"].shape == (4, 16 if short else 48)
    assert b["target"].shape == (4, 17 if short else 33)
    # Nothing but padding was cut.
    assert (b["source_lengths"] <= b["source"].shape[1]).all()
    assert (b["target_lengths"] < b["target"].shape[1]).all()
    seen += [tuple(r) for r in b["source"]]
  assert len(set(seen)) == len(seen)  # An epoch visits distinct rows.
  again = gc.PairBatches(enc, batch_size=4, seed=0, bucket=16)
  for step in (7, 3, 11):
    np.testing.assert_array_equal(again.batch(step)["source"],
                                  batches.batch(step)["source"])
  with pytest.raises(ValueError, match="bucket=0"):
    gc.PairBatches(enc, batch_size=4, bucket=0)


@pytest.mark.skipif(not any(REAL_DE.glob("*.mo")) if REAL_DE.is_dir()
                    else True, reason=f"no .mo catalogs in {REAL_DE}")
def test_installed_german_catalogs():
  splits = gc.load_pairs("en", "de")
  assert len(splits.train) > 5000
  assert splits.valid and splits.test
  train_sources = {p.source for p in splits.train}
  assert not any(p.source in train_sources for p in splits.valid + splits.test)
  held_out = set(splits.domains["valid"]) | set(splits.domains["test"])
  assert not held_out & set(splits.domains["train"])
  assert all(len(p.source) >= 10 and len(p.target) <= 200
             for p in splits.train)
