"""What each traced op does to spatial indices: classification and parameters.

:func:`classify` turns one fx node into an :class:`OpSpec`, a kind plus the
numbers that kind needs (kernel, stride, padding ... per spatial axis). The
field walk (``_rf_walk``) and the fast shape pass (``_rf_trace``) both read
it, so an op is understood in one place only.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import fx, nn

# kinds ---------------------------------------------------------------------
WINDOW = "window"  # conv / pool over the last two dims
TRANSPOSED = "transposed"  # transposed convolution
ADAPTIVE = "adaptive"  # adaptive pooling (bins)
RESIZE = "resize"  # interpolation
PAD = "pad"  # explicit padding or cropping
PIXEL_SHUFFLE = "pixel_shuffle"
PIXEL_UNSHUFFLE = "pixel_unshuffle"
ELEMENTWISE = "elementwise"  # union of all tensor arguments, broadcasting
UNARY = "unary"  # keeps the first argument's field (casts, copies, dropout)
LINEAR = "linear"  # mixes the last dim
CAT = "cat"
STACK = "stack"
RESHAPE = "reshape"
PERMUTE = "permute"
GETITEM = "getitem"
REDUCE = "reduce"
DIM_MIX = "dim_mix"  # softmax-like: mixes along dims, keeps them
SPLIT = "split"
CONSTANT = "constant"  # depends on shapes only (zeros_like ...)
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Window:
    """A sliding window over the last two dims, one entry per dim (-2, -1)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    before: tuple[int, int]
    after: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool = False
    mixes_channels: bool = False
    #: how the padding is filled: "zeros", or "reflect", "replicate", "circular"
    #: (``nn.Conv2d.padding_mode``), which fill it with cells of the map itself
    padding_mode: str = "zeros"

    def out_size(self, n: int, t: int) -> int:
        k_eff = self.dilation[t] * (self.kernel[t] - 1) + 1
        span = n + self.before[t] + self.after[t] - k_eff
        s = self.stride[t]
        if not self.ceil_mode:
            return span // s + 1
        out = -(-span // s) + 1
        # PyTorch: the last window must start inside the input or the left padding.
        if (out - 1) * s >= n + self.before[t]:
            out -= 1
        return out


@dataclass(frozen=True)
class OpSpec:
    kind: str
    label: str
    params: dict = field(default_factory=dict)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    out.update(kwargs)
    return out


def _padding(padding, kernel, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        before = tuple(t // 2 for t in totals)
        after = tuple(t - b for t, b in zip(totals, before, strict=True))
        return before, after  # type: ignore[return-value]
    p = _pair(padding)
    return p, p


def _conv_window(kernel, stride, padding, dilation, padding_mode: str = "zeros") -> Window:
    kernel, stride, dilation = _pair(kernel), _pair(stride), _pair(dilation)
    before, after = _padding(padding, kernel, dilation)
    return Window(kernel, stride, before, after, dilation, mixes_channels=True,
                  padding_mode=padding_mode)


def _pool_window(kernel, stride, padding, dilation, ceil_mode) -> Window:
    kernel = _pair(kernel)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    p = _pair(padding)
    return Window(kernel, stride, p, p, _pair(dilation), bool(ceil_mode))


# ---------------------------------------------------------------------------
# elementwise ops


_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    nn.ChannelShuffle,
    nn.modules.dropout._DropoutNd,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_NOT_ELEMENTWISE_ACTIVATIONS = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax",
                                "Softmax2d", "GLU"}

_OPERATOR_ELEMENTWISE = {
    getattr(operator, n)
    for n in (
        "add sub mul truediv floordiv mod pow neg pos abs invert and_ or_ xor lshift rshift "
        "eq ne lt le gt ge iadd isub imul itruediv ifloordiv imod ipow iand ior ixor"
    ).split()
}

_EXTRA_ELEMENTWISE_NAMES = set(
    (
        "hardswish dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout "
        "batch_norm instance_norm layer_norm group_norm rms_norm local_response_norm "
        "channel_shuffle native_channel_shuffle hardtanh relu6 silu mish gelu prelu rrelu celu "
        "selu elu leaky_relu softplus softsign tanhshrink threshold hardshrink softshrink "
        "logsigmoid sigmoid tanh relu hardsigmoid clamp clip where masked_fill addcmul addcdiv "
        "lerp maximum minimum"
    ).split()
)

_UNARY_NAMES = set(
    (
        "contiguous to type float double half bfloat16 detach clone cpu cuda requires_grad_ "
        "type_as dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout "
        "identity stochastic_depth drop_path"
    ).split()
)

_CONSTANT_NAMES = set(
    (
        "zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros "
        "new_ones new_empty new_full new_tensor"
    ).split()
)

_RESHAPE_NAMES = set(
    "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as ravel".split()
)
_PERMUTE_NAMES = set("permute transpose swapaxes swapdims movedim moveaxis t".split())
_REDUCE_NAMES = set(
    (
        "mean sum amax amin max min std var norm logsumexp prod median nanmean nansum all any "
        "argmax argmin count_nonzero nanmedian"
    ).split()
)
_DIM_MIX_NAMES = set(
    "softmax log_softmax softmin cumsum cumprod cummax cummin logcumsumexp normalize glu".split()
)
_SPLIT_NAMES = set("chunk split tensor_split unbind".split())


@cache
def _aten_pointwise(name: str) -> bool:
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        return False
    try:
        overloads = op.overloads()
    except Exception:  # pragma: no cover - not an overload packet
        return False
    return any(torch.Tag.pointwise in getattr(op, ov).tags for ov in overloads)


def _is_elementwise_name(name: str) -> bool:
    base = name.strip("_")
    return base in _EXTRA_ELEMENTWISE_NAMES or _aten_pointwise(base)


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


# ---------------------------------------------------------------------------
# classification


def classify(node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict) -> OpSpec:
    """Describe what ``node`` does to spatial indices.

    ``args``/``kwargs`` are the node's arguments with every node replaced by
    its (meta) value, so weights and sizes can be read.
    """
    if node.op == "call_module" and module is not None:
        return _classify_module(module, args, kwargs)
    name = _target_name(node)
    target = node.target
    method = node.op == "call_method"
    label = name

    if target is operator.getitem:
        return OpSpec(GETITEM, "getitem", {"index": args[1]})

    if name in _CONSTANT_NAMES:
        return OpSpec(CONSTANT, label)

    if target in (F.conv2d, torch.conv2d):
        p = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation"),
                  {"stride": 1, "padding": 0, "dilation": 1})
        kernel = tuple(p["weight"].shape[-2:])
        return OpSpec(WINDOW, name, {"window": _conv_window(kernel, p["stride"], p["padding"],
                                                             p["dilation"])})
    if target in (F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices):
        p = _bind(args, kwargs,
                  ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                  {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
        return OpSpec(WINDOW, name, {"window": _pool_window(
            p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])})
    if target is F.avg_pool2d:
        p = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "ceil_mode"),
                  {"stride": None, "padding": 0, "ceil_mode": False})
        return OpSpec(WINDOW, name, {"window": _pool_window(
            p["kernel_size"], p["stride"], p["padding"], 1, p["ceil_mode"])})
    if target is F.lp_pool2d:
        p = _bind(args, kwargs, ("input", "norm_type", "kernel_size", "stride", "ceil_mode"),
                  {"stride": None, "ceil_mode": False})
        return OpSpec(WINDOW, name, {"window": _pool_window(
            p["kernel_size"], p["stride"], 0, 1, p["ceil_mode"])})
    if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                  F.adaptive_max_pool2d_with_indices):
        return OpSpec(ADAPTIVE, name)
    if target is F.conv_transpose2d:
        p = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding",
                                 "output_padding", "groups", "dilation"),
                  {"stride": 1, "padding": 0, "dilation": 1})
        kernel = tuple(p["weight"].shape[-2:])
        return OpSpec(TRANSPOSED, name, {"kernel": kernel, "stride": _pair(p["stride"]),
                                         "padding": _pair(p["padding"]),
                                         "dilation": _pair(p["dilation"])})
    if target in (F.interpolate, getattr(F, "upsample", None)):
        p = _bind(args, kwargs, ("input", "size", "scale_factor", "mode", "align_corners",
                                 "recompute_scale_factor", "antialias"),
                  {"size": None, "scale_factor": None, "mode": "nearest",
                   "align_corners": None, "recompute_scale_factor": None, "antialias": False})
        p.pop("input", None)
        return OpSpec(RESIZE, name, p)
    if target is getattr(F, "upsample_nearest", None):
        return OpSpec(RESIZE, name, {"mode": "nearest", "scale_factor": _arg(args, kwargs, 2,
                                                                             "scale_factor")})
    if target is getattr(F, "upsample_bilinear", None):
        return OpSpec(RESIZE, name, {"mode": "bilinear", "align_corners": True,
                                     "scale_factor": _arg(args, kwargs, 2, "scale_factor")})
    if target is F.pad:
        pad = _arg(args, kwargs, 1, "pad")
        mode = _arg(args, kwargs, 2, "mode", "constant")
        return OpSpec(PAD, name, {"pad": tuple(int(v) for v in pad),
                                  "mode": "constant" if mode is None else str(mode)})
    if target is F.pixel_shuffle:
        return OpSpec(PIXEL_SHUFFLE, name, {"factor": int(_arg(args, kwargs, 1,
                                                                 "upscale_factor"))})
    if target is F.pixel_unshuffle:
        return OpSpec(PIXEL_UNSHUFFLE, name, {"factor": int(_arg(args, kwargs, 1,
                                                                   "downscale_factor"))})
    if target is F.linear:
        return OpSpec(LINEAR, name)
    if target is torch.cat or target is torch.concat or target is torch.concatenate:
        return OpSpec(CAT, name, {"dim": _arg(args, kwargs, 1, "dim", 0)})
    if target is torch.stack:
        return OpSpec(STACK, name, {"dim": _arg(args, kwargs, 1, "dim", 0)})

    if target in _OPERATOR_ELEMENTWISE:
        return OpSpec(ELEMENTWISE, name)

    if name in _UNARY_NAMES:
        return OpSpec(UNARY, name)
    if name in _RESHAPE_NAMES or (not method and name in ("flatten", "reshape", "squeeze",
                                                           "unsqueeze")):
        return OpSpec(RESHAPE, name)
    if name in _PERMUTE_NAMES:
        return OpSpec(PERMUTE, name, _permute_params(name, args, kwargs))
    if name in ("expand", "expand_as", "broadcast_to"):
        return OpSpec(UNARY, name, {"broadcast": True})
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return OpSpec(ELEMENTWISE, name)
    if name in _REDUCE_NAMES:
        pos = 2 if name == "norm" else 1
        dim = _arg(args, kwargs, pos, "dim", None)
        return OpSpec(REDUCE, name, {"dim": dim})
    if name in _DIM_MIX_NAMES:
        default = 1 if name == "normalize" else (-1 if name == "glu" else None)
        pos = 2 if name == "normalize" else 1
        return OpSpec(DIM_MIX, name, {"dim": _arg(args, kwargs, pos, "dim", default)})
    if name in _SPLIT_NAMES:
        default_dim = 0
        pos = 2 if name in ("chunk", "split", "tensor_split") else 1
        return OpSpec(SPLIT, name, {"dim": _arg(args, kwargs, pos, "dim", default_dim)})
    if _is_elementwise_name(name):
        return OpSpec(ELEMENTWISE, name)
    return OpSpec(UNKNOWN, name)


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    if len(args) > pos:
        return args[pos]
    return default


def _permute_params(name: str, args: tuple, kwargs: dict) -> dict:
    rest = list(args[1:])
    if name == "permute":
        dims = kwargs.get("dims", rest[0] if len(rest) == 1 and
                          isinstance(rest[0], (list, tuple)) else rest)
        return {"dims": tuple(int(d) for d in dims)}
    if name in ("transpose", "swapaxes", "swapdims"):
        d0 = kwargs.get("dim0", rest[0] if rest else None)
        d1 = kwargs.get("dim1", rest[1] if len(rest) > 1 else None)
        return {"swap": (int(d0), int(d1))}
    if name in ("movedim", "moveaxis"):
        src = kwargs.get("source", rest[0] if rest else None)
        dst = kwargs.get("destination", rest[1] if len(rest) > 1 else None)
        return {"move": (src, dst)}
    return {"swap": (0, 1)}  # t()


def _pad_module_mode(m: nn.Module) -> str | None:
    """The ``F.pad`` mode a 2-D padding module uses, or ``None`` for other modules."""
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):  # ZeroPad2d is a ConstantPad2d
        return "constant"
    if isinstance(m, nn.ReflectionPad2d):
        return "reflect"
    if isinstance(m, nn.ReplicationPad2d):
        return "replicate"
    if hasattr(nn, "CircularPad2d") and isinstance(m, nn.CircularPad2d):
        return "circular"
    return None


def _classify_module(m: nn.Module, args: tuple, kwargs: dict) -> OpSpec:
    cls = type(m).__name__
    if isinstance(m, nn.Conv2d):
        return OpSpec(WINDOW, cls, {"window": _conv_window(m.kernel_size, m.stride, m.padding,
                                                            m.dilation, m.padding_mode)})
    if isinstance(m, nn.MaxPool2d):
        return OpSpec(WINDOW, cls, {"window": _pool_window(
            m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)})
    if isinstance(m, nn.AvgPool2d):
        return OpSpec(WINDOW, cls, {"window": _pool_window(
            m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)})
    if isinstance(m, nn.LPPool2d):
        return OpSpec(WINDOW, cls, {"window": _pool_window(
            m.kernel_size, m.stride, 0, 1, m.ceil_mode)})
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return OpSpec(ADAPTIVE, cls)
    if isinstance(m, nn.ConvTranspose2d):
        return OpSpec(TRANSPOSED, cls, {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride),
                                        "padding": _pair(m.padding),
                                        "dilation": _pair(m.dilation)})
    if isinstance(m, nn.Upsample):
        return OpSpec(RESIZE, cls, {"size": m.size, "scale_factor": m.scale_factor,
                                    "mode": m.mode, "align_corners": m.align_corners,
                                    "recompute_scale_factor": m.recompute_scale_factor})
    pad_mode = _pad_module_mode(m)
    if pad_mode is not None:
        return OpSpec(PAD, cls, {"pad": tuple(int(v) for v in m.padding), "mode": pad_mode})
    if isinstance(m, nn.PixelShuffle):
        return OpSpec(PIXEL_SHUFFLE, cls, {"factor": m.upscale_factor})
    if isinstance(m, nn.PixelUnshuffle):
        return OpSpec(PIXEL_UNSHUFFLE, cls, {"factor": m.downscale_factor})
    if isinstance(m, (nn.Linear, nn.Bilinear)):
        return OpSpec(LINEAR, cls)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return OpSpec(RESHAPE, cls)
    if isinstance(m, (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.GLU)):
        return OpSpec(DIM_MIX, cls, {"dim": m.dim})
    if isinstance(m, nn.Softmax2d):
        return OpSpec(DIM_MIX, cls, {"dim": -3})
    if isinstance(m, _ELEMENTWISE_MODULES):
        return OpSpec(ELEMENTWISE, cls)
    if (type(m).__module__ == "torch.nn.modules.activation"
            and cls not in _NOT_ELEMENTWISE_ACTIVATIONS):
        return OpSpec(ELEMENTWISE, cls)
    return OpSpec(UNKNOWN, cls)


# ---------------------------------------------------------------------------
# output shapes without running the op (meta kernels of compute ops are slow)

_BROADCAST_NAMES = {"add", "sub", "mul", "div", "true_divide", "maximum", "minimum", "where",
                    "add_", "sub_", "mul_", "div_"}


def fast_shape(spec: OpSpec, node: fx.Node, module: nn.Module | None, args: tuple,
               kwargs: dict) -> tuple[int, ...] | None:
    """The output shape of a common op from its arguments' shapes, or ``None``."""
    if spec.kind == CAT and args and isinstance(args[0], (list, tuple)) and args[0] and all(
        isinstance(t, torch.Tensor) for t in args[0]
    ):
        parts = args[0]
        dim = int(spec.params["dim"])
        dim = dim + parts[0].dim() if dim < 0 else dim
        out = list(parts[0].shape)
        out[dim] = sum(t.shape[dim] for t in parts)
        return tuple(out)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors or not isinstance(args[0] if args else None, torch.Tensor):
        return None
    x = args[0]
    shape = tuple(x.shape)
    if spec.kind == WINDOW and x.dim() >= 3:
        if node.op == "call_function" and node.target not in (F.conv2d, torch.conv2d,
                                                              F.avg_pool2d, F.lp_pool2d):
            return None  # max-pool functions may return indices too
        w: Window = spec.params["window"]
        channels = shape[-3]
        if w.mixes_channels:
            if module is None or getattr(module, "in_channels", channels) != channels:
                return None  # the op itself checks channels (and says what it expected)
            channels = module.out_channels
        return (*shape[:-3], channels, w.out_size(shape[-2], 0), w.out_size(shape[-1], 1))
    if spec.kind == ELEMENTWISE:
        if len(tensors) == 1:
            return shape
        if node.target in _OPERATOR_ELEMENTWISE or (
            node.op != "call_module" and _target_name(node) in _BROADCAST_NAMES
        ):
            return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
        return None
    if spec.kind == ADAPTIVE and module is not None and x.dim() >= 3:
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        size = tuple(shape[-2 + t] if s is None else int(s) for t, s in enumerate(size))
        return (*shape[:-2], *size)
    if spec.kind == LINEAR and isinstance(module, nn.Linear):
        return (*shape[:-1], module.out_features)
    return None
