"""benchmarks/gpu_train.py's product table on CPU (--dry-run): the nanoGPT reference and the
platform's own loop in one process, the chunked-loss variant, and the host-sync count — the code a
card runs, with tiny presets and no compile."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_dry_run_prints_every_row_and_no_host_sync_per_step():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_train", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.strip().startswith("reference gpt2-tiny:") for line in lines), out.stdout
    rows = [line for line in lines if re.match(r"\s*loop (gpt2|llama)-tiny none(:chunk64)?:", line)]
    assert len(rows) == 4 and not any("FAILED" in row for row in rows), out.stdout
    # random tokens: every loop row's loss is near ln(8192) = 9.01
    assert all(8.5 < float(re.search(r"loss ([\d.]+)", row).group(1)) < 9.5 for row in rows), rows
    assert "x the reference's tok/s" in rows[0] and "x the reference's MFU" in rows[2]
    syncs = re.search(r"host syncs per step outside log steps: (\S+) \((\d+) in a 6-step run", out.stdout)
    assert syncs is not None and float(syncs.group(1)) == 0 and int(syncs.group(2)) > 0, out.stdout
