"""Translation end to end on synthetic gettext catalogs (seconds, no training
of note): the trainer's translation task, Stern's four regimes on an
encoder-decoder, resume after an interruption, and the benchmark's rows."""

import json
import pathlib

import jax
import numpy as np
import pytest

import blockdec
from blockdec.training import gettext_corpus as gc
from blockdec.training import pipeline, translation
from blockdec.training.train import Trainer
from tests.helpers import experiment_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "translation.py"

_WORDS = [("open", "öffne"), ("close", "schließe"), ("the file", "die Datei"),
          ("the window", "das Fenster"), ("now", "jetzt"), ("later", "später"),
          ("cannot", "kann nicht"), ("read", "lesen"), ("write", "schreiben"),
          ("the folder", "den Ordner"), ("again", "erneut"),
          ("please", "bitte")]


def _catalogs(root: pathlib.Path) -> pathlib.Path:
  """Six German catalogs of word-for-word messages under root/de/."""
  rng = np.random.default_rng(0)
  folder = root / "de" / "LC_MESSAGES"
  folder.mkdir(parents=True)
  for d in range(6):
    entries = []
    for _ in range(40):
      words = [_WORDS[i] for i in rng.choice(len(_WORDS), 4, replace=False)]
      entries.append(gc.Entry(" ".join(w[0] for w in words),
                              " ".join(w[1] for w in words)))
    gc.write_mo(folder / f"program{d}.mo", entries)
  return root


def _config(arg, locale_dir):
  module = experiment_script("stern_translation")
  return module, module.load_config(arg, str(locale_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny preset's base and four regimes, trained on the catalogs."""
  tmp = tmp_path_factory.mktemp("translation")
  locale = _catalogs(tmp / "locale")
  module, _ = _config("tiny", locale)
  base, runs = module.train_all("tiny", str(tmp / "cache"), str(locale))
  return module, locale, tmp / "cache", base, runs


def test_regimes_train_an_encoder_decoder(trained):
  _, locale, _, base, runs = trained
  assert base.cfg.encoder_layers >= 1 and base.cfg.num_prediction_heads == 1
  assert base.tokenizer.vocab_size == base.cfg.vocab_size
  for regime, run in runs.items():
    assert run.cfg.num_prediction_heads == 4, regime
    assert run.cfg.encoder_layers == base.cfg.encoder_layers
  flat = lambda p: jax.tree_util.tree_leaves(
      {k: v for k, v in p.items() if k != "proposal_heads"})
  # Frozen-trunk regimes keep the base's encoder, decoder and head 1; the
  # fine-tuned ones move them.
  for regime, frozen in (("regular", True), ("distillation", True),
                         ("fine-tuning", False), ("both", False)):
    same = all(np.array_equal(a, b) for a, b in
               zip(flat(runs[regime].params), flat(base.params)))
    assert same == frozen, regime
  # Every regime decodes its test sources exactly (Exact == greedy).
  _assert_blockwise_is_greedy(runs, base, locale, block_sizes=(4,))


def _assert_blockwise_is_greedy(runs, base, locale, block_sizes):
  """Each run's blockwise translations of the first test sources equal its
  greedy ones, token for token and in length, at every block size."""
  _, c = _config("tiny", locale)
  task = translation.TranslationTask(c.data, base.tokenizer)
  test = task.encoded["test"]
  assert len(test) > 0
  rows = np.arange(min(len(test), 6))
  kw = dict(source=test.sources[rows], source_lengths=test.source_lengths[rows],
            eos_id=translation.EOS_ID)
  prompts = np.full((len(rows), 1), translation.BOS_ID)
  ones = np.ones(len(rows), np.int32)
  for run in runs.values():
    greedy = blockdec.greedy_decode(run.params, run.cfg, prompts, ones,
                                    max_new_tokens=12, **kw)
    for k in block_sizes:
      block = blockdec.blockwise_decode(run.params, run.cfg, prompts, ones,
                                        max_new_tokens=12, block_size=k, **kw)
      np.testing.assert_array_equal(block.tokens, greedy.tokens)
      np.testing.assert_array_equal(block.lengths, greedy.lengths)


def test_distillation_trains_on_the_base_translations(trained):
  _, locale, cache, base, _ = trained
  _, c = _config("tiny,distillation", locale)
  task = translation.TranslationTask(c.data, base.tokenizer)
  encoded = task.distill(base.params, base.cfg, num_sequences=5,
                         batch_size=4, cache_dir=cache / "distill_check",
                         seed=0, progress=False)
  out = blockdec.greedy_decode(
      base.params, base.cfg, np.full((5, 1), translation.BOS_ID),
      np.ones(5, np.int32), max_new_tokens=c.data.max_target_len,
      eos_id=translation.EOS_ID, source=encoded.sources,
      source_lengths=encoded.source_lengths)
  tokens = np.asarray(out.tokens)
  for i in range(5):
    n = int(out.lengths[i])
    np.testing.assert_array_equal(encoded.targets[i, 1:n + 1], tokens[i, :n])
    assert encoded.targets[i, 0] == translation.BOS_ID
    assert (encoded.targets[i, n + 1:] == translation.PAD_ID).all()
    assert encoded.target_lengths[i] == n
  # Cached: a second call reads the same arrays back.
  again = task.distill(base.params, base.cfg, num_sequences=5, batch_size=4,
                       cache_dir=cache / "distill_check", seed=0,
                       progress=False)
  np.testing.assert_array_equal(again.targets, encoded.targets)


def test_interrupted_training_resumes_and_loses_nothing(trained, tmp_path):
  _, locale, _, _, _ = trained
  _, c = _config("tiny", locale)
  c.steps = c.checkpoint_every = 3
  c.progress = False
  whole, _ = Trainer(c, tmp_path / "whole").run()
  Trainer(c, tmp_path / "cut").run(stop_at_step=1)  # Killed after step 1...
  c.checkpoint_every = 1
  Trainer(c, tmp_path / "cut2").run(stop_at_step=2)
  resumed, _ = Trainer(c, tmp_path / "cut2").run()  # ... resumed at step 2.
  for a, b in zip(jax.tree_util.tree_leaves(whole.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_benchmark_rows(trained, tmp_path):
  module, locale, cache, _, _ = trained
  report = module.run_benchmark(
      "tiny", str(cache), str(tmp_path / "st"), num_test=8,
      timed=("both",), timing_sentences=8, repeats=1, batch_size=8,
      approximate=("top2",), locale_dir=str(locale))
  rows = report["rows"]
  assert {r["regime"] for r in rows} == set(module.REGIMES)
  for r in rows:
    assert {"regime", "k", "acceptance", "mean_block_size", "bleu",
            "speedup_b1", "speedup_b8"} <= set(r)
    assert 1.0 <= r["mean_block_size"] <= r["k"] or r["acceptance"] != "exact"
    assert 0.0 <= r["bleu"] <= 100.0
  exact = [r for r in rows if r["acceptance"] == "exact"]
  assert all(r["identical_to_own_greedy"] == 1.0 for r in exact)
  timed = [r for r in exact if r["regime"] == "both" and r["k"] > 1]
  assert timed and all(r["speedup_b1"] > 0 and r["speedup_b8"] > 0
                       for r in timed)
  # The target check reads the "both" k = 8 row (the tiny preset has four
  # heads: no such row, so no verdict) and the regular model's greedy BLEU.
  assert report["target"] is None
  rows_k8 = rows + [dict(r, k=8) for r in rows
                    if (r["regime"], r["acceptance"]) == ("both", "exact")
                    and r["k"] == 4]
  t = module.target({"rows": rows_k8})
  both4 = next(r for r in rows if (r["regime"], r["k"], r["acceptance"])
               == ("both", 4, "exact"))
  assert t["block_size"] == both4["mean_block_size"]
  assert t["met"] == (both4["mean_block_size"] >= 4.0
                      and t["bleu_drop"] <= 1.0)
  for regime, tr in report["training"].items():
    assert tr["steps"] == 2 and len(tr["valid_head_losses"]) == 4, regime
    assert (tr["trunk_lr_scale"] is None) == (regime in ("regular",
                                                         "distillation"))
  # Head agreement along each regime's own greedy translations: head 1 is
  # that greedy output; top-5 contains top-1; a block spans 1..k tokens.
  for regime, h in report["head_agreement"].items():
    assert h["positions"] > 0 and len(h["top1"]) == 4, regime
    assert h["top1"][0] == pytest.approx(1.0), regime
    assert all(a <= b for a, b in zip(h["top1"], h["top5"])), regime
    assert 1.0 <= h["block_from_any_position"] <= 4.0, regime
  assert set(report["head_agreement"]) == set(module.REGIMES)
  assert set(report["head_agreement_train"]) == set(module.REGIMES)
  assert all(h["top1"][0] == pytest.approx(1.0)
             for h in report["head_agreement_train"].values())
  for r in rows:
    assert 0.0 <= r["degenerate_share"] <= 1.0, r
    nd = r["mean_block_size_non_degenerate"]
    assert (nd is None) == (r["degenerate_share"] == 1.0), r
    assert nd is None or 1.0 <= nd <= r["k"] or r["acceptance"] != "exact"
  assert 0.0 <= report["reference_degenerate_share"] <= 1.0
  # A call commits at most k tokens: no exact row beats the ceiling.
  assert set(report["ceiling"]) == set(module.REGIMES)
  for r in exact:
    c = report["ceiling"][r["regime"]]
    if r["k"] > 1:
      top = c["block_if_all_heads_right"][str(r["k"])]
      assert r["mean_block_size"] <= top + 1e-9 and top <= r["k"], r
  saved = json.loads((tmp_path / "st.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(rows))
  md = (tmp_path / "st.md").read_text()
  assert md.startswith("# Stern et al.") and "## Why blocks end" in md
  assert "stern_translation.py --preset=tiny --num_test=8`" in md
  assert "| degenerate |" in md
  assert "Not timed" not in md
  untimed = dict(report, rows=[dict(r, speedup_b1=None, speedup_b8=None)
                               for r in rows])
  assert "Not timed in this run" in module.markdown(untimed)
  assert report["head_type"] == "stern" and "Proposal heads: Stern's" in md
  hydra_md = module.markdown(dict(report, head_type="hydra"))
  assert "Proposal heads: Hydra's dependent heads, not Stern's" in hydra_md
  assert "--num_test=8 --head_type=hydra`" in hydra_md
  assert (tmp_path / "st.png").stat().st_size > 0


def test_ceiling_counts_the_calls_of_perfect_heads(tmp_path):
  module, _ = _config("tiny", tmp_path)
  # Sentences of 3 and 9 tokens at k = 4: 1 + 3 calls for 12 tokens.
  c = module.ceiling([3, 9], [2, 4, 10])
  assert c["mean_length"] == 6.0
  assert c["block_if_all_heads_right"] == {"2": 12 / 7, "4": 3.0, "10": 6.0}
  assert module._ceiling_cell(module.ceiling([3, 9], [8])) == "4.00 (6.0)"
  assert module._ceiling_cell(None) == "–"
  row = {"k": 8, "mean_block_size": 2.19, "bleu": 15.41,
         "mean_block_size_non_degenerate": 1.9}
  assert module._block_cell(row) == "2.19 (1.90) / 15.41"
  assert module._block_cell(dict(row, k=1)) == "2.19 / 15.41"
  assert module._block_cell(dict(row, mean_block_size_non_degenerate=None)) \
      == "2.19 / 15.41"


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="translation regime 'neither'"):
    pipeline.load_config(CONFIG, "tiny,neither")
  with pytest.raises(ValueError, match="preset 'huge'"):
    pipeline.load_config(CONFIG, "huge")
  c = pipeline.load_config(CONFIG, "tiny")
  c.data.locale_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    Trainer(c, tmp_path / "run")
  c = pipeline.load_config(CONFIG, "tiny")
  c.model.encoder_layers = 0
  c.data.locale_dir = str(_catalogs(tmp_path / "locale"))
  with pytest.raises(ValueError, match="encoder_layers >= 1"):
    Trainer(c, tmp_path / "run2")
  c.data.kind = "speech"
  with pytest.raises(ValueError, match="data.kind='speech'"):
    Trainer(c, tmp_path / "run3")


def test_overrides_change_only_the_named_regimes(trained):
  module, locale, cache, _, runs = trained
  _, changed = module.train_all("tiny", str(cache), str(locale),
                                overrides={"both": {"steps": 3}})
  assert int(changed["both"].summary["steps"]) == 3  # The preset's: 2.
  assert changed["both"].workdir != runs["both"].workdir
  for regime in ("regular", "distillation", "fine-tuning"):
    assert changed[regime].workdir == runs[regime].workdir  # Reused.
  assert module.overrides_flag(
      ["both:steps=3", "both:model.head_hidden=64", "regular:name=x"]) == {
          "both": {"steps": 3, "model.head_hidden": 64},
          "regular": {"name": "x"}}
  for bad in ("both", "both:steps", "neither:steps=3", "both:=3"):
    with pytest.raises(ValueError, match="--override entry"):
      module.overrides_flag([bad])
  c = module.load_config("tiny,both", str(locale))
  with pytest.raises(ValueError, match="no field 'model.nothing'"):
    module.apply_overrides(c, "both", {"model.nothing": 1})
  with pytest.raises(ValueError, match="no field 'steps.x'"):
    module.apply_overrides(c, "both", {"steps.x": 1})
  with pytest.raises(ValueError, match="both:steps='many'"):
    module.apply_overrides(c, "both", {"steps": "many"})
  module.apply_overrides(c, "both", {"base.model.head_hidden": 64})
  assert c.base.model.head_hidden == 64


def test_hydra_heads_train_every_regime_and_decode_exactly(trained):
  """configs/translation.py:<preset>,<regime>,hydra: the same regimes with
  Hydra's dependent heads, each fine-tuned regime starting from its Hydra
  row; decoding stays exact, and Stern's runs keep their names."""
  module, locale, cache, base, stern_runs = trained
  _, runs = module.train_all("tiny", str(cache), str(locale),
                             head_type="hydra")
  for regime, run in runs.items():
    assert run.cfg.head_type == "hydra", regime
    assert "_hydra_" in run.workdir.name, regime
    assert stern_runs[regime].cfg.head_type == "stern", regime
    assert "_hydra" not in stern_runs[regime].workdir.name, regime
  both = module.load_config("tiny,both,hydra", str(locale))
  assert both.base.name == "translation_distill_hydra_tiny_k4"
  assert both.base.model.head_type == "hydra"
  # The frozen-trunk regimes keep the base's trunk and head 1.
  flat = lambda p: jax.tree_util.tree_leaves(
      {k: v for k, v in p.items() if k != "proposal_heads"})
  for regime in ("regular", "distillation"):
    assert all(np.array_equal(a, b) for a, b in
               zip(flat(runs[regime].params), flat(base.params))), regime
  _assert_blockwise_is_greedy(runs, base, locale, block_sizes=(2, 4))
  for bad, match in (("tiny,both,medusa", "head type 'medusa'"),
                     ("tiny,,hydra", "expected <preset>"),
                     ("tiny,both,hydra,x", "expected <preset>")):
    with pytest.raises(ValueError, match=match):
      pipeline.load_config(CONFIG, bad)


def test_translation_trees_are_exact_and_reported(trained, tmp_path):
  _, locale, cache, _, _ = trained
  trees = experiment_script("translation_trees")
  report = trees.measure("tiny,both", str(cache), num_test=6, k=4,
                         trees=((8, 2),), locale_dir=str(locale),
                         out=tmp_path / "tt")
  assert [(r["method"], r["nodes"]) for r in report["rows"]] == [
      ("greedy", 1), ("block k=4", 4), ("dynamic tree", 8)]
  greedy = report["rows"][0]
  for r in report["rows"]:
    assert r["identical_to_greedy"] and r["bleu"] == greedy["bleu"], r
    assert 1.0 <= r["mean_block_size"] <= 4.0, r
  assert greedy["mean_block_size"] == 1.0
  md = (tmp_path / "tt.md").read_text()
  assert md.startswith("# Token trees on translation (tiny,both)")
  assert "| dynamic tree | 8 | 2 |" in md
  with pytest.raises(ValueError, match="k=9: allowed 2..4"):
    trees.measure("tiny,both", str(cache), num_test=6, k=9,
                  locale_dir=str(locale))
  with pytest.raises(FileNotFoundError, match="no finished"):
    trees.measure("tiny,fine-tuning,hydra", str(tmp_path / "empty"),
                  num_test=6, k=4, locale_dir=str(locale))


def test_both_over_fine_tuning_study(trained, tmp_path):
  """configs/translation.py:<preset>,both-over-fine-tuning: "both" from the
  fine-tuning run, distilled from the fine-tuned model; the study's rows
  stay exact and reach its report."""
  module, locale, cache, _, runs = trained
  study = experiment_script("translation_stronger_base")
  c = module.load_config("tiny,both-over-fine-tuning", str(locale))
  assert c.regime == "distill_finetune"
  assert c.base.name == runs["fine-tuning"].workdir.name.rsplit("-", 1)[0]
  assert c.name == "translation_distill_finetune_from_ft_tiny_k4"
  report = study.measure("tiny", str(cache), head_type="stern", num_test=6,
                         locale_dir=str(locale), out=tmp_path / "sb")
  assert [r["model"] for r in report["rows"]] == list(study.MODELS)
  for r in report["rows"]:
    assert r["identical_to_greedy"], r["model"]
    assert all(1.0 <= v <= int(k) for k, v in r["block"].items()), r
    assert set(r["lossy"]) == set(study.LOSSY)
  assert "_from_ft_" in report["rows"][-1]["run"]
  md = (tmp_path / "sb.md").read_text()
  assert md.startswith('# "both" over a stronger model (tiny, stern heads)')
  assert "| both-over-fine-tuning |" in md and "| degenerate |" in md
  with pytest.raises(ValueError, match="both-over-fine-tuning"):
    module.load_config("tiny,bogus", str(locale))
