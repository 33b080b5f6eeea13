import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from nmt_lightning.corpora import libreoffice
from nmt_lightning.corpora.cleaning import DropCounts, held_out_split
from nmt_lightning.corpora.libreoffice import aligned_paragraphs, debian_package, page_paragraphs
from nmt_lightning.prepare import PrepareConfig, prepare

PAGE = """<!DOCTYPE html><html><body><div id="DisplayArea">
<h1 id="hd_id1" dir="auto">{title}</h1>
<p id="par_id2" class="paragraph">{para}</p>
<p id="par_id3">Use <span class="switchinline"><span hidden="true" id="MACx"><span class="keycode">{mac}</span></span><span hidden="true" id="defaultx"><span class="keycode">Ctrl</span></span></span> + F<br>now.</p>
<p id="bm_id9">bookmark, not a paragraph</p>
</div></body></html>"""


def make_help_tree(root: Path, pages: int) -> Path:
    """A miniature help tree: en-US and cs pages aligned by id, one page missing in cs."""
    for number in range(pages):
        for lang, title, para, mac in (
            ("en-US", f"Title {number}", f"Paragraph &amp; text {number}, <b>bold</b> {number % 7}.", "Command"),
            ("cs", f"Nadpis {number}", f"Odstavec &amp; text {number}, <b>tučně</b> {number % 7}.", "Příkaz"),
        ):
            if lang == "cs" and number == pages - 1:
                continue
            page = root / lang / "text" / "shared" / f"page{number}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(PAGE.format(title=title, para=para, mac=mac), encoding="utf-8")
    return root


def test_page_paragraphs_strip_markup_and_hidden_variants(tmp_path: Path) -> None:
    page = make_help_tree(tmp_path, 1) / "en-US" / "text" / "shared" / "page0.html"
    assert page_paragraphs(page) == {
        "hd_id1": "Title 0",
        "par_id2": "Paragraph & text 0, bold 0.",
        "par_id3": "Use Ctrl + F now.",
    }


def test_alignment_by_page_and_id(tmp_path: Path) -> None:
    aligned = aligned_paragraphs(make_help_tree(tmp_path, 3), "en", "cs")
    # page2 exists only in English; untranslated "Use Ctrl + F now." is still aligned here.
    assert len(aligned) == 6
    assert aligned[0] == ("text/shared/page0.html#hd_id1", "Title 0", "Nadpis 0")


def test_debian_package_names() -> None:
    assert debian_package("en") == "libreoffice-help-en-us"
    assert debian_package("cs") == "libreoffice-help-cs"


def test_held_out_split_is_clean_in_both_directions() -> None:
    # Sources repeat with different targets and targets repeat with different sources.
    pairs = [(f"s{i % 50}", f"t{i % 70}") for i in range(400)]
    pairs = list(dict.fromkeys(pairs))
    splits = held_out_split(pairs, valid_size=10, test_size=20, seed=3, counts=DropCounts())
    assert len(splits["valid"]) == 10 and len(splits["test"]) == 20
    held = splits["valid"] + splits["test"]
    assert not {s for s, _ in held} & {s for s, _ in splits["train"]}
    assert not {t for _, t in held} & {t for _, t in splits["train"]}
    assert held_out_split(pairs, 10, 20, 3, DropCounts()) == splits  # deterministic


def test_prepare_libreoffice_from_help_root(tmp_path: Path) -> None:
    help_root = make_help_tree(tmp_path / "help", 40)
    data = prepare(PrepareConfig(out_dir=str(tmp_path / "out"), corpus="libreoffice", help_root=str(help_root),
                                 valid_size=5, test_size=10, vocab_size=64))
    stats = data["text_stats"]
    assert (stats["train"]["pairs"], stats["valid"]["pairs"], stats["test"]["pairs"]) == (63, 5, 10)
    dropped = stats["corpus"]["dropped"]
    # 39 aligned pages x 3 paragraphs; "Use Ctrl + F now." is identical in both languages
    # on every page: untranslated; the 7 distinct "bold N" endings make no duplicates.
    assert stats["corpus"]["read"] == 117 and dropped["untranslated (source == target)"] == 39
    test_sources = set((tmp_path / "out" / "test.en").read_text().splitlines())
    train_sources = set((tmp_path / "out" / "train.en").read_text().splitlines())
    assert test_sources and not test_sources & train_sources


def fake_help_deb(root: Path, lang_dir: str, package: str, version: str, pages: int) -> Path:
    """A real .deb (dpkg-deb --build) holding a miniature help tree for one language."""
    tree = root / f"build-{package}"
    make_help_tree(tree / "usr/share/libreoffice/help", pages)
    for other in ("en-US", "cs"):
        if other != lang_dir:
            shutil.rmtree(tree / "usr/share/libreoffice/help" / other)
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@example.org>\n"
        f"Description: test\n", encoding="utf-8")
    deb = root / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    return deb


def test_prepare_records_the_packages_it_was_built_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """prepare.json names each Debian package, its version and its sha256, and prepare prints them."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    debs = {"libreoffice-help-en-us": fake_help_deb(tmp_path, "en-US", "libreoffice-help-en-us", "1:7.4.7-1", 40),
            "libreoffice-help-cs": fake_help_deb(tmp_path, "cs", "libreoffice-help-cs", "1:7.4.7-1", 40)}

    def download(package: str, download_dir: Path) -> list[Path]:
        return [Path(shutil.copy(debs[package], download_dir))]

    monkeypatch.setattr(libreoffice, "_apt_download", download)
    config = PrepareConfig(out_dir=str(tmp_path / "out"), corpus="libreoffice", cache_dir=str(tmp_path / "cache"),
                           valid_size=5, test_size=10, vocab_size=64)
    data = prepare(config)
    sources = data["text_stats"]["corpus"]["sources"]
    assert [(s["package"], s["version"]) for s in sources] == [("libreoffice-help-en-us", "1:7.4.7-1"),
                                                               ("libreoffice-help-cs", "1:7.4.7-1")]
    assert sources[1]["sha256"] == hashlib.sha256(debs["libreoffice-help-cs"].read_bytes()).hexdigest()
    assert f"built from libreoffice-help-cs 1:7.4.7-1 (sha256 {sources[1]['sha256']})" in capsys.readouterr().out
    # A second run reuses the unpacked packages and still knows what they were.
    monkeypatch.setattr(libreoffice, "_apt_download", None)
    again = prepare(PrepareConfig(**{**config.__dict__, "out_dir": str(tmp_path / "again")}))
    assert again["text_stats"]["corpus"]["sources"] == sources
