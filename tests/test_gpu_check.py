"""benchmarks/gpu_check.sh on a machine without a GPU: argument handling, the plan and the JSON
of --dry-run, and one real step (env) through the checkout's shim package."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
STEPS = ["env", "wheels", "build", "tests", "bench", "e2e"]


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_dry_run_writes_the_plan_and_json(tmp_path):
    res = _run("--dry-run", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["ok"] is False  # nothing ran, nothing passed
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "dry-run" for s in report["steps"])
    assert report["env"]["python"] and report["env"]["cuda_available"] is False
    log = (tmp_path / "gpu_check.log").read_text()
    for needle in ("native.build(cuda=True", "-m cuda tests/test_native.py", "bench_native.py --device cuda", "gpu_e2e.py"):
        assert needle in log


def test_bad_arguments_are_refused(tmp_path):
    res = _run("--frobnicate")
    assert res.returncode == 2 and "unknown argument '--frobnicate'" in res.stderr
    res = _run("--dry-run", "--steps", "env,warp", "--out", str(tmp_path))
    assert res.returncode == 2 and "unknown step 'warp'" in res.stderr
    res = _run("--out")
    assert res.returncode == 2 and "--out needs a folder" in res.stderr
    res = _run("--help")
    assert res.returncode == 0 and "--dry-run" in res.stdout


def test_selected_step_runs_through_the_shim(tmp_path):
    """--steps env really runs: impasto imports from the checkout through the shim package, the
    other steps are reported as not selected, and the JSON says ok."""
    res = _run("--steps", "env", "--out", str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"env": "ok", **{s: "not-selected" for s in STEPS[1:]}}
    assert report["ok"] is True
    log = (tmp_path / "gpu_check.log").read_text()
    assert "impasto from" in log and "impasto_shim" in log
