"""PyTorch twin of workloads.py: the same W1/W2/W3 math and init distributions, NCHW.

Weights are stored in PyTorch's layout (conv `OIHW`, linear `(out, in)`);
`load_jax_params` copies parameters given in the JAX layout, which is how
`python benchmarks/workloads_torch.py --check-twin FILE.npz ...` (used by the tests)
verifies that both twins compute the same function.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import run_all

GROUPS = 8
GN_EPS = 1e-5
W3_BRANCH_SCALE = 0.1  # as in workloads.py
NUM_CLASSES = 10


def group_norm(x: torch.Tensor) -> torch.Tensor:
    """GroupNorm with 8 groups, no affine; x is NCHW."""
    return F.group_norm(x, GROUPS, eps=GN_EPS)


def conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Bias-free convolution padding (k - 1) // 2 on each side."""
    return F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _normal(shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * std)


def _conv_weight(size: int, c_in: int, c_out: int, std=None) -> nn.Parameter:
    std = (size * size * c_in) ** -0.5 if std is None else std
    return _normal((c_out, c_in, size, size), std)


def _head(features: int) -> nn.Linear:
    head = nn.Linear(features, NUM_CLASSES)
    nn.init.normal_(head.weight, std=features**-0.5)
    nn.init.zeros_(head.bias)
    return head


def conv_block(params: nn.ParameterDict, z, injection, conv_b_scale=1.0):
    """The w2 cell `gn(relu(z + gn(inj + s conv_b(gn(relu(conv_a(z)))))))`
    (`s = conv_b_scale`, 1 in w2)."""
    hidden = group_norm(torch.relu(conv(z, params["conv_a"])))
    branch = conv_b_scale * conv(hidden, params["conv_b"])
    return group_norm(torch.relu(z + group_norm(injection + branch)))


class W1(nn.Module):
    """`tanh(W z + U x + b)`; the injection `U x + b` is computed once."""

    def __init__(self, sizes: run_all.Sizes):
        super().__init__()
        self.W = _normal((sizes.d_state, sizes.d_state), 0.5 * sizes.d_state**-0.5)
        self.U = _normal((sizes.d_in, sizes.d_state), sizes.d_in**-0.5)
        self.b = nn.Parameter(torch.zeros(sizes.d_state))
        self.head = _head(sizes.d_state)

    def inject(self, x):
        return x @ self.U + self.b

    def cell(self, z, injection):
        return torch.tanh(z @ self.W + injection)

    def initial_state(self, injection):
        return torch.zeros_like(injection)

    def features(self, z):
        return z


class W2(nn.Module):
    """The w2 residual conv cell with GroupNorm."""

    def __init__(self, sizes: run_all.Sizes):
        super().__init__()
        (channels,) = sizes.channels
        self.inject_conv = _conv_weight(3, 3, channels)
        self.block = nn.ParameterDict(
            {
                "conv_a": _conv_weight(3, channels, sizes.inner, std=0.01),
                "conv_b": _conv_weight(3, sizes.inner, channels, std=0.01),
            }
        )
        self.head = _head(channels)

    def inject(self, x):
        return conv(x, self.inject_conv)

    def cell(self, z, injection):
        return conv_block(self.block, z, injection)

    def initial_state(self, injection):
        return torch.zeros_like(injection)

    def features(self, z):
        return z.mean(dim=(2, 3))


class W3(nn.Module):
    """2-scale MDEQ-style cell (see workloads.py); the state is a list of 2 tensors."""

    def __init__(self, sizes: run_all.Sizes):
        super().__init__()
        c0, c1 = sizes.channels
        self.channels = (c0, c1)
        self.inject_conv = _conv_weight(3, 3, c0)
        # conv_b kernels at 0.01 / W3_BRANCH_SCALE, their outputs scaled by it
        # (see workloads.W3_BRANCH_SCALE)
        self.block0 = nn.ParameterDict(
            {
                "conv_a": _conv_weight(3, c0, c0, std=0.01),
                "conv_b": _conv_weight(3, c0, c0, std=0.01 / W3_BRANCH_SCALE),
            }
        )
        self.block1 = nn.ParameterDict(
            {
                "conv_a": _conv_weight(3, c1, c1, std=0.01),
                "conv_b": _conv_weight(3, c1, c1, std=0.01 / W3_BRANCH_SCALE),
            }
        )
        self.up_1to0 = _conv_weight(1, c1, c0)
        self.down_0to1 = _conv_weight(3, c0, c1)
        self.head = _head(c0 + c1)

    def inject(self, x):
        return conv(x, self.inject_conv)

    def cell(self, z, injection):
        z0, z1 = z
        m0 = conv_block(self.block0, z0, injection, W3_BRANCH_SCALE)
        hidden = group_norm(torch.relu(conv(z1, self.block1["conv_a"])))
        m1 = W3_BRANCH_SCALE * torch.relu(conv(hidden, self.block1["conv_b"]))
        fused0 = m0 + upsample2(conv(m1, self.up_1to0))
        fused1 = m1 + conv(m0, self.down_0to1, stride=2)
        return [group_norm(fused0), group_norm(fused1)]

    def initial_state(self, injection):
        b, _, h, w = injection.shape
        c0, c1 = self.channels
        return [
            injection.new_zeros((b, c0, h, w)),
            injection.new_zeros((b, c1, h // 2, w // 2)),
        ]

    def features(self, z):
        return torch.cat([s.mean(dim=(2, 3)) for s in z], dim=1)


def get_workload(name: str, tiny: bool = False) -> nn.Module:
    """The twin of `workloads.get_workload` (freshly initialised parameters)."""
    return {"w1": W1, "w2": W2, "w3": W3}[name](run_all.workload_sizes(name, tiny))


def input_shape(name: str, tiny: bool = False) -> tuple[int, ...]:
    """Per-sample input shape, NCHW for images."""
    sizes = run_all.workload_sizes(name, tiny)
    return (sizes.d_in,) if name == "w1" else (3, sizes.image, sizes.image)


def _jax_to_torch_layout(value: np.ndarray) -> torch.Tensor:
    """HWIO conv kernels to OIHW; everything else unchanged."""
    tensor = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return tensor.permute(3, 2, 0, 1).contiguous() if tensor.dim() == 4 else tensor


def load_jax_params(workload: nn.Module, params: dict[str, np.ndarray]) -> None:
    """Copy params given as flat `"group/name"` keys in the JAX layout."""
    names = {
        "inject/U": "U",
        "inject/b": "b",
        "cell/W": "W",
        "inject/conv": "inject_conv",
        "cell/conv_a": "block.conv_a",
        "cell/conv_b": "block.conv_b",
        "cell/block0/conv_a": "block0.conv_a",
        "cell/block0/conv_b": "block0.conv_b",
        "cell/block1/conv_a": "block1.conv_a",
        "cell/block1/conv_b": "block1.conv_b",
        "cell/up_1to0": "up_1to0",
        "cell/down_0to1": "down_0to1",
        "head/b": "head.bias",
    }
    state = {}
    for key, value in params.items():
        if key == "head/w":
            state["head.weight"] = torch.from_numpy(np.asarray(value).T.copy())
        else:
            state[names[key]] = _jax_to_torch_layout(value)
    missing, unexpected = workload.load_state_dict(state, strict=True)
    assert not missing and not unexpected


def _nhwc_to_nchw(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return tensor.permute(0, 3, 1, 2) if tensor.dim() == 4 else tensor


def check_twin(path: str) -> dict:
    """Compare injection and cell output against values the JAX twin saved.

    The .npz holds `workload`, `tiny`, params as `param:group/name`, `x`, the
    state `z:i` per scale, and the JAX results `injection` and `cell:i`.
    """
    data = np.load(path)
    name, tiny = str(data["workload"]), bool(data["tiny"])
    workload = get_workload(name, tiny)
    params = {k[len("param:") :]: data[k] for k in data.files if k.startswith("param:")}
    load_jax_params(workload, params)
    scales = sorted(k for k in data.files if k.startswith("z:"))
    with torch.no_grad():
        injection = workload.inject(_nhwc_to_nchw(data["x"]))
        states = [_nhwc_to_nchw(data[k]) for k in scales]
        out = workload.cell(states if len(states) > 1 else states[0], injection)
    outs = out if isinstance(out, list) else [out]
    errors = [(injection - _nhwc_to_nchw(data["injection"])).abs().max().item()]
    errors += [
        (o - _nhwc_to_nchw(data[f"cell:{i}"])).abs().max().item()
        for i, o in enumerate(outs)
    ]
    return {"workload": name, "max_abs_err": max(errors)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-twin", nargs="+", required=True, metavar="FILE.npz")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    results = [check_twin(path) for path in args.check_twin]
    for result in results:
        print(json.dumps(result))
    sys.exit(0 if all(r["max_abs_err"] <= args.tol for r in results) else 1)
