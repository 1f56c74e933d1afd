"""benchmarks/gpu_check.py: its dry run exercises every section on the CPU, and without an accelerator
it stops with a clear message unless told to run on the CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["1_trainers", "2_lora_signals", "3_resnet9_copy", "4_auto", "5_shared"]


def _run(*args, timeout=120, **env):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, check=False)


def _numbers(obj):
    """Every int / float (not bool) inside a nested JSON object."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_dry_run_on_cpu(tmp_path):
    proc = _run("--dry-run", "--device", "cpu", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (dry-run)")
    assert report["mode"] == "dry-run"
    for key in SECTIONS:
        sec = report["sections"][key]
        assert sec["status"] == "ok", (key, sec.get("error"), sec.get("traceback"))
        assert not sec.get("skipped"), (key, sec["skipped"])
        nums = _numbers(sec["results"])
        assert nums and all(math.isfinite(x) for x in nums), (key, sec["results"])

    trainers = report["sections"]["1_trainers"]["results"]
    assert [r["workload"] for r in trainers] == ["mlp", "cnn"]
    for r in trainers:
        assert r["signals_equal"] and r["scores_equal"], r
        assert r["sequential_s_per_copy"] > 0 and r["vmap_s_per_copy"] > 0

    lora = report["sections"]["2_lora_signals"]["results"]
    assert [r["K"] for r in lora] == report["sizes"]["lora"]["ks"]
    assert all(r["signals_equal"] and r["multi_adapter_s"] > 0 for r in lora), lora

    copy = report["sections"]["3_resnet9_copy"]["results"]
    for key in ("seconds_per_copy", "peak_memory_bytes", "projected_seconds_K", "orthogonal_block_seconds"):
        assert copy[key] >= 0, (key, copy)
    assert copy["seconds_per_copy"] > 0 and copy["peak_memory_bytes"] > 0
    assert copy["trainer_used"] == "sequential"  # ResNet-9 has BatchNorm running statistics: no vmap

    auto = {r["model"]: r for r in report["sections"]["4_auto"]["results"]}
    assert sorted(auto) == ["cnn", "lora", "mlp", "resnet9"]
    for r in auto.values():
        assert "error" not in r, r
        assert r["trainer_used"] in ("sequential", "vmap", "shared") and r["trainer_reason"], r
        assert r["signal_path_used"] in ("sequential", "vmap", "shared", "multi-adapter") and r["signal_path_reason"], r

    shared = {r["workload"]: r for r in report["sections"]["5_shared"]["results"]}
    assert list(shared) == ["mlp_class", "lr"]
    for r in shared.values():  # the same copies from both trainers, both timed in every round
        assert r["scores_equal"] and r["scores_rel_diff"] <= 1e-2, r
        assert len(r["vmap_rounds_s"]) == len(r["shared_rounds_s"]) == report["sizes"]["shared"]["rounds"]
        assert r["speedup"] == r["vmap_s_at_K"] / r["shared_s_at_K"] > 0 and r["shared_layout"] in ("union", "gather")
    assert "MLPModule.forward traced by torch.fx" in shared["mlp_class"]["shared_reason"], shared["mlp_class"]
    assert "5_shared" in (tmp_path / "gpu_check.md").read_text()


def test_without_accelerator_it_stops_clearly(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path), timeout=60, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode != 0
    assert "no CUDA accelerator" in proc.stderr and "--device cpu" in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_budget_guard_skips_and_records(tmp_path):
    proc = _run("--dry-run", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for key in SECTIONS:
        sec = report["sections"][key]
        assert sec["status"] == "skipped" and "--budget-s" in sec["reason"], sec
