"""camkit.explain_dataset: records, aggregates, resumption, refusal, two processes, the CLI.

References are independent of the dataset code: per-image CAM calls, a float64 copy of the
model for scores and predictions, NumPy re-computations of focus, entropy, block means and
per-class statistics, and byte comparison of whole output folders.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
)

from camkit import CamkitError, GradCAM, GradCAMPlusPlus, cli
from camkit.dataset import explain_dataset, load_explanations

N_IMAGES, N_CLASSES = 40, 5
LAYER = "2"


class Images(Dataset):
    """40 images 3x32x32 whose mean depends on the label; records which indices were read."""

    def __init__(self, fail_at: int | None = None, labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, N_CLASSES, (N_IMAGES,), generator=g)
        noise = torch.randn(N_IMAGES, 3, 32, 32, generator=g)
        self.images = noise + 0.5 * self.labels[:, None, None, None].float()
        self.fail_at, self.labelled, self.calls = fail_at, labelled, []

    def __len__(self) -> int:
        return N_IMAGES

    def __getitem__(self, index: int):
        self.calls.append(index)
        if index == self.fail_at:
            raise RuntimeError(f"injected failure at index {index}")
        if not self.labelled:
            return self.images[index]
        return self.images[index], int(self.labels[index])


def make_model(seed: int = 1) -> nn.Module:
    """Two convolutions and a flatten + linear head (dY/dA varies over space)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16 * 16, N_CLASSES),
    )


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_folder(a: Path, b: Path) -> None:
    files_a, files_b = folder_bytes(a), folder_bytes(b)
    assert sorted(files_a) == sorted(files_b)
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert not different, f"files differ: {different}"


def np_focus_entropy(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = maps.astype(np.float64).reshape(len(maps), -1)
    peak = m.max(axis=1, keepdims=True)
    focus = (m >= 0.5 * peak).mean(axis=1)
    p = m / m.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return focus, -terms.sum(axis=1) / np.log(m.shape[1])


@pytest.fixture(scope="module")
def data() -> Images:
    return Images()


@pytest.fixture(scope="module")
def reference(data: Images) -> dict[str, np.ndarray]:
    """float64 logits of every image and per-image CAM maps for its label."""
    model = make_model()
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(data.images.double()).numpy()
    cam = GradCAM(model, target_layer=LAYER)
    maps = np.stack([cam(data.images[i:i + 1], [int(data.labels[i])]).maps[0].numpy()
                     for i in range(N_IMAGES)])
    return {"logits": logits, "maps": maps, "labels": data.labels.numpy()}


@pytest.fixture(scope="module")
def by_label(tmp_path_factory, data: Images):
    out = tmp_path_factory.mktemp("by_label")
    result = explain_dataset(GradCAM(make_model(), target_layer=LAYER), data, out,
                             batch_size=8, shard_size=16, targets="label", map_dtype="float32",
                             aggregate_size=(8, 8), progress=False)
    return out, result


# --------------------------------------------------------------------------- contents
def test_records_and_maps_match_per_image_calls(by_label, reference) -> None:
    out, result = by_label
    rec = result.records
    assert rec["index"].tolist() == list(range(N_IMAGES))
    assert rec["shard"].tolist() == [i // 16 for i in range(N_IMAGES)]
    assert rec["row"].tolist() == [i % 16 for i in range(N_IMAGES)]
    assert rec["label"].tolist() == reference["labels"].tolist()
    assert rec["target"].tolist() == reference["labels"].tolist()
    assert rec["pred"].tolist() == reference["logits"].argmax(axis=1).tolist()
    expected_scores = reference["logits"][np.arange(N_IMAGES), reference["labels"]]
    np.testing.assert_allclose(rec["score"], expected_scores, rtol=1e-5, atol=1e-5)

    maps = result.maps(np.arange(N_IMAGES))
    assert maps.shape == (N_IMAGES, 32, 32)
    np.testing.assert_allclose(maps, reference["maps"], atol=1e-5)
    np.testing.assert_array_equal(result.maps(7), maps[7])
    focus, entropy = np_focus_entropy(maps)
    np.testing.assert_allclose(rec["focus"], focus, atol=1e-6)
    np.testing.assert_allclose(rec["entropy"], entropy, atol=1e-5)
    assert not rec["degenerate"].any()
    # The JSON index holds the same numbers as the arrays (it is what was read back).
    first = json.loads((out / "index.json").read_text())["images"][3]
    assert first["index"] == 3 and first["row"] == 3 and first["shard"] == 0
    assert np.float32(first["score"]) == rec["score"][3]
    with pytest.raises(CamkitError, match="was not explained"):
        result.maps([40])


def test_aggregates_match_numpy_grouping(by_label, reference) -> None:
    _, result = by_label
    maps = result.maps(np.arange(N_IMAGES)).astype(np.float64)
    blocks = maps.reshape(N_IMAGES, 8, 4, 8, 4).mean(axis=(2, 4))  # area average to 8x8
    labels, pred = reference["labels"], reference["logits"].argmax(axis=1)
    classes = sorted(set(labels.tolist()))
    assert result.aggregates["classes"] == classes
    means = result.class_mean_maps
    focus, entropy = np_focus_entropy(maps)
    for row, c in enumerate(classes):
        members = labels == c
        np.testing.assert_allclose(means[row], blocks[members].mean(axis=0), atol=1e-6)
        stats = result.aggregates["per_class"][row]
        assert stats["images"] == members.sum()
        assert stats["correct"] == (pred[members] == c).sum()
        assert stats["focus_mean"] == pytest.approx(focus[members].mean(), abs=1e-6)
        assert stats["focus_std"] == pytest.approx(focus[members].std(), abs=1e-5)
        assert stats["entropy_mean"] == pytest.approx(entropy[members].mean(), abs=1e-5)
    wrong = np.flatnonzero(pred != labels)
    assert 0 < len(wrong) < N_IMAGES
    assert result.misclassified.tolist() == wrong.tolist()
    np.testing.assert_allclose(result.misclassified_maps, blocks[wrong], atol=1e-6)
    overall = result.aggregates["overall"]
    assert overall["accuracy"] == pytest.approx((pred == labels).mean())
    report = (result.out / "report.md").read_text()
    assert "Misclassified images" in report
    first = result.aggregates["per_class"][0]
    assert "| class | images | accuracy |" in report  # the column holds a share, not a count
    assert f"| {first['class']} | {first['images']} | {first['accuracy']:.3f} |" in report


def test_keep_raw_stats_and_float16(tmp_path, data, by_label) -> None:
    _, full = by_label
    cam = GradCAM(make_model(), target_layer=LAYER)
    common = dict(batch_size=8, shard_size=16, targets="label", report=False, progress=False)
    raw = explain_dataset(cam, data, tmp_path / "raw", keep="raw", **common)
    expected_raw = cam(data.images[5:6], [int(data.labels[5])]).raw[0].numpy()
    np.testing.assert_allclose(raw.maps(5), expected_raw, rtol=1e-5, atol=1e-7)
    assert raw.maps(5).shape == (16, 16)

    stats = explain_dataset(cam, data, tmp_path / "stats", keep="stats", **common)
    assert not list((tmp_path / "stats" / "shards").glob("*.npy"))
    for name in ("pred", "target", "focus", "entropy"):
        np.testing.assert_array_equal(stats.records[name], full.records[name])
    with pytest.raises(CamkitError, match="keep='stats'"):
        stats.maps(0)

    explain_dataset(cam, data, tmp_path / "half", **common)  # map_dtype float16
    stored = np.load(tmp_path / "half" / "shards" / "shard-00001.maps.npy")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, full.maps(np.arange(16, 32)).astype(np.float16))


def test_dataloader_is_read_in_index_order_and_subsets_are_kept(tmp_path, data) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    common = dict(shard_size=16, report=False, progress=False)
    explain_dataset(cam, data, tmp_path / "ds", batch_size=8, **common)
    shuffled = DataLoader(data, batch_size=8, shuffle=True)
    explain_dataset(cam, shuffled, tmp_path / "dl", **common)
    assert_same_folder(tmp_path / "ds", tmp_path / "dl")

    subset = [31, 3, 17, 8]
    loader = DataLoader(data, batch_size=2, sampler=SubsetRandomSampler(subset))
    part = explain_dataset(cam, loader, tmp_path / "sub", **common)
    assert part.records["index"].tolist() == sorted(subset)
    whole = load_explanations(tmp_path / "ds")
    np.testing.assert_allclose(part.maps(sorted(subset)), whole.maps(sorted(subset)), atol=1e-3)


class OneElementLabels(Images):
    """Labels as one-element tensors, which collate to (N, 1)."""

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return image, torch.tensor([label])


def test_loaders_that_stand_for_the_whole_dataset(tmp_path, data) -> None:
    # A DistributedSampler (here rank 1 of 2) and a DataLoader that does not batch
    # (batch_size=None) both mean "every image"; tensor labels of shape (1,) are labels.
    cam = GradCAM(make_model(), target_layer=LAYER)
    common = dict(shard_size=16, report=False, progress=False)
    explain_dataset(cam, data, tmp_path / "ds", batch_size=8, **common)
    ranked = DataLoader(data, batch_size=8,
                        sampler=DistributedSampler(data, num_replicas=2, rank=1))
    explain_dataset(cam, ranked, tmp_path / "ranked", **common)
    assert_same_folder(tmp_path / "ds", tmp_path / "ranked")
    explain_dataset(cam, DataLoader(data, batch_size=None), tmp_path / "unbatched",
                    batch_size=8, **common)
    assert_same_folder(tmp_path / "ds", tmp_path / "unbatched")
    labels = explain_dataset(cam, OneElementLabels(), tmp_path / "labels", batch_size=8,
                             targets="label", **common)
    assert labels.records["label"].tolist() == data.labels.tolist()


def test_a_sampler_without_a_fixed_set_of_images_is_refused(tmp_path, data) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    drawn = DataLoader(data, batch_size=8,
                       sampler=RandomSampler(data, replacement=True, num_samples=20))
    with pytest.raises(CamkitError, match="picks different images on each pass"):
        explain_dataset(cam, drawn, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- nothing lost
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path) -> None:
    model = make_model()
    cam = GradCAM(model, target_layer=LAYER)
    args = dict(batch_size=4, shard_size=8, report=False, progress=False)
    explain_dataset(cam, Images(), tmp_path / "whole", **args)

    broken = Images(fail_at=29)  # shard 3 holds 24..31: its second batch fails
    with pytest.raises(RuntimeError, match="injected failure"):
        explain_dataset(cam, broken, tmp_path / "resumed", **args)
    shards = tmp_path / "resumed" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [
        f"shard-{k:05d}.{kind}" for k in range(3) for kind in ("maps.npy", "npz")
    ]
    assert not (tmp_path / "resumed" / "index.json").exists()
    with pytest.raises(CamkitError, match="did not finish"):
        load_explanations(tmp_path / "resumed")
    assert model.training and not any(m._forward_hooks for m in model.modules())
    # What a killed process leaves behind: a temporary file, which the rerun removes.
    (shards / "shard-00004.maps.npy.tmp-999999").write_bytes(b"partial")

    broken.fail_at, broken.calls = None, []
    explain_dataset(cam, broken, tmp_path / "resumed", **args)
    # The first image is read once to check it is the same; finished shards are not redone.
    assert broken.calls[0] == 0 and sorted(broken.calls[1:]) == list(range(24, N_IMAGES))
    assert_same_folder(tmp_path / "whole", tmp_path / "resumed")

    broken.calls = []  # a finished folder: nothing to compute, the same files again
    explain_dataset(cam, broken, tmp_path / "resumed", **args)
    assert broken.calls == [0]
    assert_same_folder(tmp_path / "whole", tmp_path / "resumed")


def test_out_with_other_results_is_refused(tmp_path, data) -> None:
    model = make_model()
    cam = GradCAM(model, target_layer=LAYER)
    args = dict(batch_size=8, shard_size=16, report=False, progress=False)
    explain_dataset(cam, data, tmp_path / "out", **args)
    with pytest.raises(CamkitError, match=r"different arguments(.|\n)*keep: 'maps' there, "
                                          r"'stats' now"):
        explain_dataset(cam, data, tmp_path / "out", keep="stats", **args)
    with torch.no_grad():
        model[0].bias[0] += 1.0
    with pytest.raises(CamkitError, match=r"model\.digest"):
        explain_dataset(cam, data, tmp_path / "out", **args)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CamkitError, match="not empty"):
        explain_dataset(cam, data, tmp_path / "other", **args)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_other_images_under_the_same_dataset_class_are_refused(tmp_path, data) -> None:
    # The same class and length, so only the first-image probe can tell: another transform
    # (a normalisation) is refused, the last-bit noise of the same one on another CPU is not.
    cam = GradCAM(make_model(), target_layer=LAYER)
    args = dict(batch_size=8, shard_size=16, report=False, progress=False)
    explain_dataset(cam, data, tmp_path / "out", **args)
    normalised, jittered = Images(), Images()
    normalised.images = (normalised.images - 0.5) / 0.25
    jittered.images = jittered.images * (1 + 1e-6)
    with pytest.raises(CamkitError, match="holds results for other images"):
        explain_dataset(cam, normalised, tmp_path / "out", **args)
    explain_dataset(cam, jittered, tmp_path / "out", **args)
    assert jittered.calls == [0]  # the probe only: every shard was reused


def test_first_image_probe_with_nan_matches_itself() -> None:
    from camkit._dataset_manifest import _probes_match, image_probe

    images = torch.randn(2, 3, 9, 7)
    images[0, 1, 2, 3] = float("nan")
    probe = image_probe(images)
    assert _probes_match(json.loads(json.dumps(probe)), image_probe(images.clone()))
    assert not _probes_match(probe, image_probe(images * 2))


def test_a_warning_of_the_per_batch_calls_is_shown_once_at_the_callers_line(tmp_path,
                                                                           data) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, N_CLASSES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per line of code
        explain_dataset(GradCAM(model, "1"), data, tmp_path / "out", batch_size=8,
                        report=False, progress=False)
    flat = [w for w in caught if "1 x 1 map" in str(w.message)]
    assert len(flat) == 1 and flat[0].filename == __file__


def _pick(index: int):
    return lambda logits: logits[:, index]


def test_two_lambdas_are_two_runs(tmp_path, data) -> None:
    # Both are "test_dataset._pick.<locals>.<lambda>"; what they close over differs.
    model = make_model()
    args = dict(batch_size=8, shard_size=16, report=False, progress=False)
    explain_dataset(GradCAM(model, LAYER), data, tmp_path / "out", targets=_pick(0), **args)
    explain_dataset(GradCAM(model, LAYER), data, tmp_path / "out", targets=_pick(0), **args)
    with pytest.raises(CamkitError, match=r"targets: .*<lambda> \(digest \w+\)' there"):
        explain_dataset(GradCAM(model, LAYER), data, tmp_path / "out", targets=_pick(1), **args)


def _times(weights: torch.Tensor):
    return lambda logits: logits[:, :3] @ weights


class _Column:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.k]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (_pick(0), _pick(1)),  # closures
        (_Column(0), _Column(1)),  # callable instances
        (functools.partial(torch.select, dim=1, index=0),  # partials of a builtin
         functools.partial(torch.select, dim=1, index=1)),
        (_times(torch.ones(3)), _times(torch.full((3,), 2.0))),  # closures over tensors
    ],
)
def test_callables_that_compute_differently_are_described_differently(one, other) -> None:
    from camkit._dataset_callables import describe_callable

    assert describe_callable(one) != describe_callable(other)
    assert describe_callable(one) == describe_callable(copy.deepcopy(one))
    text = describe_callable(one)
    assert " at 0x" not in text and text.endswith(")")


def test_leftovers_of_a_killed_index_writer_are_removed(tmp_path, data) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    args = dict(batch_size=8, shard_size=16, progress=False)
    explain_dataset(cam, data, tmp_path / "whole", **args)
    explain_dataset(cam, data, tmp_path / "again", **args)
    # A process killed while writing the index leaves its temporary files next to it.
    for name in ("index.json.tmp-999999", "aggregates.json.tmp-999999", "report.md.tmp-1"):
        (tmp_path / "again" / name).write_text("partial")
    explain_dataset(cam, data, tmp_path / "again", **args)
    assert_same_folder(tmp_path / "whole", tmp_path / "again")


def test_a_run_that_finished_nothing_does_not_lock_its_folder(tmp_path, data) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    args = dict(batch_size=8, shard_size=16, report=False, progress=False)
    with pytest.raises(RuntimeError, match="injected failure"):
        explain_dataset(cam, Images(fail_at=5), tmp_path / "out", **args)  # first batch
    assert (tmp_path / "out" / "manifest.json").is_file()
    # Nothing was finished, so other arguments are welcome there.
    explain_dataset(cam, data, tmp_path / "out", keep="stats", **args)
    explain_dataset(cam, data, tmp_path / "fresh", keep="stats", **args)
    assert_same_folder(tmp_path / "fresh", tmp_path / "out")


def test_out_that_cannot_be_created(tmp_path, data) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CamkitError, match="is a file"):
        explain_dataset(cam, data, tmp_path / "a_file", progress=False)
    with pytest.raises(CamkitError, match="cannot create the results folder"):
        explain_dataset(cam, data, tmp_path / "a_file" / "cams", progress=False)


def test_other_batch_size_is_refused_with_the_values_to_resume(tmp_path, data) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    explain_dataset(cam, data, tmp_path, batch_size=8, report=False, progress=False)
    # The default shard size follows the batch size (a whole number of batches).
    with pytest.raises(CamkitError, match=r"batch_size: 8 there, 7 now(.|\n)*shard_size: 1024 "
                                          r"there, 1022 now(.|\n)*To resume"):
        explain_dataset(cam, data, tmp_path, batch_size=7, report=False, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": "all"}, "keep='all'"),
        ({"targets": "top"}, "targets='top'"),
        ({"targets": 2.5}, "targets of type float"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"shard_size": -1}, "shard_size=-1"),
        ({"aggregate_size": (0, 4)}, "aggregate_size"),
        ({"map_dtype": "int8"}, "map_dtype"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, data, kwargs, message) -> None:
    cam = GradCAM(make_model(), target_layer=LAYER)
    with pytest.raises(CamkitError, match=message):
        explain_dataset(cam, data, tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_bad_inputs_are_refused(tmp_path) -> None:
    model = make_model()
    with pytest.raises(CamkitError, match=r"Wrap the model: explain_dataset\(GradCAM"):
        explain_dataset(model, Images(), tmp_path)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    cam = GradCAM(model, target_layer=LAYER)
    with pytest.raises(CamkitError, match="IterableDataset"):
        explain_dataset(cam, Stream(), tmp_path)
    with pytest.raises(CamkitError, match="targets='label' but the data yields no"):
        explain_dataset(cam, Images(labelled=False), tmp_path / "x", targets="label",
                        progress=False)


def test_progress_bar_only_when_asked_or_on_a_terminal(tmp_path, data, capsys) -> None:
    pytest.importorskip("tqdm")
    cam = GradCAM(make_model(), target_layer=LAYER)
    args = dict(batch_size=20, shard_size=20, report=False)
    explain_dataset(cam, data, tmp_path / "a", **args)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    explain_dataset(cam, data, tmp_path / "b", progress=True, **args)
    assert "40/40" in capsys.readouterr().err


# --------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_A = dict(batch_size=4, shard_size=8, targets="label", progress=False)
DIST_B = dict(batch_size=8, shard_size=8, keep="stats", report=False, progress=False)


def _top_logit(tag: str):
    """The same score on every rank from a closure over a per-rank value (a device, say).

    No ``assert`` inside: pytest rewrites asserts in this process, not in spawned ones.
    """
    def score(logits: torch.Tensor) -> torch.Tensor:
        if not tag.startswith("rank"):
            raise ValueError(tag)
        return logits.amax(1)
    return score


def _rank_main(rank: int, world: int, ports: tuple[int, int], outs: tuple[str, str],
               log: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    cam = GradCAM(make_model(), target_layer=LAYER)
    # 1. As under torchrun: only the environment is set; camkit creates the process group.
    torchrun = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    os.environ.update(torchrun)
    images = Images()
    result = explain_dataset(cam, images, outs[0], **DIST_A)
    Path(log, f"rank{rank}.json").write_text(json.dumps(sorted(set(images.calls))))
    if dist.is_initialized() or len(result) != N_IMAGES:
        raise RuntimeError("the process group camkit created was not destroyed")
    for name in torchrun:
        del os.environ[name]
    # 2. A process group the caller initialised (TCP over the loopback interface).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank,
                            world_size=world)
    try:
        # Ranks agree on the function; what it closes over may differ (rank 0's is recorded).
        explain_dataset(cam, Images(), outs[1], targets=_top_logit(f"rank{rank}"), **DIST_B)
    finally:
        dist.destroy_process_group()


def test_two_processes_write_what_one_process_writes(tmp_path) -> None:
    mp = pytest.importorskip("torch.multiprocessing")
    cam = GradCAM(make_model(), target_layer=LAYER)
    explain_dataset(cam, Images(), tmp_path / "one_a", **DIST_A)
    explain_dataset(cam, Images(), tmp_path / "one_b", targets=_top_logit("rank0"), **DIST_B)
    outs = (str(tmp_path / "two_a"), str(tmp_path / "two_b"))
    log = tmp_path / "log"
    log.mkdir()
    mp.spawn(_rank_main, args=(2, (_free_port(), _free_port()), outs, str(log)), nprocs=2,
             join=True)
    assert_same_folder(tmp_path / "one_a", tmp_path / "two_a")
    assert_same_folder(tmp_path / "one_b", tmp_path / "two_b")
    # Shard k (8 images) was computed by rank k % 2; both ranks read image 0 to find the
    # layer, and rank 0 reads a few more for the report's figure.
    rank0 = set(json.loads((log / "rank0.json").read_text()))
    rank1 = set(json.loads((log / "rank1.json").read_text()))
    assert rank1 == {0, *range(8, 16), *range(24, 32)}
    assert rank0 >= {*range(8), *range(16, 24), *range(32, 40)}


# --------------------------------------------------------------------------- command line
def _cli(argv: list[str]) -> int:
    return cli.main(argv)


def test_cli_npz_and_image_folder(tmp_path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    model_file = tmp_path / "net.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(channels=1):\n"
        "    torch.manual_seed(3)\n"
        "    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Flatten(), nn.Linear(4 * 12 * 12, 3))\n"
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 12, 12), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "data.npz", x=images, y=labels)
    status = _cli(["explain-dataset", "--model", f"{model_file}:build", "--npz",
                   str(tmp_path / "data.npz"), "--images-key", "x", "--labels-key", "y",
                   "--mean", "0.5", "--std", "0.25", "--out", str(tmp_path / "npz_out"),
                   "--target", "label", "--map-dtype", "float32", "--layer", "1"])
    assert status == 0, capsys.readouterr().err
    assert "explained 6 images" in capsys.readouterr().out
    result = load_explanations(tmp_path / "npz_out")
    assert result.records["label"].tolist() == labels.tolist()
    import importlib.util
    spec = importlib.util.spec_from_file_location("net", model_file)
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    x = (torch.from_numpy(images).float()[:, None] / 255 - 0.5) / 0.25
    expected = GradCAM(net.build(), target_layer="1")(x, labels.tolist()).maps.numpy()
    np.testing.assert_allclose(result.maps(np.arange(6)), expected, atol=1e-5)

    folder = tmp_path / "folder"
    for label, name in enumerate(["cat", "dog"]):
        (folder / name).mkdir(parents=True)
        for k in range(2):
            cv2.imwrite(str(folder / name / f"{k}.png"), images[2 * label + k])
    status = _cli(["explain-dataset", "--model", f"{model_file}:build", "--model-arg",
                   "channels=3", "--images", str(folder), "--out", str(tmp_path / "f_out"),
                   "--layer", "1", "--keep", "stats", "--target", "label"])
    assert status == 0, capsys.readouterr().err
    folder_result = load_explanations(tmp_path / "f_out")
    assert folder_result.records["label"].tolist() == [0, 0, 1, 1]
    assert [r["name"] for r in folder_result.aggregates["per_class"]] == ["cat", "dog"]

    status = _cli(["explain-dataset", "--model", "no_such_module:thing", "--npz",
                   str(tmp_path / "data.npz"), "--out", str(tmp_path / "bad")])
    assert status == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err


def _npz(path: Path, channels: int, size: int = 32, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % 3)
    return images


def test_cli_shares_explains_model_options(tmp_path, capsys) -> None:
    # A torchvision name, a state dict, --method gradcampp and a class index, as in explain;
    # the reference is GradCAM++ called directly on the same weights and pixels.
    tv_models = pytest.importorskip("torchvision.models")
    images = _npz(tmp_path / "rgb.npz", 3)
    torch.manual_seed(0)
    net = tv_models.squeezenet1_1(num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "sq.pt")
    argv = ["explain-dataset", "--model", "squeezenet1_1", "--model-arg", "num_classes=3",
            "--checkpoint", str(tmp_path / "sq.pt"), "--npz", str(tmp_path / "rgb.npz"),
            "--input-size", "3", "32", "32", "--mean", "0", "--std", "1", "--method",
            "gradcampp", "--layer", "features.4", "--target", "2", "--map-dtype", "float32",
            "--out", str(tmp_path / "out")]
    assert _cli(argv) == 0, capsys.readouterr().err
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected = GradCAMPlusPlus(net, target_layer="features.4")(x, 2).maps.numpy()
    result = load_explanations(tmp_path / "out")
    assert result.records["target"].tolist() == [2] * len(images)
    np.testing.assert_allclose(result.maps(np.arange(len(images))), expected, atol=1e-5)

    # A whole pickled model: refused unless --trust-pickle, then its weights are used.
    torch.save(net, tmp_path / "whole.pt")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "whole.pt")
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-pickle" in err[0], err
    argv[argv.index("--out") + 1] = str(tmp_path / "trusted")
    assert _cli([*argv, "--trust-pickle"]) == 0, capsys.readouterr().err
    trusted = load_explanations(tmp_path / "trusted").maps(np.arange(len(images)))
    np.testing.assert_allclose(trusted, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input-size", "3", "8", "8"], "has 1-channel images but --input-size asks for 3"),
        (["--input-size", "2", "8", "8"], "1 (grayscale) or 3 (RGB)"),
        (["--checkpoint", "{dir}/missing.pt"], "checkpoint file"),
        (["--device", "tpu:x"], "is not a torch device"),
        (["--model", "resnet1"], "Did you mean resnet18"),
        (["--mean", "0", "0"], "--mean has 2 values for 1-channel images"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message) -> None:
    _npz(tmp_path / "grey.npz", 1, size=8)
    argv = ["explain-dataset", "--model", "torch.nn:Conv2d", "--model-arg", "in_channels=1",
            "--model-arg", "out_channels=2", "--model-arg", "kernel_size=3",
            "--npz", str(tmp_path / "grey.npz"), "--out", str(tmp_path / "out"),
            *(e.format(dir=tmp_path) for e in extra)]
    assert _cli(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camkit explain-dataset: error: "), lines
    assert message in lines[0]


def test_cli_target_is_checked_by_the_parser(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli(["explain-dataset", "--model", "resnet18", "--npz", "x.npz", "--out", "o",
              "--target", "top"])
    assert exit_info.value.code == 2
    assert "'top' is not pred, label or a class index" in capsys.readouterr().err


def test_cli_has_no_second_targets_flag(capsys) -> None:
    # The flag is --target (shared with explain); a look-alike --targets once existed and
    # was ignored, so --targets label silently explained the predictions.
    with pytest.raises(SystemExit) as exit_info:
        _cli(["explain-dataset", "--model", "resnet18", "--npz", "x.npz", "--out", "o",
              "--targets", "label"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --targets" in capsys.readouterr().err


def test_cli_folder_of_mixed_sizes_needs_input_size(tmp_path, capsys) -> None:
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, height in (("a.png", 12), ("b.png", 14)):
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (height, 12, 3), dtype=np.uint8))
    model_file = tmp_path / "pooled.py"
    model_file.write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    argv = ["explain-dataset", "--model", f"{model_file}:build", "--layer", "1",
            "--images", str(folder), "--out", str(tmp_path / "out")]
    assert _cli(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "b.png is 14 x 12 pixels" in lines[0], lines
    assert "--input-size" in lines[0]
    assert _cli([*argv, "--input-size", "3", "12", "12"]) == 0, capsys.readouterr().err
    assert len(load_explanations(tmp_path / "out")) == 2


def test_cli_rerun_on_other_data_or_preprocessing_is_refused(tmp_path, capsys) -> None:
    # The command line's datasets describe their files and preprocessing in the manifest,
    # so a finished folder is not taken for the results of another --mean or another file.
    images = _npz(tmp_path / "grey.npz", 1, size=8)
    model_file = tmp_path / "tiny.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))\n"
    )
    argv = ["explain-dataset", "--model", f"{model_file}:build", "--layer", "1", "--npz",
            str(tmp_path / "grey.npz"), "--out", str(tmp_path / "out"), "--mean", "0.5"]
    assert _cli(argv) == 0, capsys.readouterr().err
    assert _cli(argv) == 0, capsys.readouterr().err  # the same call: accepted
    capsys.readouterr()
    assert _cli([*argv, "--std", "0.5"]) == 2
    assert "dataset.settings.std: None there, [0.5] now" in capsys.readouterr().err
    np.savez(tmp_path / "grey.npz", images=255 - images, labels=np.arange(len(images)) % 3)
    assert _cli(argv) == 2
    assert "dataset.settings.images" in capsys.readouterr().err
