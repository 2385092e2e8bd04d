"""The benchmark scripts run end to end, and every peer computes the same maps as camkit.

A smoke run only: timings are recorded, never asserted (they belong to benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import camkit as ck

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
PEERS = ("pytorch-grad-cam", "torchcam", "captum")


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install camkit[bench])")


def _run(script: str, args: list[str], out: Path) -> None:
    env = {**os.environ, "CAMKIT_BENCH_RESULTS": str(out)}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-4000:]}"


def test_cam_benchmark_smoke_run(tmp_path: Path) -> None:
    _needs("torchvision", "pytorch_grad_cam", "torchcam", "captum", "matplotlib")
    # Two batch sizes, so the batch-scaling plot has a line to draw; no resolution sweep.
    _run("bench_cam.py", ["--quick", "--tag", "smoke", "--models", "resnet18",
                          "--batches", "1", "2", "--sweep-sizes"], tmp_path)
    result = json.loads((tmp_path / "smoke.json").read_text())
    (check,) = result["checks"]
    assert check["ok"] and set(check["peers"]) == set(PEERS)
    for peer, diff in check["peers"].items():
        # Same definition of Grad-CAM: the maps agree to float32 rounding.
        assert diff["layer_max_abs_diff"] < 1e-4, peer
        assert diff["maps_max_abs_diff"] < 1e-4, peer
    rows = {r["competitor"]: r for r in result["summary"]}
    assert {"camkit", "forward_nograd", "forward_grad", "forward_backward", *PEERS} <= set(rows)
    for name, row in rows.items():
        assert row["time_s"] > 0 and row["samples"] >= 2, name
        assert row["time_vs_camkit"] == pytest.approx(row["time_s"] / rows["camkit"]["time_s"])
    table = (tmp_path / "smoke.md").read_text()
    assert all(peer in table for peer in PEERS)
    assert (tmp_path / "smoke_batch.png").stat().st_size > 0


def test_receptive_field_benchmark_smoke_run(tmp_path: Path) -> None:
    _needs("torchvision")
    _run("bench_rf.py", ["--quick", "--models", "resnet50"], tmp_path)
    (path,) = tmp_path.glob("*.json")
    records = {r["tool"]: r for r in json.loads(path.read_text())["records"]}
    camkit = records["camkit"]
    assert camkit["ok"], camkit
    import torchvision

    expected = ck.receptive_field(torchvision.models.resnet50(), input_size=(3, 224, 224))
    assert camkit["probe"]["size"] == expected["layer4"].size[0]
    assert camkit["probe"]["stride"] == expected["layer4"].stride[0] == 32
    if "torchscan" in records:  # optional: recorded with its error when absent
        assert "ok" in records["torchscan"]


def test_profile_replays_the_public_call_exactly(tmp_path: Path) -> None:
    # The profile re-enacts CAM.__call__ stage by stage with camkit's private pieces: when the
    # engine changes, the replay must still compute the very maps the public call returns.
    _needs("torchvision")
    _run("profile_cam.py", ["--models", "resnet18", "--batch", "2", "--reps", "1",
                            "--allocators", "default", "--tag", "smoke"], tmp_path)
    (record,) = json.loads((tmp_path / "smoke.json").read_text())
    assert record["replay_max_abs_diff"] == 0.0
    assert record["auto_layer"] == "layer4"
    stages = ("prepare", "forward_to_layer", "head", "scores", "backward", "weights",
              "combine", "upsample", "scale")
    assert all(record["time_s"][s] >= 0 for s in stages)
