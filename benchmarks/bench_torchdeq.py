"""torchdeq 0.1.0 peer (PyTorch), run in .venv-torch (see envs.sh).

    get_deq(f_solver="anderson", f_max_iter=30, f_tol=1e-4, f_stop_mode="rel",
            b_solver="fixed_point_iter", b_max_iter=30, b_tol=1e-6, ift=True)

with Anderson memory 5 (`solver_kwargs={"m": 5}`; torchdeq's default is 6; its ridge
`lam` defaults to 1e-4 and its damping `tau` to 1). torchdeq's Anderson loop runs until
the largest per-sample relative residual is below 1e-4, like the bare JAX loop; its
`nstep` is each sample's step of lowest residual. In training mode its IFT path applies
`f` once more after the solve (for the parameter gradient).

    .venv-torch/bin/python benchmarks/bench_torchdeq.py --workloads w1,w2 [--tiny]
"""

from __future__ import annotations

import importlib.metadata
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchdeq import get_deq

import run_all
import workloads_torch

HISTORY = 5
MAX_STEPS = 30
BACKWARD_ATOL = 1e-6
STOP_RULE = (
    "per sample: loop until every sample's ||f(z)-z||/(||f(z)||+1e-9) < 1e-4 "
    "(max over the batch), max 30 evaluations"
)


class CountingCell:
    """Wraps a workload's cell, counting its calls (torchdeq passes scales as *args)."""

    def __init__(self, workload: nn.Module, injection: torch.Tensor, multiscale: bool):
        self.workload, self.injection, self.multiscale = workload, injection, multiscale
        self.calls = 0

    def __call__(self, *state):
        self.calls += 1
        return self.workload.cell(
            list(state) if self.multiscale else state[0], self.injection
        )


class Model(nn.Module):
    """Injection, torchdeq fixed-point solve, head."""

    def __init__(self, workload: nn.Module):
        super().__init__()
        self.workload = workload
        self.deq = get_deq(
            f_solver="anderson",
            f_max_iter=MAX_STEPS,
            f_tol=1e-4,
            f_stop_mode="rel",
            b_solver="fixed_point_iter",
            b_max_iter=MAX_STEPS,
            b_tol=BACKWARD_ATOL,
            ift=True,
        )
        self.last_cell: CountingCell | None = None
        self.backward_info = None

    def forward(self, x):
        injection = self.workload.inject(x)
        z0 = self.workload.initial_state(injection)
        multiscale = isinstance(z0, list)
        self.last_cell = CountingCell(self.workload, injection, multiscale)
        states, info = self.deq(
            self.last_cell,
            z0,
            solver_kwargs={"m": HISTORY},
            backward_writer=self._record_backward,
        )
        z_star = states[-1]
        return self.workload.head(self.workload.features(z_star)), info

    def _record_backward(self, info):
        self.backward_info = info


def _backward_iterations(info) -> int | None:
    """VJP iterations of torchdeq's backward solve, read off its residual trace.

    The trace starts with a placeholder entry and is padded with the lowest residual
    after an early stop, so the count is the first entry whose batch maximum is below
    the tolerance.
    """
    if info is None:
        return None
    trace = info["abs_trace"][:, 1:].max(dim=0).values
    below = (trace < BACKWARD_ATOL).nonzero()
    return int(below[0, 0]) + 1 if len(below) else int(trace.shape[0])


def _forward_trace(info, evaluations: int) -> list[float | None]:
    """Max relative residual per evaluation (the first two aren't traced)."""
    trace = info["rel_trace"][:, 1:].max(dim=0).values.tolist()
    return [None, None] + trace[: max(evaluations - 2, 0)]


def measure(name: str, batch: int, reps: int, tiny: bool, device: str) -> dict:
    torch.manual_seed(0)
    model = Model(workloads_torch.get_workload(name, tiny)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *workloads_torch.input_shape(name, tiny), device=device)
    labels = torch.randint(0, workloads_torch.NUM_CLASSES, (batch,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(x)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        sync()

    def infer():
        with torch.no_grad():
            model(x)
        sync()

    model.train()
    start = time.perf_counter()
    train_step()
    compile_s = time.perf_counter() - start
    for _ in range(run_all.WARMUP_CALLS):
        train_step()
    host_memory = run_all.HostPeakMemory()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    host_memory.start()
    train_step_s = run_all.median_seconds(train_step, reps)
    if device == "cuda":
        peak_bytes, memory_kind = torch.cuda.max_memory_allocated(), "device_peak"
    else:
        peak_bytes, memory_kind = host_memory.peak_delta_bytes(), "host_rss_delta"
    bwd_nfe = _backward_iterations(model.backward_info)

    model.eval()
    infer()
    infer_s = run_all.median_seconds(infer, reps)
    with torch.no_grad():
        _, info = model(x)
    fwd_nfe = model.last_cell.calls
    return run_all.make_record(
        lib="torchdeq",
        device="cuda" if device == "cuda" else "cpu",
        device_name=(
            torch.cuda.get_device_name() if device == "cuda" else run_all.cpu_model()
        ),
        workload=name,
        batch=batch,
        tiny=tiny,
        reps=reps,
        train_step_s=train_step_s,
        infer_s=infer_s,
        compile_s=compile_s,
        fwd_nfe=fwd_nfe,
        fwd_nfe_per_sample=float(info["nstep"].float().mean()),
        fwd_stop_rule=STOP_RULE,
        fwd_rel_residual_max=float(info["rel_lowest"].max()),
        bwd_nfe=bwd_nfe,
        peak_mem_bytes=peak_bytes,
        memory_kind=memory_kind,
        residual_trace=_forward_trace(info, fwd_nfe),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchdeq": importlib.metadata.version("torchdeq"),
        },
    )


def main() -> None:
    args = run_all.bench_arg_parser("torchdeq").parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.workloads:
        for batch in run_all.batches_for(name, device, args.tiny, args.batches):
            reps = run_all.reps_for(name, device, args.tiny, args.reps)
            run_all.emit(measure(name, batch, reps, args.tiny, device))


if __name__ == "__main__":
    main()
