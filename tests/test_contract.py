"""compression_contract: one copy of what callbacks and exporters agree on, and the import rules it keeps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def imports_of(path: Path) -> set[str]:
    """The modules a file imports (absolute names), wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", ["nmt_lightning", "callbacks", "compression_contract"])
def test_the_import_rules(package: str) -> None:
    """The core never imports callbacks/ (not even lazily); a callback imports no nmt_lightning and
    no sibling callback (shared helpers are callbacks/_*.py or the contract); the contract imports
    neither side."""
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = imports_of(path)
        if package == "nmt_lightning":
            assert not any(name == "callbacks" or name.startswith("callbacks.") for name in imported), path
        elif package == "callbacks":
            assert not any(name.startswith("nmt_lightning") for name in imported), path
            siblings = {name for name in imported if name.startswith("callbacks.")
                        and not name.split(".")[1].startswith("_")}
            assert path.name == "__init__.py" or not siblings, (path, siblings)
        else:
            assert not any(name.startswith(("nmt_lightning", "callbacks")) for name in imported), path


def test_one_grid_for_training_and_export() -> None:
    """QAT's forward, Quant-Noise's noise and the int8/int4 codecs round through the same function."""
    import callbacks.quant_noise
    import callbacks.quantization_aware_training
    import nmt_lightning.export.codecs.int8_kernels
    from compression_contract import grid

    assert callbacks.quantization_aware_training.round_to_grid is grid.round_to_grid
    assert callbacks.quant_noise.round_to_grid is grid.round_to_grid
    assert nmt_lightning.export.codecs.int8_kernels.quantize_weight is grid.quantize_weight


def test_the_translation_module_offers_the_loss_term_protocol() -> None:
    from compression_contract import TASK_LOSS, LossTermHost
    from nmt_lightning.module import CROSS_ENTROPY, TranslationModule

    module = TranslationModule(64, 64, d_model=32, ffn_dim=64, heads=2, encoder_layers=1, decoder_layers=1)
    assert isinstance(module, LossTermHost) and CROSS_ENTROPY == TASK_LOSS
    module.remove_loss_term("never registered")  # ignored, as the protocol says
    module.set_loss_weight(TASK_LOSS, 0.8)
    assert module.loss_weight(TASK_LOSS) == 0.8


def test_no_import_cycle_in_the_core() -> None:
    """Every import of nmt_lightning (module level or inside a function) as an edge; importing a
    submodule imports its packages too. A package's own __init__ importing its children (the
    codecs registering themselves) is not counted; any other cycle is."""
    modules = {}
    for path in (ROOT / "nmt_lightning").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported in imports_of(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            target = imported
            while target:  # the module and every package above it run on import
                if target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                    edges[name].add(target)
                target = target.rpartition(".")[0] if "." in target else ""
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, " -> ".join(trail[trail.index(node):] + [node])
        visiting.add(node)
        for nxt in sorted(edges[node]):
            visit(nxt, trail + [nxt])
        visiting.discard(node)
        done.add(node)

    for start in sorted(modules):
        visit(start, [start])
