"""The speech benchmark's ``--quick`` run end to end (slow: about 3 minutes on 2 cores): it writes
its JSON and only its own section of RESULTS.md, and every transcript it checked equals
``generate()``'s greedy text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.audio_report import HEADING
from tests.server import server_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
]
ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_its_section_and_equal_transcripts(
    tmp_path: Path, cache_dir: Path, whisper_base_model: Path
) -> None:
    other = "# Another benchmark\n\nkept as it was\n"
    (tmp_path / "RESULTS.md").write_text(other)
    subprocess.run(
        [sys.executable, "benchmarks/audio_bench.py", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=server_env(cache_dir),
        check=True,
        timeout=900,
    )
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith(other) and HEADING in text
    results = json.loads((tmp_path / "audio_results.json").read_text())
    assert results["errors"] == {}
    for level in ("c1", "c8"):
        assert set(results[level]) == {"generate", "hfserve", "transformers serve"}
        for run in results[level].values():
            assert run["mismatches"] == [] and run["audio_s_per_s"] > 0, run
    mixed = results["mixed"]
    assert mixed["transcriptions_done_during_load"] > 0 and mixed["transcript_mismatches"] == []
    assert mixed["chat_reply_mismatches"] == []
    assert mixed["chat_with_transcriptions"]["completed"] == mixed["streams"] * mixed["rounds"]
