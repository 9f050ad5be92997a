"""Compile every Triton kernel of the triton backend ahead of time for CUDA targets (no GPU
needed): ``python tests/triton_aot.py 80 90``. Exits non-zero on any compile error. Run by
tests/test_triton.py in a subprocess, since TRITON_INTERPRET must not be set here."""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget

from softsplat.backends import triton_kernels as k

POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def compute(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def specialisations():
    """(kernel, signature, constexprs) for every input dtype, kind and normalisation."""
    for dtype in POINTER:
        acc = compute(dtype)
        acc_ptr, acc_tl = POINTER[acc], getattr(k.tl, acc)
        for kind in (k.SUM, k.AVG, k.LINEAR, k.SOFT, k.STABLE):
            yield k._splat_fwd_kernel, {
                "input_ptr": POINTER[dtype], "sin_n": "i64", "sin_c": "i64", "sin_y": "i64", "sin_x": "i64",
                "flow_ptr": acc_ptr, "sfn": "i64", "sfc": "i64", "sfy": "i64", "sfx": "i64",
                "metric_ptr": acc_ptr, "smn": "i64", "smy": "i64", "smx": "i64", "max_ptr": acc_ptr,
                "out_ptr": acc_ptr, "norm_ptr": acc_ptr, "N": "i64", "C": "i64", "H": "i64", "W": "i64",
                "KIND": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr",
            }, {"KIND": kind, "ACC": acc_tl, "BLOCK": 256}
            for want in itertools.product((False, True), repeat=3):
                yield k._splat_bwd_kernel, {
                    "input_ptr": POINTER[dtype], "sin_n": "i64", "sin_c": "i64", "sin_y": "i64", "sin_x": "i64",
                    "flow_ptr": acc_ptr, "sfn": "i64", "sfc": "i64", "sfy": "i64", "sfx": "i64",
                    "metric_ptr": acc_ptr, "smn": "i64", "smy": "i64", "smx": "i64", "g_ptr": acc_ptr,
                    "max_ptr": acc_ptr,
                    "grad_input_ptr": POINTER[dtype] if want[0] else acc_ptr,
                    "grad_flow_ptr": acc_ptr, "grad_metric_ptr": acc_ptr,
                    "N": "i64", "C": "i64", "H": "i64", "W": "i64",
                    "KIND": "constexpr", "WANT_INPUT": "constexpr", "WANT_FLOW": "constexpr",
                    "WANT_METRIC": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr",
                }, {"KIND": kind, "WANT_INPUT": want[0], "WANT_FLOW": want[1], "WANT_METRIC": want[2] and kind >= 2,
                    "ACC": acc_tl, "BLOCK": 256}
        if dtype == acc:  # the scatter-max works in the compute dtype only
            yield k._splat_max_kernel, {
                "flow_ptr": acc_ptr, "sfn": "i64", "sfc": "i64", "sfy": "i64", "sfx": "i64",
                "metric_ptr": acc_ptr, "smn": "i64", "smy": "i64", "smx": "i64", "max_ptr": acc_ptr,
                "N": "i64", "H": "i64", "W": "i64", "ACC": "constexpr", "BLOCK": "constexpr",
            }, {"ACC": acc_tl, "BLOCK": 256}
        for norm in (k.ADDEPS, k.ZEROEPS, k.CLIPEPS, k.RAW):
            if dtype != acc:
                continue  # normalise and prepare work in the compute dtype only
            yield k._splat_normalise_kernel, {
                "out_ptr": acc_ptr, "norm_ptr": acc_ptr, "N": "i64", "C": "i64", "H": "i64", "W": "i64",
                "NORM": "constexpr", "BLOCK": "constexpr",
            }, {"NORM": norm, "BLOCK": 256}
            for kind, has_gnorm in ((k.SUM, False), (k.SOFT, False), (k.SOFT, True)):
                yield k._splat_bwd_prepare_kernel, {
                    "grad_ptr": acc_ptr, "sgn": "i64", "sgc": "i64", "sgy": "i64", "sgx": "i64",
                    "out_ptr": acc_ptr, "norm_ptr": acc_ptr, "gnorm_ptr": acc_ptr, "sdn": "i64", "sdy": "i64",
                    "sdx": "i64", "g_ptr": acc_ptr, "N": "i64", "C": "i64", "H": "i64", "W": "i64",
                    "KIND": "constexpr", "NORM": "constexpr", "HAS_GNORM": "constexpr", "ACC": "constexpr",
                    "BLOCK": "constexpr",
                }, {"KIND": kind, "NORM": norm, "HAS_GNORM": has_gnorm, "ACC": acc_tl, "BLOCK": 256}


def main(architectures) -> int:
    compiled = set()
    for architecture in architectures:
        target = GPUTarget("cuda", int(architecture), 32)
        for kernel, signature, constexprs in specialisations():
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            key = (architecture, kernel.__name__, tuple(sorted(signature.items())), tuple(sorted((n, str(v)) for n, v in constexprs.items())))
            if key in compiled:
                continue
            binary = triton.compile(source, target=target)
            assert binary.asm.get("cubin"), f"{kernel.__name__}: no cubin for sm_{architecture}"
            compiled.add(key)
    print(f"compiled {len(compiled)} kernel specialisations for sm_{', sm_'.join(architectures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["80", "90"]))
