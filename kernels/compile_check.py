"""Ahead-of-time GPU compile check of every kernel (rank-1 linear, LSTM step) with every autotune config.

The CPU interpreter accepts kernels that the GPU compiler rejects (for instance a tl.dot
with a block dimension under 16), so this compiles each kernel, for each config the
autotuner may pick, for float32 and bfloat16, to a cubin for the H100 (sm_90) and the A100
(sm_80). No GPU is needed: `triton.compile` with an explicit `GPUTarget`. It also checks
that the bf16 forward on sm_90 uses Hopper's wgmma instructions, that every matmul main loop
is software-pipelined (cp.async copies in the PTX), also for sizes that are multiples of 4
only, and reports the shared memory each config needs (configs above a device's limit are
skipped by the autotuner at run time, so at least one config per kernel must fit).

    python -m kernels.compile_check [--arch 90 80] [--jobs N] [--json FILE]

Must run WITHOUT TRITON_INTERPRET (then `triton.jit` builds interpreter functions); the
test suite runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from kernels.cli import OutputError, cannot_write, check_writable, positive_int
from kernels.optional_triton import TRITON_INSTALLED

# Shared memory per block (opt-in maximum) of each architecture, in bytes.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
DTYPES = ("fp32", "bf16")
# The launch-time flags every kernel is compiled with (the slower branch where there is one),
# and their other values, compiled for each kernel's first config in float32: no bias, IEEE
# dots, evaluation windows that save nothing, the backward's last step (no recurrent product,
# so no main loop to pipeline).
FLAGS = {
    "main": {"HAS_BIAS": True, "DOT_PRECISION": "tf32", "UPCAST": False, "SAVE": True, "RECURRENT": True},
    "other": {"HAS_BIAS": False, "DOT_PRECISION": "ieee", "UPCAST": False, "SAVE": False, "RECURRENT": False},
}
# float32 buffers whatever the input dtype: the dW kernel's atomic accumulators, the LSTM
# cell state and saved gate activations.
FLOAT32_POINTERS = {"dw_ptr", "dr_ptr", "ds_ptr", "c_prev_ptr", "c_ptr", "act_ptr", "dc_ptr", "dc_prev_ptr"}
# Kernels with a main loop over tiles, which must be software-pipelined (all of them).
MATMUL_KERNELS = {"forward", "dx", "dw", "step_fwd", "step_bwd"}
# The launches being mirrored: contiguous tensors. The JIT turns an int argument equal to 1
# into a constant (the innermost strides) and marks 16-aligned pointers and ints divisible by
# 16. Layout "aligned16": every size a multiple of 16 (d_model 512, 4H = 2000): all configs,
# both dtypes. Layout "aligned4": sizes and strides multiples of 4 only (the LSTM's
# d_in = 500), where the kernels' own ALIGN hints must keep the main loop pipelined: the
# first config of each kernel, bf16.
UNIT_STRIDES = {
    "stride_xd", "stride_wd", "stride_rn", "stride_sd", "stride_bn", "stride_yn", "stride_dyn", "stride_dxd",
}
DIVISIBLE_INTS = {"M", "N", "D", "H"}
LAYOUT_ALIGN = {"aligned16": 16, "aligned4": 4}


@dataclass
class CompileResult:
    kernel: str
    config: str
    dtype: str
    arch: int
    layout: str
    flags: str
    ok: bool
    shared_bytes: int = 0
    fits: bool = False
    wgmma: bool = False
    pipelined: bool = False  # the main loop's loads use cp.async (asynchronous global-to-shared copies)
    error: str = ""


def _kernels() -> dict:
    from kernels import lstm, rank1

    return {
        "forward": (rank1._rank1_fwd_kernel, rank1.FORWARD_CONFIGS),
        "dx": (rank1._rank1_dx_kernel, rank1.DX_CONFIGS),
        "dw": (rank1._rank1_dw_kernel, rank1.DW_CONFIGS),
        "step_fwd": (lstm._lstm_step_fwd_kernel, lstm.STEP_FWD_CONFIGS),
        "step_bwd": (lstm._lstm_step_bwd_kernel, lstm.STEP_BWD_CONFIGS),
    }


def _describe(config) -> str:
    blocks = "-".join(f"{name.removeprefix('BLOCK_')}{value}" for name, value in config.kwargs.items()
                      if name.startswith("BLOCK_"))
    return f"{blocks}-w{config.num_warps}-s{config.num_stages}"


def _source(fn, config, dtype: str, layout: str, flags: str):
    """ASTSource of one kernel specialised as a contiguous launch would specialise it."""
    from triton.compiler import ASTSource

    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    values = {**FLAGS[flags], "ALIGN": LAYOUT_ALIGN[layout], **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if layout == "aligned16" and (name.startswith("stride_") or name in DIVISIBLE_INTS):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_one(kernel: str, config_index: int, dtype: str, arch: int, layout: str,
                flags: str = "main") -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget

    fn, configs = _kernels()[kernel]
    fn = fn.fn  # the JITFunction under the autotuner
    config = configs[config_index]
    result = CompileResult(kernel, _describe(config), dtype, arch, layout, flags, ok=False)
    try:
        compiled = triton.compile(
            _source(fn, config, dtype, layout, flags),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as exc:  # the compiler raises many types; all of them mean "rejected"
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    result.ok = True
    result.shared_bytes = int(compiled.metadata.shared)
    result.fits = result.shared_bytes <= SHARED_MEMORY_LIMIT[arch]
    result.wgmma = "wgmma" in compiled.asm["ptx"]
    result.pipelined = "cp.async" in compiled.asm["ptx"]
    return result


def run_checks(archs: list[int], jobs: int) -> list[CompileResult]:
    kernels = _kernels()
    tasks = [
        (kernel, i, dtype, arch, "aligned16", "main")
        for kernel, (_, configs) in kernels.items()
        for i in range(len(configs))
        for dtype in DTYPES
        for arch in archs
    ] + [(kernel, 0, "bf16", arch, "aligned4", "main") for kernel in kernels for arch in archs]
    tasks += [(kernel, 0, "fp32", arch, "aligned16", "other") for kernel in kernels for arch in archs]
    if jobs <= 1:
        return [compile_one(*task) for task in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, *zip(*tasks)))


def problems(results: list[CompileResult], archs: list[int]) -> list[str]:
    """What would break or be slow on a GPU: rejected configs, kernels with no config that fits,
    matmul main loops left unpipelined, a bf16 forward without wgmma on sm_90."""
    found = [f"{r.kernel} {r.config} {r.dtype} sm_{r.arch} {r.layout} {r.flags} flags: {r.error}"
             for r in results if not r.ok]
    found += [f"{r.kernel} {r.config} {r.dtype} sm_{r.arch} {r.layout}: main loop not pipelined (no cp.async)"
              for r in results if r.ok and r.kernel in MATMUL_KERNELS and r.flags == "main" and not r.pipelined]
    groups = {(r.kernel, r.dtype, r.arch) for r in results}
    for kernel, dtype, arch in sorted(groups):
        if not any(r.fits for r in results if (r.kernel, r.dtype, r.arch) == (kernel, dtype, arch)):
            found.append(f"{kernel} {dtype} sm_{arch}: no config fits in shared memory")
    if 90 in archs and not any(r.wgmma for r in results if (r.kernel, r.dtype, r.arch) == ("forward", "bf16", 90)):
        found.append("forward bf16 sm_90: no config uses wgmma")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.compile_check",
        description="Compile every kernel and autotune config for sm_90 and sm_80 (no GPU needed).",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT),
                        help="CUDA compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                        help="parallel compiler processes (default: the CPU count, %(default)s)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not TRITON_INSTALLED:
        print("error: Triton is not installed, so there is no compiler to check the kernels with (Triton ships "
              "for Linux: pip install triton)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET; the interpreter replaces the GPU compiler", file=sys.stderr)
        return 2
    if args.json:
        try:  # now, not after minutes of compiling
            check_writable(args.json, "--json")
        except OutputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    try:
        results = run_checks(args.arch, args.jobs)
    except KeyboardInterrupt:
        print("error: interrupted while compiling; nothing was written", file=sys.stderr)
        return 130
    print(f"{'kernel':8} {'config':24} {'dtype':5} {'arch':6} {'layout':9} {'flags':5} {'result':8} {'smem KiB':>8} "
          f"{'fits':5} {'wgmma':5} cp.async")
    for r in results:
        print(f"{r.kernel:8} {r.config:24} {r.dtype:5} sm_{r.arch:<3} {r.layout:9} {r.flags:5} {'ok' if r.ok else 'FAILED':8} "
              f"{r.shared_bytes / 1024:8.1f} {'yes' if r.fits else 'no':5} {'yes' if r.wgmma else 'no':5} "
              f"{'yes' if r.pipelined else 'no'}"
              + (f"  {r.error}" if r.error else ""))
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=1)
            os.replace(tmp, args.json)
        except OSError as e:  # checked up front, but the disk may have filled or the directory gone since
            print(f"error: {cannot_write(args.json, e, '--json')}", file=sys.stderr)
            return 2
        finally:
            if os.path.exists(tmp):  # the write failed: leave no partial file
                os.unlink(tmp)
    found = problems(results, args.arch)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    print(f"{sum(r.ok for r in results)}/{len(results)} compiled; {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
