import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[2] / "recipes" / "benchmarks" / "dataset_memory.py"


def test_two_million_pairs_do_not_grow_resident_memory(tmp_path: Path) -> None:
    """The memory-mapped dataset of 2M pairs and its epoch's batch plan stay far below 300 MB.

    Anonymous memory (what the process allocates, not the file pages of the maps, which the
    kernel drops at will) is measured in a fresh process over the first 300 batches.
    """
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        from dataset_memory import write_corpus
    finally:
        sys.path.pop(0)
    write_corpus(tmp_path, pairs=2_000_000, vocab_size=32000)
    result = subprocess.run([sys.executable, str(BENCHMARK), "--measure-only", "--workdir", str(tmp_path),
                             "--batches", "300"], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout)
    assert measured["pairs"] == 2_000_000
    assert measured["anon_growth_mib"] < 300, measured
