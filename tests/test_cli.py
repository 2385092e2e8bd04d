"""The ``camkit`` command line: hand-derived overlays, plumbing, and one-line errors.

The model in ``RAMP_NET`` has hand-set weights whose Grad-CAM and Grad-CAM++ maps can be
worked out on paper for a grey image with pixel values ``I``: the target layer outputs
``A_1 = R`` and ``A_2 = 1 - R`` with ``R = I / 255``, and the head is a global average pool
followed by a linear layer, so the gradients are constant: ``G_k = W_ck / (h w)``.

* Grad-CAM weighs the channels by ``W_c1``, ``W_c2``. For class 0, ``W = (100, 10)``: the map
  ``90 R + 10`` scales to ``R``.
* Grad-CAM++ weighs them by ``W_ck / (2 + W_ck mean(A_k))``. With ``mean(R) = m`` close to 1
  the second channel wins (``10 / (2 + 10 (1 - m)) > 100 / (2 + 100 m)``) and the map
  scales to ``1 - R``.
* Class 1 has ``W = (-1, -1)``: the map is ``relu(-1) = 0`` everywhere (degenerate).

With ``--alpha 1`` the overlay is the colormap of the map alone, so the expected image is the
JET colour of ``I`` (Grad-CAM), of ``255 - I`` (Grad-CAM++), or of 0 (degenerate).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import camkit
from camkit import cli
from camkit._cli_models import parse_model_args

RAMP_NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class RampNet(nn.Module):
        def __init__(self, num_classes=2):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2, num_classes, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[0] = 1 / 3
                self.conv.weight[1] = -1 / 3
                self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
                self.fc.weight.fill_(-1.0)  # untrained: every class has no evidence

        def forward(self, x):
            return self.fc(self.pool(self.conv(x)).flatten(1))


    def build(num_classes=2):
        return RampNet(num_classes)


    def trained():
        net = RampNet()
        with torch.no_grad():
            net.fc.weight.copy_(torch.tensor([[100.0, 10.0], [-1.0, -1.0]]))
        return net


    def not_a_model():
        return 42


    INSTANCE = trained()
    """
)
HEIGHT, WIDTH = 16, 20


def _ramp_image() -> np.ndarray:
    """Grey levels 0, 17, ..., 255 down the first column; 255 elsewhere (mean(R) ~ 0.975)."""
    image = np.full((HEIGHT, WIDTH), 255, np.uint8)
    image[:, 0] = np.arange(HEIGHT) * 17
    return image


def _jet(levels: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap(levels.astype(np.uint8), cv2.COLORMAP_JET),
                        cv2.COLOR_BGR2RGB)


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    net = tmp_path / "rampnet.py"
    net.write_text(RAMP_NET)
    image = tmp_path / "ramp.png"
    cv2.imwrite(str(image), _ramp_image())
    spec = importlib.util.spec_from_file_location("_test_rampnet", net)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkpoint = tmp_path / "trained.pt"
    torch.save(module.trained().state_dict(), checkpoint)
    return {"dir": tmp_path, "net": net, "image": image, "checkpoint": checkpoint,
            "module": module}


def _explain(files: dict[str, Path], *extra: str, model: str = "build") -> list[str]:
    return [
        "explain", str(files["image"]), "--model", f"{files['net']}:{model}",
        "--layer", "conv", "--input-size", "3", str(HEIGHT), str(WIDTH),
        "--mean", "0", "--std", "1", "--alpha", "1", "--out", str(files["dir"] / "cam.png"),
        *extra,
    ]


def _run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail with exit status 2 and one line on stderr."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"camkit {argv[0]}: error: ")
    return lines[0]


# --------------------------------------------------------------------------- explain: values
@pytest.mark.parametrize(
    ("method", "expected"), [("gradcam", "ramp"), ("gradcampp", "inverted")]
)
def test_explain_writes_the_hand_derived_overlay(files, capsys, method, expected) -> None:
    argv = _explain(files, "--checkpoint", str(files["checkpoint"]), "--method", method)
    assert cli.main(argv) == 0
    image = _ramp_image()
    levels = image if expected == "ramp" else 255 - image
    np.testing.assert_array_equal(_read_rgb(files["dir"] / "cam.png"), _jet(levels))

    out = capsys.readouterr().out
    r = image.astype(np.float64) / 255
    logit = 100 * r.mean() + 10 * (1 - r).mean()  # class 0, the top class
    assert out.startswith(f"{files['dir'] / 'cam.png'}: class 0 (score ")
    assert float(out.split("score ")[1].split(")")[0]) == pytest.approx(logit, rel=1e-3)
    assert f"layer conv, {method}" in out


def test_explain_target_without_evidence_gives_an_empty_map(files, capsys) -> None:
    argv = _explain(files, "--checkpoint", str(files["checkpoint"]), "--target", "1")
    assert cli.main(argv) == 0
    written = _read_rgb(files["dir"] / "cam.png")
    np.testing.assert_array_equal(written, _jet(np.zeros((HEIGHT, WIDTH))))
    captured = capsys.readouterr()
    assert "class 1 " in captured.out
    assert "no positive value" in captured.err


def test_explain_without_checkpoint_uses_the_untrained_weights(files, capsys) -> None:
    # Every class has weights (-1, -1) before loading: no evidence anywhere.
    assert cli.main(_explain(files)) == 0
    np.testing.assert_array_equal(
        _read_rgb(files["dir"] / "cam.png"), _jet(np.zeros((HEIGHT, WIDTH)))
    )
    assert "no --checkpoint" in capsys.readouterr().err
    assert cli.main(_explain(files, "--checkpoint", str(files["checkpoint"]))) == 0
    assert "no --checkpoint" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "out", ["", "{dir}", "{dir}/new/", "{dir}/cam.txt", "/proc/camkit-test.png", "/dev/full"]
)
def test_explain_out_that_cannot_be_written_is_one_line(files, capsys, out) -> None:
    # An empty name, a folder, a folder-like name, an extension OpenCV cannot encode, a
    # place the kernel refuses, a device that is always full.
    path = out.format(dir=files["dir"])
    argv = _set(_explain(files), "--out", path)
    line = _run_error(argv, capsys)
    assert "--out" in line or "cannot write" in line
    if path.startswith(str(files["dir"])) and path != str(files["dir"]):
        assert not Path(path.rstrip("/")).exists()


def test_checkpoint_wrappers_and_nesting_are_understood(files, capsys) -> None:
    state = torch.load(files["checkpoint"], weights_only=True)
    nested = files["dir"] / "nested.pt"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()}},
               nested)
    assert cli.main(_explain(files, "--checkpoint", str(nested))) == 0
    np.testing.assert_array_equal(_read_rgb(files["dir"] / "cam.png"), _jet(_ramp_image()))


def test_module_instance_and_import_path(files, capsys, monkeypatch) -> None:
    # A module-level instance, imported by module name from the current directory.
    monkeypatch.chdir(files["dir"])
    monkeypatch.syspath_prepend(str(files["dir"]))
    argv = _explain(files)
    argv[argv.index("--model") + 1] = "rampnet:INSTANCE"
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(_read_rgb(files["dir"] / "cam.png"), _jet(_ramp_image()))


def test_overlay_keeps_the_image_size_and_blends(files, capsys) -> None:
    # The model sees an 8 x 10 resize; the overlay is drawn at the image's 16 x 20.
    argv = _explain(files, "--checkpoint", str(files["checkpoint"]))
    argv[argv.index("--input-size") + 2 : argv.index("--input-size") + 4] = ["8", "10"]
    argv[argv.index("--alpha") + 1] = "0"
    assert cli.main(argv) == 0
    # alpha 0: the image itself, in RGB.
    written = _read_rgb(files["dir"] / "cam.png")
    np.testing.assert_array_equal(written, np.repeat(_ramp_image()[..., None], 3, axis=-1))


# --------------------------------------------------------------------------- layers, rf
def test_layers_prints_list_layers(files, capsys) -> None:
    model = files["module"].build()
    assert cli.main(["layers", f"{files['net']}:build", "--input-size", "3", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert out == f"{camkit.list_layers(model, input_size=(3, 8, 8))}\n"
    for name in ("conv", "pool", "fc"):
        assert name in out


def test_rf_prints_the_receptive_field_table(files, capsys) -> None:
    model = files["module"].build()
    assert cli.main(["rf", f"{files['net']}:build", "--input-size", "3", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert out == f"{camkit.receptive_field(model, input_size=(3, 8, 8))}\n"


def test_torchvision_model_by_name(tmp_path, capsys) -> None:
    pytest.importorskip("torchvision")
    image = tmp_path / "noise.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    out = tmp_path / "cam.jpg"
    argv = ["explain", str(image), "--model", "resnet18", "--input-size", "3", "64", "64",
            "--model-arg", "num_classes=7", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "layer layer4, gradcam" in capsys.readouterr().out
    assert _read_rgb(out).shape == (40, 50, 3)


# --------------------------------------------------------------------------- errors
def test_unknown_torchvision_model_suggests_names(capsys) -> None:
    pytest.importorskip("torchvision")
    line = _run_error(["layers", "resnet19"], capsys)
    assert "unknown model 'resnet19'" in line
    assert "resnet18" in line


def test_missing_torchvision_is_explained(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    line = _run_error(["rf", "resnet18"], capsys)
    assert "torchvision cannot be imported" in line
    assert "module:callable" in line


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
        ("{net}:missing", "has no attribute 'missing'"),
        ("{net}:not_a_model", "returned a int"),
        ("{dir}/nope.py:build", "does not exist"),
        ("{net}:", "not of the form module:callable"),
    ],
)
def test_bad_model_paths(files, capsys, model, message) -> None:
    spec = model.format(net=files["net"], dir=files["dir"])
    line = _run_error(["layers", spec], capsys)
    assert message in line


def _set(argv: list[str], flag: str, *values: str) -> list[str]:
    """Replace the value after ``flag`` (its first value for --input-size) or append both."""
    if flag not in argv:
        return [*argv, flag, *values]
    i = argv.index(flag)
    return [*argv[: i + 1], *values, *argv[i + 2 :]]


@pytest.mark.parametrize(
    ("flag", "values", "message"),
    [
        ("--checkpoint", ("{dir}/missing.pt",), "checkpoint file"),
        ("--out", ("{dir}/no/such/dir/cam.png",), "does not exist"),
        ("--out", ("{dir}/cam.unknown-format",), "no encoder"),
        ("--target", ("5",), "out of range"),
        ("--layer", ("convv",), "convv"),
        ("--input-size", ("4",), "1 (grayscale) or 3 (RGB)"),
        ("--mean", ("0", "0"), "--mean has 2 values for a 3-channel input"),
        ("--std", ("0",), "must be positive"),
    ],
)
def test_explain_errors_are_one_line(files, capsys, flag, values, message) -> None:
    argv = _set(_explain(files), flag, *(v.format(dir=files["dir"]) for v in values))
    assert message in _run_error(argv, capsys)


@pytest.mark.parametrize(
    ("source", "model", "words"),
    [
        ("def bad():\n    raise ValueError('bad config')\n", "bad",
         ["calling", "ValueError: bad config", "line 2"]),
        ("import nonexistent_pkg_xyz\n", "f", ["importing", "ModuleNotFoundError",
                                                "nonexistent_pkg_xyz", "line 1"]),
        ("def f(:\n", "f", ["importing", "SyntaxError", "line 1"]),
    ],
)
def test_errors_in_the_users_model_code_are_one_line_with_where(files, capsys, source, model,
                                                                 words) -> None:
    net = files["dir"] / "usernet.py"
    net.write_text(source)
    line = _run_error(["layers", f"{net}:{model}"], capsys)
    assert all(word in line for word in words), line


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--checkpoint", "garbage", ["cannot read checkpoint"]),  # torch.load: KeyError
        ("--checkpoint", "{dir}", ["is a folder"]),
        ("--model-arg", "num_classes=-3", ["num_classes", "-3"]),  # the model refuses it
    ],
)
def test_bad_weights_and_arguments_are_one_line(files, capsys, flag, value, words) -> None:
    garbage = files["dir"] / "garbage.pt"
    garbage.write_text("hello\n")
    value = str(garbage) if value == "garbage" else value.format(dir=files["dir"])
    argv = ["explain", str(files["image"]), "--model", "resnet18", "--out",
            str(files["dir"] / "x.png"), flag, value]
    line = _run_error(argv, capsys)
    assert all(word in line for word in words), line


def test_missing_image(files, capsys) -> None:
    argv = _explain(files)
    argv[1] = str(files["dir"] / "missing.png")
    assert "image file" in _run_error(argv, capsys)
    argv[1] = str(files["net"])  # exists, but is no image
    assert "cannot read" in _run_error(argv, capsys)


def test_checkpoint_that_does_not_fit(files, capsys) -> None:
    other = files["dir"] / "five.pt"
    torch.save(files["module"].build(num_classes=5).state_dict(), other)
    line = _run_error(_explain(files, "--checkpoint", str(other)), capsys)
    assert "fc.weight: checkpoint (5, 2), model (2, 2)" in line
    assert "num_classes" in line


def test_pickled_model_is_refused(files, capsys) -> None:
    pickled = files["dir"] / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), pickled)  # a whole module object
    line = _run_error(_explain(files, "--checkpoint", str(pickled)), capsys)
    assert "pickled model" in line
    not_torch = _run_error(_explain(files, "--checkpoint", str(files["image"])), capsys)
    assert "not a file written by torch.save" in not_torch


def test_trusted_pickled_model_gives_its_weights(files, capsys, monkeypatch) -> None:
    # torch.save(model) pickles the class by module name: make the test module importable.
    monkeypatch.setitem(sys.modules, "_test_rampnet", files["module"])
    whole = files["dir"] / "whole.pt"
    torch.save(files["module"].trained(), whole)
    line = _run_error(_explain(files, "--checkpoint", str(whole)), capsys)
    assert "add --trust-pickle" in line
    assert cli.main(_explain(files, "--checkpoint", str(whole), "--trust-pickle")) == 0
    np.testing.assert_array_equal(_read_rgb(files["dir"] / "cam.png"), _jet(_ramp_image()))
    # Once trusted, a class that cannot be imported is named in one line.
    monkeypatch.delitem(sys.modules, "_test_rampnet")
    line = _run_error(_explain(files, "--checkpoint", str(whole), "--trust-pickle"), capsys)
    assert "cannot unpickle" in line and "_test_rampnet" in line


def test_trusted_checkpoint_dict_holding_a_whole_model(files, capsys, monkeypatch) -> None:
    # torch.save({"model": model, "epoch": ...}): the model under a common key.
    monkeypatch.setitem(sys.modules, "_test_rampnet", files["module"])
    nested = files["dir"] / "nested_whole.pt"
    torch.save({"epoch": 7, "model": files["module"].trained()}, nested)
    argv = _explain(files, "--checkpoint", str(nested), "--trust-pickle")
    assert cli.main(argv) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(_read_rgb(files["dir"] / "cam.png"), _jet(_ramp_image()))


@pytest.mark.parametrize("command", ["explain", "layers"])
def test_a_size_the_model_cannot_take(files, capsys, command) -> None:
    # The net expects 3 channels; a grayscale input cannot run.
    if command == "explain":
        argv = _set(_explain(files), "--input-size", "1")
    else:
        argv = [command, f"{files['net']}:build", "--input-size", "1", "8", "8"]
    line = _run_error(argv, capsys)
    assert "1, 1, " in line  # names the input shape that failed


def test_nonpositive_sizes_are_rejected_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rf", "resnet18", "--input-size", "3", "0", "224"])
    assert exit_info.value.code == 2
    assert "--input-size: 0 is not positive" in capsys.readouterr().err


def test_traceback_flag_reraises(files) -> None:
    argv = _explain(files)
    argv[1] = "missing.png"
    with pytest.raises(camkit.CamkitError, match="image file"):
        cli.main(["--traceback", *argv])


# --------------------------------------------------------------------------- help, version
def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"camkit {camkit.__version__}"


@pytest.mark.parametrize("command", [None, "layers", "rf", "explain", "explain-dataset"])
def test_help_on_every_command(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: camkit {command or ''}".rstrip())


def test_console_script_entry_point() -> None:
    points = importlib.metadata.entry_points(group="console_scripts", name="camkit")
    assert [p.value for p in points] == ["camkit.cli:main"]


def test_model_args_are_python_literals() -> None:
    assert parse_model_args(["num_classes=10", "name=resnet18", "sizes=(1, 2)", "p=0.5"]) == {
        "num_classes": 10, "name": "resnet18", "sizes": (1, 2), "p": 0.5,
    }
    with pytest.raises(camkit.CamkitError, match="KEY=VALUE"):
        parse_model_args(["10"])


# --------------------------------------------------------------------------- explain-dataset
def test_explain_dataset_is_registered_when_present(capsys) -> None:
    present = importlib.util.find_spec("camkit._cli_dataset") is not None
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain-dataset", "--help"])
    assert exit_info.value.code == (0 if present else 2)


def _model_options(parser) -> dict[str, tuple]:
    (group,) = [g for g in parser._action_groups if g.title == "model"]
    return {a.option_strings[0]: (a.nargs, a.choices, a.required) for a in group._group_actions}


def test_explain_and_explain_dataset_share_their_model_options() -> None:
    pytest.importorskip("camkit._cli_dataset")
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    explain, dataset = (_model_options(choices[c]) for c in ("explain", "explain-dataset"))
    assert explain == dataset
    assert set(explain) == {
        "--model", "--checkpoint", "--trust-pickle", "--model-arg", "--input-size",
        "--method", "--layer", "--target", "--device",
    }
    assert explain["--method"][1] == ("gradcam", "gradcampp")


def test_cli_works_when_the_dataset_module_fails_to_import(capsys, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "camkit._cli_dataset" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "camkit._cli_dataset", None)
    line = _run_error(["explain-dataset"], capsys)
    assert "unavailable" in line


def test_layers_on_a_size_the_model_refuses_names_the_flag(capsys) -> None:
    line = _run_error(["layers", "resnet18", "--input-size", "1", "64", "64"], capsys)
    assert "(1, 1, 64, 64)" in line and "3 channels" in line and "--input-size" in line
    assert "list_layers(" not in line  # advice for the Python API, not the command line
