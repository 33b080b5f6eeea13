"""The README: short, its links alive, the two commands first."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    assert len(README) <= 15000
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)[:2]
    assert "main_job.sh" in commands[0] and "pytest" in commands[1] and "'.[dev]'" in commands[1]


def test_every_local_link_exists() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
