#!/usr/bin/env bash
# Build camkit's sdist and wheel, check them, and install the wheel into a fresh virtual
# environment that has camkit's core dependencies and nothing else: no torchvision,
# matplotlib or tqdm. There, `import camkit` must be fast and must not import OpenCV, a small
# Grad-CAM call must give the hand-checkable answer, and the `camkit` command must run.
#
#   tools/check_wheel.sh            # uses .venv/bin/python; PYTHON=... to use another
#
# Copying torch into a new environment takes gigabytes and minutes, so the fresh environment
# borrows the core dependencies from the build interpreter's site-packages instead: a
# directory of symlinks to exactly the files of torch, numpy, scipy, opencv-python-headless
# and their own (transitive) requirements, put on sys.path by a .pth file. Everything else in
# that site-packages, torchvision included, stays invisible.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/camkit-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
step() { printf '[check_wheel %3ds] %s\n' $((SECONDS - start)) "$*"; }

# ---------------------------------------------------------------- build and inspect
step "building sdist and wheel"
# Without build isolation the build uses this interpreter's setuptools and needs no index
# (setuptools >= 70.1 builds wheels without the `wheel` package).
"$python" -m build --no-isolation --skip-dependency-check --outdir "$work/dist" "$root" \
    > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
step "twine check"
"$python" -m twine check --strict "$work"/dist/*

wheel=("$work"/dist/camkit-*.whl)
[ "${#wheel[@]}" -eq 1 ] || { echo "expected one wheel, got: ${wheel[*]}"; exit 1; }
step "wheel contents"
"$python" - "${wheel[0]}" "$root" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, root = Path(sys.argv[1]), Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
stray = [n for n in names if not (n.startswith("camkit/") or n.split("/")[0].endswith(".dist-info"))]
assert not stray, f"the wheel holds files outside the package: {stray}"
assert "camkit/py.typed" in names, "py.typed is missing from the wheel"
shipped = {n for n in names if n.startswith("camkit/")}
expected = {
    p.relative_to(root / "src").as_posix()
    for p in (root / "src" / "camkit").rglob("*")
    if p.is_file() and (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts
}
missing = sorted(expected - shipped)
extra = sorted(shipped - expected)
assert not missing, f"source files missing from the wheel: {missing}"
assert not extra, f"unexpected files in the package: {extra}"
print(f"  {len(shipped)} package files, {len(names) - len(shipped)} metadata files")
EOF

# ---------------------------------------------------------------- fresh environment
step "fresh venv with only the core dependencies"
"$python" -m venv --without-pip "$work/venv"
fresh="$work/venv/bin/python"
fresh_site="$("$fresh" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$work/deps"
"$python" - "${wheel[0]}" "$work/deps" <<'EOF'
"""Link the files of the wheel's requirements (and theirs, recursively) into one directory."""
import importlib.metadata as md
import os
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

wheel, deps = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []

# Each requirement is evaluated in the context of the extra of its parent that asked for it
# (torch asks for cuda-toolkit[cublas, ...], whose own requirements are marked extra == ...).
dists: dict[str, md.Distribution] = {}
done: set[tuple[str, str]] = set()
todo = [(Requirement(r), "") for r in requires]
while todo:
    req, parent_extra = todo.pop()
    if req.marker is not None and not req.marker.evaluate({"extra": parent_extra}):
        continue
    key = canonicalize_name(req.name)
    if key not in dists:
        try:
            dists[key] = md.distribution(req.name)
        except md.PackageNotFoundError:
            sys.exit(f"requirement {req} is not installed for {sys.executable}")
    for extra in ["", *sorted(req.extras)]:
        if (key, extra) not in done:
            done.add((key, extra))
            todo.extend((Requirement(text), extra) for text in dists[key].requires or [])

linked = set()
for dist in dists.values():
    base = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops - {"__pycache__"}:
        if top in linked or not (base / top).exists():
            continue
        os.symlink(base / top, deps / top)
        linked.add(top)
print(f"  {len(dists)} distributions linked: {', '.join(sorted(dists))}")
EOF
echo "$work/deps" > "$fresh_site/_camkit_core_deps.pth"

step "pip install --no-deps the wheel"
"$python" -m pip --python "$fresh" install --no-deps --no-index --quiet "${wheel[0]}"

# ---------------------------------------------------------------- checks in the fresh venv
step "import and a tiny Grad-CAM"
(cd "$work" && "$fresh" - <<'EOF'
import importlib.util
import sys
import time

for absent in ("torchvision", "matplotlib", "tqdm", "timm"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is visible in the fresh venv"

start = time.perf_counter()
import torch  # noqa: E402

torch_s = time.perf_counter() - start
start = time.perf_counter()
import camkit  # noqa: E402

camkit_s = time.perf_counter() - start
assert "/venv/" in camkit.__file__, f"camkit imported from {camkit.__file__}, not the wheel"
assert "cv2" not in sys.modules, "import camkit imported OpenCV"
assert camkit_s < 2.0, f"import camkit took {camkit_s:.2f} s after torch"
print(f"  import torch {torch_s:.2f} s, then import camkit {camkit_s:.3f} s; cv2 not imported")

# A conv net small enough to check by hand: Grad-CAM's weights are the mean gradients.
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 3),
).eval()
x = torch.rand(2, 3, 6, 6)
result = camkit.GradCAM(net, target_layer="3")(x, targets=[0, 2])
net64 = net.double()
a = net64[:4](x.double()).detach().requires_grad_(True)
scores = net64[4:](a)[[0, 1], [0, 2]]
(g,) = torch.autograd.grad(scores.sum(), a)
expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).clamp(min=0).detach()
assert torch.allclose(result.raw.double(), expected, rtol=1e-4, atol=1e-6), "Grad-CAM is wrong"
assert result.maps.shape == (2, 6, 6) and 0 <= result.maps.min() and result.maps.max() <= 1
picture = camkit.overlay(torch.rand(6, 6, 3), result.maps[0])
assert picture.shape == (6, 6, 3) and "cv2" in sys.modules
print("  Grad-CAM matches a float64 recomputation; overlay drew with OpenCV")
EOF
)

step "the camkit command"
version="$("$work/venv/bin/camkit" --version)"
expected="camkit $("$fresh" -c 'import camkit; print(camkit.__version__)')"
[ "$version" = "$expected" ] || { echo "camkit --version said '$version'"; exit 1; }
set +e
message="$("$work/venv/bin/camkit" layers resnet18 2>&1)"
status=$?
set -e
if [ "$status" -ne 2 ] || [[ "$message" != *"torchvision cannot be imported"* ]]; then
    echo "camkit layers resnet18 without torchvision: exit $status: $message"
    exit 1
fi
echo "  $version; without torchvision: $message"
step "wheel check passed"
