"""tools/gpu_check.py --dry-run: the GPU acceptance run's plumbing on the CPU (build command, gpu test
selection, every benchmark step at tiny sizes, JSON + markdown written to the folder given)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _run(*args, timeout=1500):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert data["finished"] and data["dry_run"]
    rows = data["rows"]
    steps = {r["step"] for r in rows}
    assert {"build", "tests", "copy", "ops", "models", "e2e"} <= steps, steps
    assert not [r for r in rows if r["status"] in ("error", "failed")], [r for r in rows if r["status"] != "ok"]
    # the gpu tests were selected and, without a GPU, every one skipped with its reason
    (tests,) = [r for r in rows if r["name"].startswith("pytest -m gpu")]
    counts = tests["note"]
    assert "'passed': 0" in counts and "'failed': 0" in counts and "'skipped': 0" not in counts, counts
    assert any(r["status"] == "skipped" and "cuda" in r["note"].lower() for r in rows if r["step"] == "tests")
    # each op measured on the reference and the cpp backend, checked first, against the copy rate
    ops = [r for r in rows if r["step"] == "ops"]
    assert {r["name"].split(" [")[0] for r in ops} == {"face_context float32", "attention_pool fwd+bwd float32",
                                                      "attention_pool fwd+bwd bfloat16",
                                                      "adaptive_fusion fwd+bwd float32",
                                                      "adaptive_fusion fwd+bwd bfloat16"}
    assert all(r["value"] > 0 and r["ratio"] > 0 and r["ratio_of"] == "of copy" for r in ops)
    models = [r for r in rows if r["step"] == "models"]
    assert len(models) == 10 and all(r["value"] > 0 for r in models)  # CAER-S 3+3, CAER-Net 2+2
    e2e = [r for r in rows if r["step"] == "e2e" and r["status"] == "ok"]
    assert len(e2e) == 2 and e2e[1]["ratio_of"] == "of decode-only", e2e
    for r in rows:  # the markdown table holds every row
        assert f"| {r['step']} | {r['name']} | {r['status']} |" in md, r["name"]
    assert "finished after" in md and (out / "build.log").exists() and (out / "gpu_tests.xml").exists()


def test_partial_results_and_bad_input(tmp_path):
    """Steps past the budget are reported skipped (never a crash), the files are still written;
    bad arguments give one error line and exit status 2."""
    out = tmp_path / "o"
    proc = _run(out, "--dry-run", "--steps", "copy,models", "--budget", "25", timeout=600)
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["finished"] and proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # copy runs unless importing torch alone ate the budget (a loaded machine)
    assert [r["status"] for r in data["rows"] if r["step"] == "copy"] in (["ok"], ["skipped"])
    models = [r for r in data["rows"] if r["step"] == "models"]
    assert models and all(r["status"] == "skipped" and "budget" in r["note"] for r in models), models
    assert "| models |" in (out / "gpu_check.md").read_text()

    proc = _run(tmp_path / "x", "--dry-run", "--steps", "copy,warp-drive", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "warp-drive" in proc.stderr
    afile = tmp_path / "file"
    afile.write_text("")
    proc = _run(afile, "--dry-run", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and str(afile) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
