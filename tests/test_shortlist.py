"""The vocabulary shortlist: IBM Model 1 against a small reference written here, the map's
format, and CTranslate2 translating with it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from nmt_lightning.cli import main
from nmt_lightning.shortlist import build_shortlist, lexical_probabilities, read_vocabulary_map

# "the" (9) follows every target sentence: co-occurrence alone ranks it first for every source word.
CORPUS = [([4, 5], [9, 7, 8]), ([4, 6], [9, 7, 10]), ([5, 6], [9, 8, 10]), ([4], [9, 7]), ([11, 5], [9, 12, 8])]


def model1_reference(pairs, iterations: int) -> dict[tuple[int, int], float]:
    """Brown et al.'s EM for t(f | e), with a NULL source word (None), written the plain way."""
    co = defaultdict(set)
    for source, target in pairs:
        for e in [None, *source]:
            co[e].update(target)
    t = {(e, f): 1.0 / len(fs) for e, fs in co.items() for f in fs}
    for _ in range(iterations):
        count = defaultdict(float)
        total = defaultdict(float)
        for source, target in pairs:
            for f in target:
                z = sum(t[(e, f)] for e in [None, *source])
                for e in [None, *source]:
                    count[(e, f)] += t[(e, f)] / z
                    total[e] += t[(e, f)] / z
        t = {(e, f): count[(e, f)] / total[e] for (e, f) in t}
    return t


@pytest.mark.parametrize("iterations", [1, 4])
def test_model1_is_brown_et_al_em(iterations: int) -> None:
    table = lexical_probabilities(CORPUS, iterations)
    found = {(None if int(e) == -1 else int(e), int(f)): float(p)
             for e, f, p in zip(table.source, table.target, table.probability)}
    expected = model1_reference(CORPUS, iterations)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-12), key


def test_em_finds_the_translation_where_co_occurrence_finds_the_frequent_word() -> None:
    table = lexical_probabilities(CORPUS, 10)

    def best(source: int) -> int:
        mine = table.source == source
        return int(table.target[mine][table.probability[mine].argmax()])

    assert best(4) == 7 and best(5) == 8 and best(6) == 10
    co_occurrence = defaultdict(int)
    for source, target in CORPUS:
        for e in source:
            for f in target:
                co_occurrence[(e, f)] += 1
    assert max((f for e, f in co_occurrence if e == 4), key=lambda f: co_occurrence[(4, f)]) == 9


def test_the_map_of_a_prepared_directory(prepared_dir: Path, tmp_path: Path) -> None:
    report = build_shortlist(prepared_dir, tmp_path / "vmap.txt", best=3, frequent=5, progress=False)
    lines = (tmp_path / "vmap.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("\t") and len(lines[0].split("\t")[1].split(" ")) == 5  # always allowed
    assert len(lines) == report.source_pieces + 1 and report.source_pieces > 10
    assert all(len(line.split("\t")[1].split(" ")) <= 3 for line in lines[1:])
    assert all("<unk>" not in line and "<s>" not in line.split("\t")[1] for line in lines)


def test_the_report_counts_what_a_sentence_and_a_batch_of_32_allow(prepared_dir: Path, tmp_path: Path) -> None:
    """A batch allows the union of its sentences' candidates (CTranslate2 restricts a batch, not a
    sentence): recomputed here from the written map's pieces for the 50 validation sentences in
    length order, batches of 32 and 18, plus unk, bos and eos."""
    from nmt_lightning.binarized import TokenArray
    from nmt_lightning.data import TranslationDataModule

    report = build_shortlist(prepared_dir, tmp_path / "vmap.txt", best=2, frequent=1, progress=False)
    lines = (tmp_path / "vmap.txt").read_text(encoding="utf-8").splitlines()
    always = set(lines[0].split("\t")[1].split())
    rules = {line.split("\t")[0]: set(line.split("\t")[1].split()) for line in lines[1:]}
    data = TranslationDataModule(str(prepared_dir), src_lang="en", tgt_lang="cs")
    processor = data.tokenizer("en")
    valid = TokenArray(prepared_dir / "valid.en", data.src_vocab_size)
    sentences = [[processor.id_to_piece(int(i)) for i in valid[k]] for k in range(len(valid))]
    assert len(sentences) == 50
    allowed = [always.union(*(rules.get(piece, set()) for piece in pieces)) for pieces in sentences]
    order = sorted(range(50), key=lambda k: len(sentences[k]))
    batches = [set().union(*(allowed[k] for k in order[:32])), set().union(*(allowed[k] for k in order[32:]))]
    assert report.mean_candidates == pytest.approx(sum(len(a) + 3 for a in allowed) / 50)
    assert report.mean_batch_candidates == pytest.approx((len(batches[0]) + len(batches[1])) / 2 + 3)
    assert report.mean_batch_candidates > report.mean_candidates


def test_a_bad_map_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "vmap.txt"
    path.write_text("\ta b\nx\tb\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vmap.txt:3: a vocabulary map line is 'source pieces<TAB>target pieces'"):
        read_vocabulary_map(path, {"a", "b"})
    path.write_text("\ta b\nx\tb zz\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vmap.txt:2: 'zz' is not a piece of the model's target vocabulary"):
        read_vocabulary_map(path, {"a", "b"})
    assert read_vocabulary_map(tmp_path / "vmap.txt", {"a", "b", "zz"}) == [([], ["a", "b"]), (["x"], ["b", "zz"])]


@pytest.mark.parametrize("bad, message", [
    (dict(best=0), "--best must be an integer >= 1"), (dict(frequent=-1), "--frequent must be an integer >= 0"),
    (dict(iterations=True), "--iterations must be an integer >= 1"), (dict(max_sentences=0), "--max-sentences"),
])
def test_bad_settings_are_named(prepared_dir: Path, tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_shortlist(prepared_dir, tmp_path / "vmap.txt", progress=False, **bad)


ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")


def test_translation_with_the_shortlist(prepared_dir: Path, tmp_path: Path) -> None:
    """A map allowing every piece translates as no map does; a map allowing few pieces keeps the
    output within them (and changes it); shortlist=False turns it off; a map of other pieces is
    refused. A model of random weights, whose translations are long and varied."""
    from nmt_lightning.deploy import CTranslate2Model
    from nmt_lightning.deploy.ctranslate2_converter import convert_module
    from tests.test_ctranslate2 import random_module

    module = random_module(prepared_dir, "all", pre_norm=False)
    target = module.tokenization._processor("tgt")
    pieces = [target.id_to_piece(i) for i in range(4, target.get_piece_size())]
    (tmp_path / "all.txt").write_text("\t" + " ".join(pieces) + "\n", encoding="utf-8")
    (tmp_path / "few.txt").write_text("\t" + " ".join(pieces[:6]) + "\n", encoding="utf-8")
    for name in ("all", "few", None):
        convert_module(module, tmp_path / str(name), vocabulary_map=name and tmp_path / f"{name}.txt")
    assert (tmp_path / "few" / "vmap.txt").is_file() and not (tmp_path / "None" / "vmap.txt").exists()
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:20]
    plain = CTranslate2Model(tmp_path / "None", threads=1).translate_lines(lines, beam=2, progress=False)
    assert sum(len(line) for line in plain) > 100  # long and varied
    assert CTranslate2Model(tmp_path / "all", threads=1).translate_lines(lines, beam=2, progress=False) == plain
    few = CTranslate2Model(tmp_path / "few", threads=1)
    assert few.shortlist
    restricted = few.translate_lines(lines, beam=2, progress=False)
    assert restricted != plain
    allowed = set(pieces[:6])
    for line in restricted:
        assert set(target.encode(line, out_type=str)) <= allowed | {"▁"}, line
    unrestricted = CTranslate2Model(tmp_path / "few", threads=1, shortlist=False)
    assert unrestricted.translate_lines(lines, beam=2, progress=False) == plain
    with pytest.raises(ValueError, match="no vocabulary map"):
        CTranslate2Model(tmp_path / "None", shortlist=True)
    (tmp_path / "other.txt").write_text("\tzzz_not_a_piece\n", encoding="utf-8")
    with pytest.raises(ValueError, match="other.txt:1: 'zzz_not_a_piece' is not a piece"):
        convert_module(module, tmp_path / "other", vocabulary_map=tmp_path / "other.txt")


def test_shortlist_command_then_export_and_translate(prepared_dir: Path, trained_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    assert main(["shortlist", "--data-dir", str(prepared_dir), "--output", str(tmp_path / "vmap.txt")]) == 0
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--format", "ctranslate2", "--output",
                 str(tmp_path / "ct2"), "--vocabulary-map", str(tmp_path / "vmap.txt")]) == 0
    for extra in ([], ["--no-shortlist"]):
        assert main(["translate", "--checkpoint", str(tmp_path / "ct2"), "--input", str(prepared_dir / "test.en"),
                     "--output", str(tmp_path / "hyp.cs"), "--beam", "2", *extra]) == 0
    assert main(["translate", "--checkpoint", str(trained_checkpoint), "--input", str(prepared_dir / "test.en"),
                 "--output", str(tmp_path / "hyp.cs"), "--no-shortlist"]) == 2
    assert main(["translate", "--checkpoint", str(tmp_path / "ct2"), "--input", str(prepared_dir / "test.en"),
                 "--output", str(tmp_path / "hyp.cs"), "--vocabulary-map", str(tmp_path / "vmap.txt")]) == 2
    assert main(["translate", "--checkpoint", str(trained_checkpoint), "--input", str(prepared_dir / "test.en"),
                 "--output", str(tmp_path / "ours.cs"), "--vocabulary-map", str(tmp_path / "vmap.txt")]) == 0


def test_our_decoder_with_the_map_translates_as_ctranslate2_with_it(prepared_dir: Path, tmp_path: Path) -> None:
    """The same vocabulary map read by our decoder (Shortlist) and by CTranslate2 (use_vmap): the
    same greedy translations of a random model; a map of every piece changes nothing."""
    from nmt_lightning.deploy import CTranslate2Model
    from nmt_lightning.deploy.ctranslate2_converter import convert_module
    from nmt_lightning.shortlist import Shortlist
    from nmt_lightning.translate import translate_lines
    from tests.test_ctranslate2 import random_module

    module = random_module(prepared_dir, "all", pre_norm=False)
    target = module.tokenization._processor("tgt")
    source = module.tokenization._processor("src")
    pieces = [target.id_to_piece(i) for i in range(4, target.get_piece_size())]
    # Each source piece allows a handful of target pieces, some n-grams more: the candidates differ per batch.
    lines = ["\t" + " ".join(pieces[:2])]
    for i in range(4, source.get_piece_size()):
        lines.append(f"{source.id_to_piece(i)}\t{pieces[2 + i % 6]}")
    lines.append(f"{source.id_to_piece(5)} {source.id_to_piece(6)}\t{pieces[-1]}")
    (tmp_path / "map.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    convert_module(module, tmp_path / "ct2", vocabulary_map=tmp_path / "map.txt")
    sentences = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:24]
    shortlist = Shortlist.read(tmp_path / "map.txt", module.tokenization)
    ours = translate_lines(module, sentences, beam=1, batch_size=4, progress=False, shortlist=shortlist)
    theirs = CTranslate2Model(tmp_path / "ct2", threads=1).translate_lines(sentences, beam=1, batch_size=4,
                                                                          progress=False)
    assert ours == theirs and ours != translate_lines(module, sentences, beam=1, batch_size=4, progress=False)
    (tmp_path / "all.txt").write_text("\t" + " ".join(pieces) + "\n", encoding="utf-8")
    everything = Shortlist.read(tmp_path / "all.txt", module.tokenization)
    assert translate_lines(module, sentences, beam=3, batch_size=4, progress=False, shortlist=everything) == \
        translate_lines(module, sentences, beam=3, batch_size=4, progress=False)
