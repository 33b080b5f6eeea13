"""Sources of parallel text: line-aligned files, the LibreOffice help, sacrebleu test sets."""

from nmt_lightning.corpora.parallel_text import find_side, open_text, read_parallel

__all__ = ["find_side", "open_text", "read_parallel"]
