"""tools/gpu_check.sh, the one command for a GPU machine (issue #8): its parts fit the 5 minutes
it promises, and what it runs exists here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_gpu_check_parts_fit_five_minutes_and_exist():
    text = SCRIPT.read_text()
    parts = re.findall(r"^part (\S+) (\d+) (.*)$", text, flags=re.M)
    names = [name for name, _, _ in parts]
    assert len(names) == len(set(names)) and {"gpu_tests", "gpu_tests_simulation", "bench_step"} <= set(names)
    (grace,) = re.findall(r"timeout -s INT -k (\d+) ", text)  # SIGKILL that long after SIGINT
    # 5 minutes, less a few seconds for nvidia-smi and the version line before the parts
    assert sum(int(secs) + int(grace) for _, secs, _ in parts) <= 295, parts
    for _, _, cmd in parts:
        for script in re.findall(r"(bench/\w+\.py|tests/[\w/]+\.py)", cmd):
            assert (ROOT / script).is_file(), script
    # every GPU test file is in one of the two test parts
    assert "--ignore=tests/test_gpu_simulation.py tests" in text and "tests/test_gpu_simulation.py\n" in text
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
