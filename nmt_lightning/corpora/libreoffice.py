"""The embedded English-Czech corpus: LibreOffice help pages from Debian packages.

Debian ships the help of every LibreOffice language as HTML (``libreoffice-help-en-us``,
``libreoffice-help-cs``, ...). Each page exists in every language under the same relative
path, and every translatable paragraph or heading carries the same ``id`` attribute in all of
them, so paragraphs align exactly by ``(page path, id)``. ``apt-get download`` needs neither
root nor an installation, and ``dpkg -x`` unpacks a package into any directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

from nmt_lightning.errors import CorpusError

HELP_SUBDIR = Path("usr/share/libreoffice/help")
# Debian has no "libreoffice-help-en": English is the en-us package.
_DEBIAN_LANGUAGE_SUFFIX = {"en": "en-us"}
# Translatable elements carry ids like "par_id3147762" or "hd_id701641581066778".
_TRANSLATABLE_ID = re.compile(r"^(par|hd)_id")
_TEXT_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def debian_package(lang: str) -> str:
    return f"libreoffice-help-{_DEBIAN_LANGUAGE_SUFFIX.get(lang.lower(), lang.lower())}"


def package_record(deb: Path) -> dict[str, str]:
    """Name, version and sha256 of a downloaded .deb: what a score's data was built from."""
    fields = {}
    for field in ("Package", "Version"):
        result = subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True)
        fields[field.lower()] = result.stdout.strip() if result.returncode == 0 else "unknown"
    digest = hashlib.sha256()
    with open(deb, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {**fields, "sha256": digest.hexdigest(), "file": deb.name}


def fetch_help_tree(cache_dir: str | os.PathLike, langs: list[str]) -> tuple[Path, list[dict[str, str]]]:
    """Download and unpack the help packages for ``langs`` into ``cache_dir``.

    Returns the help root and, per package, its name, version and sha256 (the distribution's
    packages change over time: the record says which ones a prepared corpus came from).
    Reuses an already unpacked tree. Needs ``apt-get`` (Debian/Ubuntu) with a package list.
    """
    cache_dir = Path(cache_dir)
    unpacked = cache_dir / "unpacked"
    records = []
    for lang in langs:
        package = debian_package(lang)
        marker = cache_dir / f".{package}.unpacked"
        if marker.exists():
            try:
                records.append(json.loads(marker.read_text(encoding="utf-8")))
                continue
            except ValueError:  # a marker of an older version: empty; describe the .deb it unpacked
                debs = sorted((cache_dir / "debs").glob(f"{package}_*.deb"))
                record = package_record(debs[-1]) if debs else {"package": package, "version": "unknown",
                                                                   "sha256": "unknown", "file": "unknown"}
                marker.write_text(json.dumps(record), encoding="utf-8")
                records.append(record)
                continue
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise CorpusError(
                "the LibreOffice corpus is built from Debian packages, but apt-get/dpkg are not "
                "available here; unpack the help HTML elsewhere and pass --help-root DIR"
            )
        download_dir = cache_dir / "debs"
        download_dir.mkdir(parents=True, exist_ok=True)
        debs = _apt_download(package, download_dir)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
        record = package_record(debs[-1])
        marker.write_text(json.dumps(record), encoding="utf-8")
        records.append(record)
    return unpacked / HELP_SUBDIR, records


def _apt_download(package: str, download_dir: Path) -> list[Path]:
    """``apt-get download PACKAGE`` into ``download_dir``; on a fresh machine whose package
    lists are empty, run ``apt-get update`` once (as root) and try again."""
    for attempt in range(2):
        result = subprocess.run(["apt-get", "download", package], cwd=download_dir, capture_output=True, text=True)
        debs = sorted(download_dir.glob(f"{package}_*.deb"))
        if result.returncode == 0 and debs:
            return debs
        if attempt == 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            print(f"apt-get download {package} failed; running 'apt-get update' once and retrying", flush=True)
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
    message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no .deb file"
    raise CorpusError(
        f"'apt-get download {package}' failed: {message} (run 'apt-get update' first, or pass --help-root DIR)"
    )


def language_dir(help_root: str | os.PathLike, lang: str) -> Path:
    """The directory of ``lang`` under the help root: ``cs`` for cs, ``en-US`` for en."""
    help_root = Path(help_root)
    if not help_root.is_dir():
        raise CorpusError(f"{help_root}: no such help directory")
    candidates = [help_root / lang] + sorted(
        d for d in help_root.iterdir() if d.is_dir() and d.name.lower().startswith(lang.lower() + "-")
    )
    for candidate in candidates:
        if (candidate / "text").is_dir():
            return candidate
    available = sorted(d.name for d in help_root.iterdir() if (d / "text").is_dir())
    raise CorpusError(f"{help_root}: no help pages for language '{lang}' (found: {', '.join(available) or 'none'})")


class _ParagraphParser(HTMLParser):
    """Collects the text of every translatable paragraph/heading of one page, keyed by id.

    Inline platform switches hold one hidden variant per system ("MAC...", "default...");
    only the default variant is kept, as the help viewer shows it on Linux.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        # Stack of open elements: (tag, paragraph id or None, hides its content).
        self._stack: list[tuple[str, str | None, bool]] = []
        self._buffers: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self.handle_data(" ")
        if tag in _VOID_TAGS:
            return
        attributes = dict(attrs)
        element_id = attributes.get("id") or ""
        paragraph_id = element_id if tag in _TEXT_TAGS and _TRANSLATABLE_ID.match(element_id) else None
        collecting = any(pid for _, pid, _ in self._stack)
        hides = collecting and "hidden" in attributes and not element_id.startswith("default")
        self._stack.append((tag, paragraph_id, hides))
        if paragraph_id is not None:
            self._buffers[paragraph_id] = []

    def handle_endtag(self, tag: str) -> None:
        # Pop up to the matching open tag; tolerates unclosed inner elements.
        for depth in range(len(self._stack) - 1, -1, -1):
            if self._stack[depth][0] == tag:
                for _, paragraph_id, _ in self._stack[depth:]:
                    if paragraph_id is not None:
                        self.paragraphs[paragraph_id] = " ".join("".join(self._buffers.pop(paragraph_id)).split())
                del self._stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        if any(hides for _, _, hides in self._stack):
            return
        for _, paragraph_id, _ in self._stack:
            if paragraph_id is not None:
                self._buffers[paragraph_id].append(data)


def page_paragraphs(page: Path) -> dict[str, str]:
    """``{element id: plain text}`` for one help page (markup stripped, entities unescaped)."""
    parser = _ParagraphParser()
    try:
        parser.feed(page.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CorpusError(f"{page}: invalid UTF-8 at byte {error.start}") from None
    parser.close()
    return parser.paragraphs


def aligned_paragraphs(help_root: str | os.PathLike, src: str, tgt: str) -> list[tuple[str, str, str]]:
    """All paragraphs present in both languages, as ``(key, src_text, tgt_text)`` sorted by key.

    The key is ``"page/path.html#element_id"``. Pages missing in one language are skipped.
    """
    src_dir, tgt_dir = language_dir(help_root, src), language_dir(help_root, tgt)
    pages = sorted(p.relative_to(src_dir) for p in (src_dir / "text").rglob("*.html"))
    if not pages:
        raise CorpusError(f"{src_dir / 'text'}: no .html help pages")
    aligned: list[tuple[str, str, str]] = []
    for relative in tqdm(pages, desc=f"aligning help pages {src}-{tgt}", unit="page"):
        target_page = tgt_dir / relative
        if not target_page.is_file():
            continue
        src_paragraphs = page_paragraphs(src_dir / relative)
        tgt_paragraphs = page_paragraphs(target_page)
        for element_id in sorted(src_paragraphs.keys() & tgt_paragraphs.keys()):
            aligned.append((f"{relative.as_posix()}#{element_id}", src_paragraphs[element_id], tgt_paragraphs[element_id]))
    return aligned
