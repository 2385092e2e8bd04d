"""The three-model study (examples/overfitting_study.py): a smoke run and its bad input.

The smoke run is ``--quick`` with two seeds (so the per-seed and summary paths run) on the
embedded data; its outputs are checked against values the test derives on its own: parameter
counts from torchvision's unmodified models, map and receptive-field sizes from the
architecture by hand, summaries re-computed from the per-seed numbers, verdicts and claim
outcomes re-derived from the stated rules.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "overfitting_study.py"
sys.path.insert(0, str(ROOT / "examples"))

from study import data, verdict  # noqa: E402
from study.errors import StudyInputError  # noqa: E402
from study.output import StagedOutput  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "resnet10")
FIGURES = ("learning_curves.png", "gradcam_grid.png", "map_stats.png", "receptive_fields.png",
           "erf.png")
QUICK_EPOCHS = 2
QUICK_SEEDS = 2
FMNIST_IDX = Path("/usr/share/datasets/fashion-mnist")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- the smoke run


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    parent = tmp_path_factory.mktemp("study")
    out = parent / "out"
    proc = _run("--quick", "--seeds", str(QUICK_SEEDS), "--train-size", "80", "--val-size",
                "60", "--epochs", str(QUICK_EPOCHS), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _leftovers(parent) == []
    return out, json.loads((out / "metrics.json").read_text())


def test_quick_writes_every_file(quick):
    out, _ = quick
    from PIL import Image

    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert min(im.size) >= 200
    report = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in report


def test_metrics_schema_and_ranges(quick):
    _, m = quick
    assert set(m["models"]) == set(MODELS)
    assert m["dataset"]["name"] == "fmnist"
    assert m["dataset"]["train_size"] == 80 and m["dataset"]["val_size"] == 60
    assert m["config"]["seeds"] == list(range(QUICK_SEEDS))
    for name in MODELS:
        info = m["models"][name]
        assert isinstance(info["params"], int)
        assert isinstance(info["target_layer"], str) and info["target_layer"]
        assert set(info["history"]) == {"train_loss", "val_loss", "train_acc", "val_acc",
                                        "val_acc_bn_recomputed"}
        assert len(info["runs"]) == QUICK_SEEDS
        for run in info["runs"]:
            hist = run["history"]
            for key, values in hist.items():
                assert len(values) == QUICK_EPOCHS, key
                assert all(math.isfinite(v) for v in values)
            for key in ("train_acc", "val_acc", "val_acc_bn_recomputed"):
                assert all(0.0 <= v <= 1.0 for v in hist[key])
            assert all(v > 0 for v in hist["train_loss"] + hist["val_loss"])
            # accuracies are counts over 80 and 60 images
            assert all(abs(v * 80 - round(v * 80)) < 1e-6 for v in hist["train_acc"])
            assert all(abs(v * 60 - round(v * 60)) < 1e-6 for v in hist["val_acc"])
            stats = run["map_stats"]
            for key in ("focus_share", "entropy", "deletion_auc", "insertion_auc"):
                assert 0.0 <= stats[key] <= 1.0, key
            assert stats["focus_images"] + stats["degenerate_maps"] >= 60


def test_params_match_torchvision_counts(quick):
    # Independent count: torchvision's unmodified models, minus their ImageNet first
    # convolution (7x7x3x64 for ResNets, 3x3x3x32 for MobileNetV2), plus the 1-channel 3x3 one.
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    expected = {
        "resnet18": count(torchvision.models.resnet18(num_classes=10)) - 7 * 7 * 3 * 64 + 9 * 64,
        "resnet10": count(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)) - 7 * 7 * 3 * 64
        + 9 * 64,
        "mobilenet_v2": count(torchvision.models.mobilenet_v2(num_classes=10)) - 9 * 3 * 32
        + 9 * 32,
    }
    _, m = quick
    assert {k: m["models"][k]["params"] for k in MODELS} == expected


def test_target_maps_and_receptive_fields(quick):
    # total stride 8 on 28 px: ceil(28 / 8) = 4 cells per side. Receptive fields by hand
    # (r' = r + S (k - 1) per conv; 1x1 convs add nothing): ResNet-10 3 + 2*2 (layer1)
    # + 2 + 4 (layer2) + 4 + 8 (layer3) + 8 + 16 (layer4) = 49; ResNet-18 has twice the
    # blocks: 109; MobileNetV2 (one 3x3 per block): 127.
    _, m = quick
    expected = {"resnet18": 109, "resnet10": 49, "mobilenet_v2": 127}
    for name in MODELS:
        info = m["models"][name]
        assert info["target_map_size"] == [4, 4]
        rf = info["receptive_field"]
        assert rf["size"] == [expected[name]] * 2, rf
        assert rf["stride"] == [8, 8]


def test_summaries_recomputed_from_runs(quick):
    _, m = quick
    rules = m["rules"]
    for name in MODELS:
        info = m["models"][name]
        runs = info["runs"]
        for key in ("train_acc", "val_acc"):
            per_seed = [r["history"][key][-1] for r in runs]
            assert info["summary"][key]["values"] == pytest.approx(per_seed)
            assert info["summary"][key]["mean"] == pytest.approx(np.mean(per_seed))
            assert info["summary"][key]["std"] == pytest.approx(np.std(per_seed, ddof=1))
            assert info["history"][key] == pytest.approx(
                np.mean([r["history"][key] for r in runs], axis=0).tolist())
        for r in runs:
            tr, va = r["history"]["train_acc"][-1], r["history"]["val_acc"][-1]
            if tr < rules["train_acc_underfit"]:
                want = "underfits"
            elif tr - va > rules["gap_overfit"]:
                want = "overfits"
            else:
                want = "fits"
            assert r["final"]["verdict"] == want


def test_claim_outcomes_follow_the_stated_rule(quick):
    _, m = quick
    comparisons = [c for c in m["claims"] if "per_seed_difference" in c]
    assert len(comparisons) == len(verdict.COMPARISONS)
    for c in comparisons:
        a = m["models"][c["a"]]["summary"][c["metric"]]["values"]
        b = m["models"][c["b"]]["summary"][c["metric"]]["values"]
        diffs = np.subtract(a, b)
        assert c["per_seed_difference"] == pytest.approx(diffs.tolist())
        claimed = 1 if ">" in c["test"] else -1
        signed = claimed * diffs
        big = abs(signed.mean()) > m["rules"]["min_effect"]
        if big and (signed > 0).all():
            assert c["outcome"] == "supported"
        elif big and (signed < 0).all():
            assert c["outcome"] == "contradicted"
        else:
            assert c["outcome"] == "inconclusive"


def test_publish_writes_a_docs_page_whose_figures_exist(quick, tmp_path):
    import publish_study

    out, m = quick
    run = tmp_path / "run"
    run.mkdir()
    for name in [*FIGURES, "report.md"]:
        (run / name).write_bytes((out / name).read_bytes())
    (run / "metrics.json").write_text(json.dumps({**m, "config": {**m["config"], "quick": True}}))
    with pytest.raises(SystemExit, match="--quick run"):
        publish_study.publish(run, tmp_path / "docs")
    (run / "metrics.json").write_text(json.dumps({**m, "config": {**m["config"], "quick": False}}))
    page = publish_study.publish(run, tmp_path / "docs").read_text()
    linked = [line.split("](", 1)[1].rstrip(")") for line in page.splitlines()
              if line.startswith("![")]
    assert sorted(Path(p).name for p in linked) == sorted(FIGURES)
    assert all((tmp_path / "docs" / p).is_file() for p in linked)
    assert m["command"] in page
    (run / "erf.png").unlink()
    with pytest.raises(SystemExit, match=r"erf\.png"):
        publish_study.publish(run, tmp_path / "docs")


# ---------------------------------------------------------------- bad input


def _assert_clean_failure(proc, parent: Path, out: Path, *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert _leftovers(parent) == []
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dataset", "imagenet"], ["'imagenet'", "fmnist, cifar10, folder"]),
        (["--dataset", "cifar10"], ["--data-root", "--download"]),
        (["--dataset", "folder"], ["--data-root"]),
        (["--data-root", "{tmp}/no-such-dir"], ["--data-root", "IDX"]),
        (["--data-root", "{tmp}"], ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        (["--train-size", "5"], ["--train-size 5", "between 10 and 4000"]),
        (["--classes", "Shoe"], ["Shoe", "Sneaker"]),
        (["--epochs", "0"], ["--epochs", "positive"]),
    ],
    ids=["unknown-dataset", "cifar-no-root", "folder-no-root", "missing-root", "root-no-idx",
         "train-size", "unknown-class", "epochs-0"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = _run(*args, "--out", str(out))
    _assert_clean_failure(proc, tmp_path, out, *words)
    assert not out.exists()


def test_unwritable_out_parent_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    proc = _run("--out", str(out))
    _assert_clean_failure(proc, tmp_path, out, "--out", "writable")
    assert blocker.read_text() == "not a folder"


def test_out_that_is_a_file_or_foreign_folder_is_refused(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    proc = _run("--out", str(target))
    _assert_clean_failure(proc, tmp_path, tmp_path / "nothing", "--out", "not a folder")
    assert target.read_text() == "keep me"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    proc = _run("--out", str(foreign))
    _assert_clean_failure(proc, tmp_path, foreign, "--out", "new or empty folder")
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


# ---------------------------------------------------------------- pieces, in process


def test_staged_output_appears_only_on_commit(tmp_path):
    out = tmp_path / "res"
    staged = StagedOutput(out)
    (staged.path / "metrics.json").write_text("{}")
    (staged.path / "report.md").write_text("new")
    assert not out.exists()
    staged.commit()
    assert (out / "report.md").read_text() == "new"

    again = StagedOutput(out)  # an earlier output is replaced as a whole
    (again.path / "metrics.json").write_text("{}")
    (again.path / "report.md").write_text("newer")
    again.commit()
    assert (out / "report.md").read_text() == "newer"

    failed = StagedOutput(out)
    (failed.path / "report.md").write_text("half")
    failed.discard()
    assert (out / "report.md").read_text() == "newer"
    assert _leftovers(tmp_path) == []


def test_stratified_indices_keep_class_shares():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])  # shares 0.5, 0.25, 0.15, 0.10
    idx = data.stratified_indices(labels, 40, rng)
    assert len(set(idx.tolist())) == 40
    assert np.bincount(labels[idx], minlength=4).tolist() == [20, 10, 6, 4]
    # a prefix of a larger draw with the same generator state is the smaller draw
    big = data.stratified_indices(labels, 100, np.random.default_rng(9))
    small = data.stratified_indices(labels, 40, np.random.default_rng(9))
    assert small.tolist() == big[:40].tolist()
    with pytest.raises(StudyInputError):
        data.stratified_indices(labels, 201, rng)


def test_fit_verdict_rule_at_its_thresholds():
    assert verdict.fit_verdict(0.89, 0.89) == "underfits"
    assert verdict.fit_verdict(1.00, 0.85) == "overfits"
    assert verdict.fit_verdict(0.95, 0.86) == "fits"
    assert verdict.fit_verdict(0.90, 0.80) == "fits"  # gap exactly 0.10 is not over it


def test_comparison_rule():
    c = verdict.Comparison("x", "focus_share", "a", "b", higher=True)
    assert c.decide([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])["outcome"] == "supported"
    assert c.decide([0.4, 0.5, 0.6], [0.5, 0.6, 0.7])["outcome"] == "contradicted"
    assert c.decide([0.5, 0.4], [0.4, 0.5])["outcome"] == "inconclusive"      # seeds disagree
    assert c.decide([0.405, 0.406], [0.4, 0.4])["outcome"] == "inconclusive"  # too small
    lower = verdict.Comparison("x", "entropy", "a", "b", higher=False)
    out = lower.decide([0.3, 0.2], [0.5, 0.5])
    assert out["outcome"] == "supported"
    assert out["per_seed_difference"] == pytest.approx([-0.2, -0.3])


def test_read_idx_round_trip(tmp_path):
    import gzip

    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + array.tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x-idx3-ubyte.gz"), array)
    (tmp_path / "bad").write_bytes(header[:8] + array.tobytes())
    with pytest.raises(StudyInputError):
        data.read_idx(tmp_path / "bad")


@pytest.mark.skipif(not FMNIST_IDX.is_dir(), reason="Debian's dataset-fashion-mnist is absent")
def test_embedded_subset_is_the_original_images():
    with np.load(data.EMBEDDED_FILE) as npz:
        sub = {k: npz[k] for k in npz.files}
    full = {k: data.read_idx(FMNIST_IDX / f"{stem}.gz") for k, stem in data.FMNIST_FILES.items()}
    np.testing.assert_array_equal(sub["x_train"], full["train_images"][sub["train_index"]])
    np.testing.assert_array_equal(sub["y_train"], full["train_labels"][sub["train_index"]])
    np.testing.assert_array_equal(sub["x_test"], full["val_images"][sub["test_index"]])
    np.testing.assert_array_equal(sub["y_test"], full["val_labels"][sub["test_index"]])
    assert np.bincount(sub["y_train"]).tolist() == [400] * 10
    assert np.bincount(sub["y_test"]).tolist() == [100] * 10
    assert tuple(sub["classes"]) == data.FMNIST_CLASSES


def test_least_coverage_by_hand():
    from study.report import least_coverage

    def rf(size, stride, padding):
        return {"size": [size] * 2, "stride": [stride] * 2, "padding": [padding] * 2}

    # ResNet-10 of the study: cell 0 sees rows -24..24, i.e. 25 of the 28 rows; others all.
    assert least_coverage(rf(49, 8, 24), [4, 4], [28, 28]) == pytest.approx((25 / 28) ** 2)
    assert least_coverage(rf(109, 8, 54), [4, 4], [28, 28]) == 1.0
    # A 3x3 stride-2 conv with padding 1: the corner cell sees rows 0..1 and cols 0..1.
    assert least_coverage(rf(3, 2, 1), [14, 14], [28, 28]) == pytest.approx((2 / 28) ** 2)
    assert least_coverage({"size": None}, [4, 4], [28, 28]) is None


def test_recomputed_batchnorm_statistics_by_hand():
    import torch
    from study.train import accuracy_with_recomputed_bn, evaluate
    from torch import nn

    # BN(1 channel) -> flatten -> linear. The recomputed statistics are the mean over the
    # training batches (256 images each) of each batch's mean and unbiased variance.
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    model[0].running_mean.fill_(50.0)  # statistics that lag the data badly
    model[0].running_var.fill_(0.01)
    x_train = torch.randn(512, 1, 2, 2) * 3 + 1
    x_val = torch.randn(90, 1, 2, 2) * 3 + 1
    y_val = model[2](((x_val - 1) / 3).flatten(1)).argmax(1)  # labels the right stats give
    before = {k: v.clone() for k, v in model.state_dict().items()}

    batches = x_train.split(256)
    mean = torch.stack([b.mean() for b in batches]).mean()
    var = torch.stack([b.var() for b in batches]).mean()
    reference = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    reference.load_state_dict(model.state_dict())
    reference[0].running_mean.fill_(mean.item())
    reference[0].running_var.fill_(var.item())

    recomputed = accuracy_with_recomputed_bn(model, x_train, (x_val, y_val))
    assert recomputed == evaluate(reference, x_val, y_val)[1]
    assert recomputed > 0.9 > evaluate(model, x_val, y_val)[1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_batchnorm_note_names_the_epochs_where_eval_mode_lags():
    from study.report import _batchnorm_note

    def model(label, evald, recomputed):
        return {"label": label, "history": {"val_acc": evald, "val_acc_bn_recomputed": recomputed}}

    lagging = {"a": model("Net-A", [0.1, 0.1, 0.5, 0.7], [0.4, 0.6, 0.59, 0.7]),
               "b": model("Net-B", [0.5, 0.6], [0.55, 0.65])}
    note = _batchnorm_note(lagging)
    assert "Net-A, epochs 1-2 (epoch 2: 0.10 against 0.60; last epoch: 0.70 against 0.70)" in note
    assert "Net-B" not in note  # within 0.1 throughout
    gaps = {"a": model("Net-A", [0.1, 0.5, 0.5, 0.1], [0.4, 0.5, 0.5, 0.4])}
    assert "Net-A, epochs 1, 4 (epoch 1:" in _batchnorm_note(gaps)
    calm = {"b": lagging["b"]}
    assert "stays within 0.10" in _batchnorm_note(calm)
    assert _batchnorm_note({"c": {"label": "Old", "history": {"val_acc": [0.5]}}}) == ""
