"""Side-by-side DEQ benchmarks: run every peer on every workload, write RESULTS.md.

    python benchmarks/run_all.py                      # everything, full size
    python benchmarks/run_all.py --workloads w1,w2 --peers bare_jax,torchdeq --reps 3
    python benchmarks/run_all.py --tiny --out /tmp/b  # smoke run (the test suite's)

Each peer runs in its own virtual environment (`bash benchmarks/envs.sh` creates the
torchdeq and banax ones) as one subprocess per workload, and prints one JSON line per
(workload, batch) in the format of `RECORD_FIELDS`. Peers whose script or venv is
missing are skipped with a message. Results go to `<out>/RESULTS.md`,
`<out>/results/records.jsonl` and PNG plots in `<out>/results/`; subprocess logs to
`<out>/results/raw/`.

This module is also the framework-free half of the protocol that every bench script
imports (it needs only the standard library): workload sizes, batch and repetition
policy, the record schema, timing and host-memory measurement.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKLOADS = ("w1", "w2", "w3")
WARMUP_CALLS = 1  # train-step calls after the first (compiling) one, before timing


# ---------------------------------------------------------------------------------
# Workload sizes and measurement policy, shared by the JAX and PyTorch sides.


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one workload (see workloads.py for the math)."""

    tiny: bool = False
    image: int = 32  # input height and width (w2, w3)
    channels: tuple[int, ...] = ()  # state channels per scale (w2: one scale)
    inner: int = 0  # w2: width between conv_a and conv_b
    d_in: int = 64  # w1 input width
    d_state: int = 256  # w1 state width


_FULL_SIZES = {
    "w1": Sizes(),
    "w2": Sizes(channels=(48,), inner=64),
    "w3": Sizes(channels=(32, 64)),
}
_TINY_SIZES = {
    "w1": Sizes(tiny=True, d_in=8, d_state=32),
    "w2": Sizes(tiny=True, image=8, channels=(16,), inner=16),
    "w3": Sizes(tiny=True, image=8, channels=(16, 16)),
}
_BATCHES = {
    "cpu": {"w1": (128,), "w2": (32,), "w3": (32,)},
    "gpu": {"w1": (128,), "w2": (32, 128), "w3": (32,)},
}
_TINY_BATCH = 4
_REPS = {"cpu": {"w1": 20, "w2": 3, "w3": 3}, "gpu": {"w1": 50, "w2": 20, "w3": 20}}
_TINY_REPS = 2


def workload_sizes(name: str, tiny: bool = False) -> Sizes:
    """Shapes of workload `name` ("w1", "w2", "w3")."""
    return (_TINY_SIZES if tiny else _FULL_SIZES)[name]


def _device_class(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


def batches_for(name: str, device: str, tiny: bool, override=None) -> tuple[int, ...]:
    """Batch sizes to run for a workload on a device ("cpu", "gpu"/"cuda")."""
    if override:
        return tuple(override)
    return (_TINY_BATCH,) if tiny else _BATCHES[_device_class(device)][name]


def reps_for(name: str, device: str, tiny: bool, override=None) -> int:
    """Timed repetitions (the median is reported)."""
    if override:
        return override
    return _TINY_REPS if tiny else _REPS[_device_class(device)][name]


# ---------------------------------------------------------------------------------
# The JSON line every bench script prints, one per (workload, batch).

RECORD_FIELDS = {
    "lib": "peer name: bare_jax, jaxdeq, torchdeq, banax, banax_per_sample",
    "device": "cpu | gpu | cuda",
    "device_name": "CPU/GPU model",
    "workload": "w1 | w2 | w3",
    "batch": "batch size",
    "tiny": "true for the smoke-test shapes",
    "reps": "timed repetitions behind each median",
    "train_step_s": "median seconds of solve + backward + Adam update",
    "infer_s": "median seconds of a forward solve plus head, no gradient",
    "compile_s": "seconds of the first train-step call (compilation + one step)",
    "fwd_nfe": "cell evaluations on the batch in one inference solve",
    "fwd_nfe_per_sample": "mean over samples of the evaluation count at which each "
    "sample stopped or reached its best residual (null if unavailable)",
    "fwd_stop_rule": "how the forward solve stops",
    "fwd_rel_residual_max": "largest per-sample relative residual at the end",
    "bwd_nfe": "iterations (VJPs) of the backward solve (null if unavailable)",
    "time_per_fwd_iter_s": "infer_s / fwd_nfe",
    "peak_mem_bytes": "peak memory of the timed train steps (see memory_kind)",
    "memory_kind": "host_rss_delta (CPU: peak RSS over the timed train steps minus "
    "RSS before them) | device_peak (GPU: peak bytes in use)",
    "residual_trace": "max relative residual after each forward evaluation",
    "versions": "package versions of the peer's environment",
    "host_load_1min": "the host's 1-minute load average when the record was made "
    "(these machines are shared: a load above the core count inflates times)",
}


def make_record(**fields) -> dict:
    """A record with every field of `RECORD_FIELDS` (missing optional ones null)."""
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise ValueError(f"unknown record fields {sorted(unknown)}")
    record = {name: fields.get(name) for name in RECORD_FIELDS}
    if record["host_load_1min"] is None and hasattr(os, "getloadavg"):
        record["host_load_1min"] = round(os.getloadavg()[0], 2)
    if record["time_per_fwd_iter_s"] is None and record["fwd_nfe"]:
        record["time_per_fwd_iter_s"] = record["infer_s"] / record["fwd_nfe"]
    return record


def emit(record: dict) -> None:
    """Print a record as one JSON line on stdout."""
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------
# Measurement helpers.


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `reps` calls of `fn` (which must block until done)."""
    durations = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def _proc_status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class HostPeakMemory:
    """Peak host RSS growth over a code region (Linux: resets the RSS high-water mark).

    Freed heap memory is returned to the OS first (`malloc_trim`), so that buffers a
    step allocates show up as RSS growth rather than reuse of a warm-up's pages.
    Without `/proc/self/clear_refs` it falls back to `ru_maxrss`, which then also
    counts everything before the region (compilation included).
    """

    def __init__(self) -> None:
        self._baseline_kib = 0
        self._hwm_was_reset = False

    def start(self) -> None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._baseline_kib = _proc_status_kib("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm_was_reset = True
        except OSError:
            self._hwm_was_reset = False

    def peak_delta_bytes(self) -> int:
        if self._hwm_was_reset:
            peak_kib = _proc_status_kib("VmHWM") or 0
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kib - self._baseline_kib, 0) * 1024


def bench_arg_parser(lib: str) -> argparse.ArgumentParser:
    """The command line every bench script accepts."""
    parser = argparse.ArgumentParser(description=f"DEQ benchmark peer: {lib}")
    parser.add_argument("--workloads", type=_workload_list, default=list(WORKLOADS))
    parser.add_argument("--batches", type=_int_list, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="smoke-test shapes")
    return parser


def _workload_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workloads {unknown}; {WORKLOADS}")
    return names


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------------------------
# Peers and the orchestrator.


@dataclasses.dataclass(frozen=True)
class Peer:
    """A bench script, the venv it runs in (None: this interpreter), extra args."""

    name: str
    script: str
    venv: str | None
    extra_args: tuple[str, ...] = ()

    def python(self) -> Path:
        return Path(sys.executable) if self.venv is None else self.venv_python()

    def venv_python(self) -> Path:
        return REPO_ROOT / str(self.venv) / "bin" / "python"

    def missing(self) -> str | None:
        """Why this peer can't run here, or None."""
        if not (BENCH_DIR / self.script).exists():
            return f"benchmarks/{self.script} does not exist (yet)"
        if self.venv is not None and not self.venv_python().exists():
            return f"{self.venv} not found (create it: bash benchmarks/envs.sh)"
        return None


PEERS = {
    peer.name: peer
    for peer in (
        Peer("jaxdeq", "bench_jaxdeq.py", None),
        Peer("bare_jax", "bench_bare_jax.py", None),
        Peer("torchdeq", "bench_torchdeq.py", ".venv-torch"),
        Peer("banax", "bench_banax.py", ".venv-banax"),
        Peer(
            "banax_per_sample",
            "bench_banax.py",
            ".venv-banax",
            ("--per-sample",),
        ),
    )
}
JAX_PEERS_IN_MAIN_VENV = ("jaxdeq", "bare_jax")


def run_peer(peer: Peer, workload: str, args, raw_dir: Path) -> list[dict]:
    """Run one peer on one workload in a subprocess; its records."""
    command = [str(peer.python()), str(BENCH_DIR / peer.script), *peer.extra_args]
    command += ["--workloads", workload]
    if args.tiny:
        command.append("--tiny")
    if args.reps:
        command += ["--reps", str(args.reps)]
    if args.batches:
        command += ["--batches", ",".join(map(str, args.batches))]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    print(f"[run_all] {peer.name} {workload}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"[run_all] {peer.name} {workload}: timed out after {args.timeout} s")
        return []
    log = raw_dir / f"{peer.name}_{workload}.log"
    log.write_text(f"$ {shlex.join(command)}\n{completed.stdout}\n{completed.stderr}")
    records = [
        json.loads(line)
        for line in completed.stdout.splitlines()
        if line.startswith("{")
    ]
    elapsed = time.perf_counter() - start
    status = "ok" if completed.returncode == 0 else f"exit {completed.returncode}"
    print(
        f"[run_all] {peer.name} {workload}: {status}, {len(records)} records, "
        f"{elapsed:.0f} s (log: {log})",
        flush=True,
    )
    if completed.returncode != 0:
        print(completed.stderr[-2000:], file=sys.stderr)
    return records


def _record_key(record: dict) -> tuple:
    return (record["lib"], record["device"], record["workload"], record["batch"])


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with every (lib, device, workload, batch) that `new` has replaced."""
    replaced = {_record_key(record) for record in new}
    return [r for r in old if _record_key(r) not in replaced] + new


# ---------------------------------------------------------------------------------
# RESULTS.md and plots.


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.machine()


def _machine_description() -> str:
    memory_kib = None
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        memory_kib = int(match.group(1)) if match else None
    except OSError:
        pass
    memory = f", {memory_kib / 2**20:.0f} GiB RAM" if memory_kib else ""
    cores = f"{os.cpu_count()} cores"
    return f"{platform.system()} {platform.machine()}, {cpu_model()}, {cores}{memory}"


def reference_lib(records: list[dict]) -> str:
    """The peer the ratios are taken against: jaxdeq when measured, else bare_jax."""
    libs = {record["lib"] for record in records}
    return "jaxdeq" if "jaxdeq" in libs else "bare_jax"


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def _number(value, fmt="{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _group(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["device"], record["workload"], record["batch"])
        groups.setdefault(key, []).append(record)
    return dict(sorted(groups.items()))


def ratio_rows(records: list[dict]) -> list[dict]:
    """Reference/peer time ratios per (device, workload, batch, peer)."""
    reference = reference_lib(records)
    rows = []
    for (device, workload, batch), group in _group(records).items():
        by_lib = {record["lib"]: record for record in group}
        if reference not in by_lib:
            continue
        ref = by_lib[reference]
        for lib, peer in sorted(by_lib.items()):
            if lib == reference:
                continue
            rows.append(
                {
                    "device": device,
                    "workload": workload,
                    "batch": batch,
                    "peer": lib,
                    "train": ref["train_step_s"] / peer["train_step_s"],
                    "infer": ref["infer_s"] / peer["infer_s"],
                    "per_iter": (
                        ref["time_per_fwd_iter_s"] / peer["time_per_fwd_iter_s"]
                        if ref["time_per_fwd_iter_s"] and peer["time_per_fwd_iter_s"]
                        else None
                    ),
                }
            )
    return rows


def render_results(
    records: list[dict], command: str, plots: list[str], extra: list[Path] = ()
) -> str:
    """The text of RESULTS.md; `extra` are the other benchmarks' markdown reports in
    results/ (solver nfe, gradient modes, sharding, conv rewrite), appended whole."""
    reference = reference_lib(records)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# DEQ benchmarks: jaxdeq and peers side by side",
        "",
        f"Generated by `{command}` on {date}.",
        f"Machine: {_machine_description()}.",
        "Workloads, solver settings and targets: `/work/shared/BENCHMARKS.md` "
        "(W1 mlp, W2 conv, W3 2-scale MDEQ-style; definitions in "
        "`benchmarks/workloads.py`). Times are medians after compilation and warm-up; "
        "one process per (peer, workload).",
        "",
        "## Measurements",
        "",
    ]
    header = (
        "| lib | train step (ms) | inference (ms) | fwd nfe (batch) | fwd nfe / sample "
        "| bwd nfe | ms / fwd iter | peak mem (MiB) | first step (s) | reps "
        "| host load |"
    )
    for (_, workload, batch), group in _group(records).items():
        device_name = group[0]["device_name"]
        tiny = " (tiny shapes)" if group[0]["tiny"] else ""
        lines += [f"### {workload} · batch {batch} · {device_name}{tiny}", "", header]
        lines.append("|" + "---|" * 11)
        for record in sorted(group, key=lambda r: r["lib"]):
            memory = record["peak_mem_bytes"]
            lines.append(
                f"| {record['lib']} | {_ms(record['train_step_s'])} "
                f"| {_ms(record['infer_s'])} | {_number(record['fwd_nfe'], '{}')} "
                f"| {_number(record['fwd_nfe_per_sample'])} "
                f"| {_number(record['bwd_nfe'], '{}')} "
                f"| {_ms(record['time_per_fwd_iter_s'])} "
                f"| {_number(None if memory is None else memory / 2**20)} "
                f"| {_number(record['compile_s'], '{:.2f}')} | {record['reps']} "
                f"| {_number(record.get('host_load_1min'))} |"
            )
        lines.append("")
    rows = ratio_rows(records)
    lines += [
        f"## Ratios: {reference} / peer",
        "",
        f"Time ratios `t({reference}) / t(peer)`: below 1 means {reference} is "
        "faster (speed-up = 1 / ratio). 'per iter' compares time per forward "
        "iteration, which factors out unequal iteration counts from different "
        "stopping rules.",
        "",
        "| device | workload | batch | peer | train | infer | per iter "
        f"| {reference} train speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['device']} | {row['workload']} | {row['batch']} | {row['peer']} "
            f"| {row['train']:.2f} | {row['infer']:.2f} "
            f"| {_number(row['per_iter'], '{:.2f}')} | {1 / row['train']:.2f}x |"
        )
    lines += ["", "## Stopping rules and versions", ""]
    lines += ["| lib | forward stopping rule | versions |", "|---|---|---|"]
    seen = {}
    for record in records:
        seen.setdefault(record["lib"], record)
    for lib, record in sorted(seen.items()):
        versions = ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items()))
        stop_rule = str(record["fwd_stop_rule"]).replace("|", "\\|")
        lines.append(f"| {lib} | {stop_rule} | {versions} |")
    lines += [
        "",
        "Columns: *fwd nfe (batch)* is the number of cell evaluations on the whole "
        "batch in one inference solve (what the time pays for); *fwd nfe / sample* is "
        "the mean per-sample count where the peer reports one (torchdeq: the step of "
        "each sample's lowest residual). *bwd nfe*: VJP iterations of the implicit "
        "backward solve for the batch's real loss cotangent. *peak mem*: on CPU the "
        "growth of the process's peak RSS over the timed train steps (after "
        "`malloc_trim`), on GPU the device's peak bytes in use. *first step*: "
        "compilation plus one step for JAX; PyTorch's first step (no compilation). "
        f"*host load*: 1-minute load average when the row was measured, on "
        f"{os.cpu_count()} cores; other jobs share the machine, so compare ratios "
        "measured at similar load.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}](results/{Path(p).name})" for p in plots]
        lines.append("")
    for path in extra:
        text = path.read_text().strip()
        # demote the report's headings below this page's sections
        text = "\n".join(
            "#" + line if line.startswith("#") else line for line in text.splitlines()
        )
        lines += [f"<!-- from results/{path.name} -->", text, ""]
    return "\n".join(lines)


def write_plots(records: list[dict], results_dir: Path) -> list[str]:
    """Speed-up bars and residual curves as PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[run_all] matplotlib not installed: no plots")
        return []
    written = []
    rows = ratio_rows(records)
    if rows:
        reference = reference_lib(records)
        cells = sorted({(r["device"], r["workload"], r["batch"]) for r in rows})
        peers = sorted({r["peer"] for r in rows})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        width = 0.8 / len(peers)
        for ax, metric in zip(axes, ("train", "infer"), strict=True):
            for i, peer in enumerate(peers):
                speedups = [
                    next(
                        (
                            1 / r[metric]
                            for r in rows
                            if (r["device"], r["workload"], r["batch"]) == cell
                            and r["peer"] == peer
                        ),
                        0.0,
                    )
                    for cell in cells
                ]
                positions = [c + i * width for c in range(len(cells))]
                ax.bar(positions, speedups, width, label=peer)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cells))])
            ax.set_xticklabels([f"{w} B{b}\n{d}" for d, w, b in cells])
            ax.set_yscale("log")
            ax.set_title(f"{metric}: speed-up of {reference} over peer")
        axes[0].legend()
        fig.tight_layout()
        path = results_dir / "speedups.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    traced = [r for r in records if r["residual_trace"]]
    if traced:
        import numpy as np

        libs = sorted({r["lib"] for r in traced})
        colors = {lib: f"C{i}" for i, lib in enumerate(libs)}
        groups = _group(traced)
        fig, axes = plt.subplots(
            1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False
        )
        for ax, ((device, workload, batch), group) in zip(
            axes[0], groups.items(), strict=True
        ):
            for record in sorted(group, key=lambda r: r["lib"]):
                trace = [np.nan if v is None else v for v in record["residual_trace"]]
                ax.semilogy(
                    range(1, len(trace) + 1),
                    trace,
                    label=record["lib"],
                    color=colors[record["lib"]],
                )
            ax.axhline(1e-4, color="grey", linestyle=":", linewidth=0.8)
            ax.set_title(f"{workload} B{batch} ({device})")
            ax.set_xlabel("forward evaluation")
            ax.legend()
        axes[0][0].set_ylabel("max relative residual")
        fig.tight_layout()
        path = results_dir / "residuals.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# Reports a full run regenerates beside the peers' records (each writes one
# results/*.md, appended to RESULTS.md): (script, workload it needs or None).
REPORTS = (("bench_compile.py", None), ("bench_w2_backward.py", "w2"))


def run_reports(args, results_dir: Path) -> None:
    """Run each report script (main venv) that the selected workloads call for."""
    for script, workload in REPORTS:
        if workload is not None and workload not in args.workloads:
            continue
        out = results_dir / (
            "compile.md" if script == "bench_compile.py" else "w2_backward.md"
        )
        command = [sys.executable, str(BENCH_DIR / script), "--out", str(out)]
        print(f"[run_all] {shlex.join(command)}", flush=True)
        try:
            completed = subprocess.run(
                command,
                cwd=REPO_ROOT,
                timeout=args.timeout,
                text=True,
                capture_output=True,
            )
        except subprocess.TimeoutExpired:
            print(f"[run_all] {script} timed out", flush=True)
            continue
        if completed.returncode != 0:
            print(f"[run_all] {script} failed:\n{completed.stderr[-2000:]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=_workload_list, default=list(WORKLOADS))
    parser.add_argument(
        "--peers",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PEERS),
        help=f"comma-separated, from {list(PEERS)}",
    )
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--batches", type=_int_list, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few reps")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR, help="where RESULTS.md and results/ go"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep earlier records in <out>/results/records.jsonl that this run "
        "does not replace",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per subprocess")
    parser.add_argument(
        "--no-reports",
        action="store_true",
        help="skip the reports that full runs regenerate besides the peers' records "
        f"({', '.join(name for name, _ in REPORTS)}; never with --tiny)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite RESULTS.md and plots from <out>/results/records.jsonl",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.peers if name not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {list(PEERS)}")

    results_dir = args.out / "results"
    raw_dir = results_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for name in [] if args.render_only else args.peers:
        peer = PEERS[name]
        reason = peer.missing()
        if reason:
            print(f"[run_all] skipping {name}: {reason}", flush=True)
            continue
        for workload in args.workloads:
            records += run_peer(peer, workload, args, raw_dir)

    if not (args.tiny or args.render_only or args.no_reports):
        run_reports(args, results_dir)

    records_path = results_dir / "records.jsonl"
    if (args.merge or args.render_only) and records_path.exists():
        old = [json.loads(line) for line in records_path.read_text().splitlines()]
        records = merge_records(old, records)
    if not records:
        print("[run_all] no records: nothing written", file=sys.stderr)
        return 1
    records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plots = write_plots(records, results_dir)
    command = shlex.join(["python", "benchmarks/run_all.py", *(argv or sys.argv[1:])])
    commands_path = results_dir / "commands.txt"
    if args.render_only and commands_path.exists():
        command = " && ".join(commands_path.read_text().splitlines())
    else:
        if not args.merge:
            commands_path.write_text("")
        with commands_path.open("a") as commands:
            commands.write(command + "\n")
        command = " && ".join(commands_path.read_text().splitlines())
    extra = sorted((args.out / "results").glob("*.md"))
    (args.out / "RESULTS.md").write_text(render_results(records, command, plots, extra))
    print(f"[run_all] wrote {args.out / 'RESULTS.md'} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
