"""Benchmark of the fused rank-1 linear layer: `python -m kernels.bench [--quick]`.

For every shape in the grid (the paper's LSTM gates, Transformer MLP layers; K members;
M rows per member), dtype, and pass (forward, forward+backward) it times
    fused     kernels.rank1_linear(impl="triton")
    folded    kernels.rank1.rank1_linear_folded: each member's weight built, then one batched
              matmul (the CPU's eager path from many rows per member)
    eager     the three-op PyTorch reference
    compiled  torch.compile of the eager reference
    floor     a plain batched matmul of the same shape without any scaling (cuBLAS)
with triton.testing.do_bench (median ms), and reports TFLOP/s, GB/s of compulsory traffic,
speed-up over eager, ratio to the floor and peak memory, and judges the bf16 forward+backward
means against issue 3's targets. Rewrites the table as JSON and CSV after every case, so a run
cut short (a time limit, Ctrl-C) keeps what it timed; narrow the grid with --layers, --members, --rows and --dtype
(on an H100, 36 bf16 shapes took about 2.5 minutes). Before timing, the fused kernel is checked against a
float64 reference in every dtype it will time.

Without CUDA it says so, times only the eager reference and the folded form on the CPU, and
checks the interpreted Triton kernel (TRITON_INTERPRET=1, in a subprocess) on a small shape.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from kernels.cli import OutputError, cannot_write, check_writable, positive_int
from kernels.optional_triton import TRITON_INSTALLED
from kernels.rank1 import interpreting, rank1_linear, rank1_linear_eager, rank1_linear_folded, tf32_matmuls

# (name, d_in, d_out): the paper's LSTM gate matrices (4H x d_in with H = 500) and the
# Transformer MLP layers (d_model 512 and 1024, 4x expansion).
LAYERS = [
    ("lstm-500", 500, 2000),
    ("lstm-756", 756, 2000),
    ("tf512-mlp-in", 512, 2048),
    ("tf512-mlp-out", 2048, 512),
    ("tf1024-mlp-in", 1024, 4096),
    ("tf1024-mlp-out", 4096, 1024),
]
MEMBERS = [1, 4, 10]
ROWS = [256, 1024, 4096, 16384]
QUICK = {"layers": LAYERS[:1] + LAYERS[2:3], "members": [4], "rows": [1024, 4096]}
CPU_QUICK = {"layers": LAYERS[:1] + LAYERS[2:3], "members": [1, 4], "rows": [256]}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd")
# Rows per member from which a shape counts as compute-bound for the floor target.
COMPUTE_BOUND_ROWS = 4096
# Issue 3's targets on an H100, for the means over the grid of bf16 forward+backward.
TARGET_CASE = ("bf16", "fwd+bwd")
TARGET_OVER_EAGER, TARGET_OVER_COMPILED, TARGET_FLOOR_RATIO = 1.5, 1.2, 1.15
# Where the CUDA branch of main() puts its tensors; the tests point it at the CPU, with CUDA's
# timing and memory calls stubbed, to run that branch end to end without a GPU.
CUDA_DEVICE = "cuda"


@dataclass
class Row:
    layer: str
    d_in: int
    d_out: int
    members: int
    rows: int
    dtype: str
    pass_: str
    impl: str
    ms: float
    tflops: float
    gbps: float
    speedup_vs_eager: float = float("nan")
    ratio_to_floor: float = float("nan")
    peak_mib: float = float("nan")


def flops(members: int, rows: int, d_in: int, d_out: int, pass_: str) -> float:
    """Matmul FLOPs: one GEMM forward, two more (dx, dW) backward; the scalings are negligible."""
    return 2.0 * members * rows * d_in * d_out * (1 if pass_ == "fwd" else 3)


def compulsory_bytes(members: int, rows: int, d_in: int, d_out: int, pass_: str, itemsize: int) -> float:
    """Bytes every implementation must move: inputs read and results written once."""
    x, y, w = members * rows * d_in, members * rows * d_out, d_in * d_out
    factors = members * (d_in + 2 * d_out)  # r, s, bias
    forward = x + w + factors + y
    backward = y + x + w + factors + x + w + factors  # read dy, x, W, factors; write dx, dW, dfactors
    return itemsize * (forward if pass_ == "fwd" else forward + backward)


def make_inputs(members: int, rows: int, d_in: int, d_out: int, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype).requires_grad_()

    x = randn(members, rows, d_in)
    weight = randn(d_out, d_in, scale=d_in ** -0.5)
    r, s = ((1 + 0.1 * randn(members, d)).detach().requires_grad_() for d in (d_out, d_in))
    bias = randn(members, d_out)
    return x, weight, r, s, bias


def implementations() -> dict:
    """Forward callables over (x, weight, r, s, bias); the floor ignores the scalings."""
    return {
        "fused": lambda x, w, r, s, b: rank1_linear(x, w, r, s, b, impl="triton"),
        "folded": rank1_linear_folded,
        "eager": rank1_linear_eager,
        "compiled": torch.compile(rank1_linear_eager, dynamic=False),  # compiles lazily, on first call
        "floor": lambda x, w, r, s, b: torch.matmul(x, w.t()),
    }


def correctness_check(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Largest error of the fused kernel (forward and all gradients) vs float64, relative to the max."""
    members, rows, d_in, d_out = 3, 37, 67, 45
    inputs = make_inputs(members, rows, d_in, d_out, dtype, device, seed=1)
    grad = torch.randn(members, rows, d_out, device=device).to(dtype)
    out = rank1_linear(*inputs, impl="triton")
    fused = (out, *torch.autograd.grad(out, inputs, grad))
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = rank1_linear_eager(*inputs64)
    reference = (out64, *torch.autograd.grad(out64, inputs64, grad.double()))
    return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(fused, reference))


def tolerance(dtype: torch.dtype) -> float:
    """Largest error correctness_check accepts. bfloat16 rounds the scaled operands and the results
    to 8 mantissa bits (the interpreter measures up to 8e-3); TF32 dots, when torch allows them, carry 10."""
    if dtype == torch.bfloat16:
        return 3e-2
    return 5e-3 if tf32_matmuls() else 1e-4


def _interpreted_correctness_check() -> float:
    """The CPU check must run with TRITON_INTERPRET=1 from before triton is imported: a subprocess."""
    if interpreting():
        return correctness_check("cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.bench", "--check-only"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"interpreted correctness check failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def _time_gpu(fn, leaves) -> tuple[float, float]:
    """Median ms via triton.testing.do_bench, and peak memory (MiB) of one call above the inputs."""
    import triton.testing

    ms = triton.testing.do_bench(fn, grad_to_none=leaves, return_mode="median")
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.grad = None
    return ms, peak


def _time_cpu(fn, leaves) -> tuple[float, float]:
    import torch.utils.benchmark as benchmark

    def call():
        fn()
        for t in leaves:
            t.grad = None

    measurement = benchmark.Timer(stmt="call()", globals={"call": call}).blocked_autorange(min_run_time=0.3)
    return measurement.median * 1e3, float("nan")


def run_grid(grid: dict, dtypes: list[str], device: str, impls: list[str],
             timer: Callable[[Callable[[], object], list[torch.Tensor]], tuple[float, float]],
             out: str | None = None, results: list[Row] | None = None) -> list[Row]:
    """Time every impl on every case with timer(fn, leaves) -> (median ms, peak MiB).

    With out, rewrites OUT.json and OUT.csv after every case: a run stopped by a time limit
    keeps the cases it finished. Rows are appended to `results` (a new list by default) a whole
    case at a time, once that case is on disk, so a caller interrupted mid-grid knows what was kept.
    """
    cases = [
        (layer, members, rows, dtype)
        for dtype in dtypes for layer in grid["layers"] for members in grid["members"] for rows in grid["rows"]
    ]
    results = [] if results is None else results
    # Closed on the way out, Ctrl-C included, so that the bar's line ends before an error line.
    with tqdm(cases, desc="rank1 bench", file=sys.stderr) as progress:
        for (name, d_in, d_out), members, rows, dtype in progress:
            timed: list[Row] = []  # this case's rows
            if "compiled" in impls:
                # A fresh compile per case: dynamo keeps at most accumulated_recompile_limit (256)
                # compiled variants of a function and past that silently runs it eager; the full
                # grid needs 288 (shapes x dtypes x grad modes).
                torch._dynamo.reset()
            callables = implementations()
            inputs = make_inputs(members, rows, d_in, d_out, DTYPES[dtype], device)
            grad = torch.randn(members, rows, d_out, device=device).to(DTYPES[dtype])
            for pass_ in PASSES:
                case_rows = {}
                for impl in impls:
                    forward = callables[impl]
                    if pass_ == "fwd":
                        def fn(forward=forward):
                            with torch.no_grad():
                                return forward(*inputs)
                    else:
                        def fn(forward=forward):
                            forward(*inputs).backward(grad)
                    ms, peak = timer(fn, list(inputs))
                    work = flops(members, rows, d_in, d_out, pass_)
                    traffic = compulsory_bytes(members, rows, d_in, d_out, pass_, DTYPES[dtype].itemsize)
                    case_rows[impl] = Row(name, d_in, d_out, members, rows, dtype, pass_, impl, ms,
                                          work / ms / 1e9, traffic / ms / 1e6, peak_mib=peak)
                for row in case_rows.values():
                    if "eager" in case_rows:
                        row.speedup_vs_eager = case_rows["eager"].ms / row.ms
                    if "floor" in case_rows:
                        row.ratio_to_floor = row.ms / case_rows["floor"].ms
                timed.extend(case_rows.values())
            del inputs, grad
            if out is not None:
                write_outputs(results + timed, out)
            results.extend(timed)
    return results


def _versus(target: float, value: float, at_most: bool = False) -> str:
    met = value <= target if at_most else value >= target
    return f" ({'meets' if met else 'MISSES'} target {'<=' if at_most else '>='} {target})"


def summary(results: list[Row]) -> list[str]:
    """Means over the grid for each dtype and pass; the bf16 fwd+bwd line is judged against issue 3's targets."""
    lines = []
    for dtype in sorted({r.dtype for r in results}):
        for pass_ in PASSES:
            rows = [r for r in results if r.dtype == dtype and r.pass_ == pass_]
            by_case = {}
            for r in rows:
                by_case.setdefault((r.layer, r.members, r.rows), {})[r.impl] = r
            fused = [c for c in by_case.values() if "fused" in c]
            if not fused:
                continue
            judged = (dtype, pass_) == TARGET_CASE
            parts = []
            if all("eager" in c for c in fused):
                mean = statistics.mean(c["eager"].ms / c["fused"].ms for c in fused)
                parts.append(f"speed-up over eager {mean:.2f}x" + (_versus(TARGET_OVER_EAGER, mean) if judged else ""))
            if all("compiled" in c for c in fused):
                mean = statistics.mean(c["compiled"].ms / c["fused"].ms for c in fused)
                parts.append(f"over torch.compile {mean:.2f}x" + (_versus(TARGET_OVER_COMPILED, mean) if judged else ""))
            bound = [c for (_, _, m), c in by_case.items() if m >= COMPUTE_BOUND_ROWS and "fused" in c and "floor" in c]
            if bound:
                mean = statistics.mean(c["fused"].ms / c["floor"].ms for c in bound)
                parts.append(f"ratio to floor (M >= {COMPUTE_BOUND_ROWS}) {mean:.2f}"
                             + (_versus(TARGET_FLOOR_RATIO, mean, at_most=True) if judged else ""))
            if all("folded" in c for c in fused):
                mean = statistics.mean(c["folded"].ms / c["fused"].ms for c in fused)
                parts.append(f"over folded {mean:.2f}x")
            if all("eager" in c for c in fused) and not any(c["fused"].peak_mib != c["fused"].peak_mib for c in fused):
                worse = sum(c["fused"].peak_mib > c["eager"].peak_mib for c in fused)
                parts.append(f"peak memory above eager in {worse}/{len(fused)} shapes"
                             + (_versus(0, worse, at_most=True) if judged else ""))
            lines.append(f"{dtype} {pass_}: " + ", ".join(parts))
    return lines


def format_table(results: list[Row]) -> str:
    header = (f"{'layer':15} {'K':>3} {'M':>6} {'dtype':5} {'pass':8} {'impl':9} {'ms':>9} {'TFLOP/s':>8} "
              f"{'GB/s':>8} {'vs eager':>8} {'/ floor':>8} {'peak MiB':>9}")
    lines = [header, "-" * len(header)]

    def number(value: float, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value != value else f"{value:{width}.{digits}f}"  # NaN: not measured

    for r in results:
        lines.append(f"{r.layer:15} {r.members:3d} {r.rows:6d} {r.dtype:5} {r.pass_:8} {r.impl:9} {r.ms:9.3f} "
                     f"{r.tflops:8.2f} {r.gbps:8.1f} {number(r.speedup_vs_eager, 8, 2)} "
                     f"{number(r.ratio_to_floor, 8, 2)} {number(r.peak_mib, 9, 1)}")
    return "\n".join(lines)


def output_paths(prefix: str) -> list[str]:
    return [f"{prefix}.{ext}" for ext in ("json", "csv")]


def write_outputs(results: list[Row], prefix: str) -> None:
    """Atomically write PREFIX.json and PREFIX.csv, creating PREFIX's directory; OutputError if the
    system refuses (main() checked the paths up front, but a disk can fill up during a long run)."""
    records = [{("pass" if k == "pass_" else k): v for k, v in asdict(r).items()} for r in results]
    paths = output_paths(prefix)
    tmps = [f"{path}.tmp-{os.getpid()}" for path in paths]
    path = paths[0]  # the one named if creating the directory fails
    try:
        os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
        for path, tmp in zip(paths, tmps):
            with open(tmp, "w", newline="") as f:
                if path.endswith(".json"):
                    json.dump(records, f, indent=1)
                else:
                    writer = csv.DictWriter(f, fieldnames=list(records[0]))
                    writer.writeheader()
                    writer.writerows(records)
        for path, tmp in zip(paths, tmps):  # both whole before either is replaced: the two files agree
            os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e, "--out") from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):  # the write failed: leave no partial file
                os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="Time the fused rank-1 linear kernel against eager PyTorch, the folded form (each member's "
                    "weight built, one batched matmul), torch.compile and a plain matmul; without CUDA, the eager "
                    "and folded forms only, with the kernel checked in Triton's interpreter.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run: layers lstm-500 and tf512-mlp-in; K=4 at M 1024 and 4096 rows per "
                             "member on CUDA, K 1 and 4 at M 256 on the CPU")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"],
                        help="dtypes to time (default: bf16 fp32)")
    parser.add_argument("--layers", nargs="+", choices=[name for name, _, _ in LAYERS], metavar="LAYER",
                        help="time only these layers, to split a long run into parts (default: all of the grid's; "
                             f"choices: {' '.join(name for name, _, _ in LAYERS)})")
    parser.add_argument("--members", nargs="+", type=positive_int, metavar="K",
                        help=f"time only these K (default: {' '.join(map(str, MEMBERS))})")
    parser.add_argument("--rows", nargs="+", type=positive_int, metavar="M",
                        help=f"time only these rows per member (default: {' '.join(map(str, ROWS))})")
    parser.add_argument("--out", default="rank1_bench",
                        help="output prefix: writes OUT.json and OUT.csv (default: %(default)s)")
    parser.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.check_only:
        print(f"{correctness_check('cuda' if torch.cuda.is_available() else 'cpu'):.3e}")
        return 0
    results: list[Row] = []  # filled by run_grid one case at a time: what is on disk when interrupted
    try:
        return _run(args, results)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        cases = len({(r.layer, r.members, r.rows, r.dtype) for r in results})
        if cases:
            print(f"error: interrupted; {' and '.join(output_paths(args.out))} keep the {cases} case(s) timed "
                  "before it", file=sys.stderr)
        else:
            print("error: interrupted before the first case was timed; nothing was written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, results: list[Row]) -> int:
    """main() past argument parsing: check, time the grid into `results`, report."""
    cuda = torch.cuda.is_available()
    if cuda and not TRITON_INSTALLED:
        print("error: Triton is not installed, so there is no fused kernel to time (Triton ships for Linux: "
              "pip install triton)", file=sys.stderr)
        return 2
    for path in output_paths(args.out):  # before the correctness checks and the timing, not after
        check_writable(path, "--out", make_parent=True)
    if cuda:
        import triton

        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
        errors = {name: correctness_check(CUDA_DEVICE, DTYPES[name]) for name in args.dtype}
        print("correctness: fused vs float64 reference, max relative error "
              + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
    elif not TRITON_INSTALLED:
        print("No CUDA device and no Triton: timing only the eager reference and the folded form on the CPU.")
        errors = {}
    else:
        print("No CUDA device: timing only the eager reference and the folded form on the CPU; the fused kernel "
              "is checked for correctness in Triton's interpreter.")
        errors = {"fp32": _interpreted_correctness_check()}
        print(f"correctness: interpreted fused kernel vs float64 reference, max relative error {errors['fp32']:.2e}")
    for name, error in errors.items():
        if error > tolerance(DTYPES[name]):
            print(f"error: fused kernel disagrees with the reference in {name} (relative error {error:.2e} > "
                  f"{tolerance(DTYPES[name]):.0e}); not timing it", file=sys.stderr)
            return 1
    grid = (QUICK if cuda else CPU_QUICK) if args.quick else {"layers": LAYERS, "members": MEMBERS, "rows": ROWS}
    if args.layers:
        grid = {**grid, "layers": [layer for layer in LAYERS if layer[0] in args.layers]}
    if args.members:
        grid = {**grid, "members": args.members}
    if args.rows:
        grid = {**grid, "rows": args.rows}
    if cuda:
        run_grid(grid, args.dtype, CUDA_DEVICE, ["fused", "folded", "eager", "compiled", "floor"],
                 _time_gpu, args.out, results)
    else:
        run_grid(grid, args.dtype, "cpu", ["eager", "folded"], _time_cpu, args.out, results)
    print(format_table(results))
    for line in summary(results):
        print(line)
    print(f"wrote {', '.join(output_paths(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
