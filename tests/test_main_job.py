"""recipes/libreoffice_en_cs/main_job.sh run twice: the second run translates what it trained.

The real commands take half an hour; here ``nmt-lightning`` and ``python`` are stand-ins on
PATH that act as the real ones do on the files that matter: ``fit`` writes last.ckpt, or
last-v1.ckpt when last.ckpt exists (Lightning's own ModelCheckpoint; the recipes' replaces
it), and ``translate`` records which checkpoint it was given.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_NMT_LIGHTNING = """#!/usr/bin/env bash
set -e
case "$1" in
  fit)
    mkdir -p runs/libreoffice_en_cs_tiny/checkpoints
    cd runs/libreoffice_en_cs_tiny/checkpoints
    run=$(cat "$FAKE_RUN_ID")
    if [ -e last.ckpt ]; then echo "$run" > last-v1.ckpt; else echo "$run" > last.ckpt; fi ;;
  translate)
    shift
    while [ $# -gt 0 ]; do
      if [ "$1" = "--checkpoint" ]; then cat "$2" >> "$FAKE_TRANSLATED"; fi
      shift
    done ;;
esac
"""


def test_a_second_run_translates_the_model_it_trained(tmp_path: Path) -> None:
    work = tmp_path / "checkout"
    (work / "recipes" / "libreoffice_en_cs").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "libreoffice_en_cs" / "main_job.sh", work / "recipes" / "libreoffice_en_cs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nmt-lightning", FAKE_NMT_LIGHTNING), ("python", "#!/usr/bin/env bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    translated = tmp_path / "translated"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_TRANSLATED=str(translated),
               FAKE_RUN_ID=str(tmp_path / "run_id"))
    for run in ("first", "second"):
        (tmp_path / "run_id").write_text(run)
        result = subprocess.run(["bash", "recipes/libreoffice_en_cs/main_job.sh"], cwd=work, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert translated.read_text().split() == ["first", "second"]
    assert "previous run's files are now in runs/previous/" in result.stdout
    (previous,) = (work / "runs" / "previous").iterdir()
    assert (previous / "libreoffice_en_cs_tiny" / "checkpoints" / "last.ckpt").read_text().strip() == "first"
