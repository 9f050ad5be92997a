"""Compile, for CUDA targets and without a GPU, every kernel launch the triton backend makes, with
the signature and specialisation Triton's own launcher derives from the real arguments
(``create_function_from_signature`` and ``JITFunction._pack_args``, as ``JITFunction.run`` calls
them), and once more as torch.compile's Inductor would specialise it (every integer argument equal
to 1 a constant): ``python tests/triton_aot.py [--shards N] 80 90`` (N processes side by side).
The launches are recorded by running the backend's
op functions on CPU tensors with ``wrap_triton`` replaced by a recorder, over shapes that
include 1x1, 1xW, Hx1, odd sizes, strided and channels_last inputs, every dtype and mode, and
6 and 17 channels (the forward's blocks of 8 and 16 channels, full and partial).

Each compiled kernel is then read: launched without FMA contraction (and no ``fma.rn`` in the
kernels without exp, whose library code has FMAs of its own), no instruction that flushes
subnormals (``.ftz``) outside the atomics, no 32-bit product in the TTIR
(sizes are widened to 64 bits), no ordering (``acq_rel``, ``fence``, ``membar``) around the
forward's and the scatter-max's atomics, on sm_90 every float32 add of the forward a vector
one of four lanes, no local memory (``.local`` in the PTX, STACK or LOCAL in
the SASS's resource usage: spills). Exits non-zero, naming the kernel, on any failure. Run by
tests/test_triton.py in a subprocess, since TRITON_INTERPRET must not be set here."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

LAUNCHES: list[tuple] = []


class Recorder:
    """Stands in for ``torch.library.wrap_triton``: records each launch instead of running it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: LAUNCHES.append((self.kernel, args, kwargs))


def record() -> None:
    """Every launch of the backend's ops over the cases."""
    torch.library.wrap_triton = Recorder
    from softsplat.backends import triton as backend

    generator = torch.Generator().manual_seed(0)
    # C = 6: the forward's block of 8 channels; C = 17: its full block of 16 and a partial one
    shapes = [(1, 1, 1, 1), (1, 3, 1, 7), (2, 2, 5, 1), (2, 4, 9, 16), (1, 6, 3, 5), (1, 17, 3, 5)]
    layouts = ["contiguous", "channels_last", "strided"]
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for (N, C, H, W), layout, dtype in itertools.product(shapes, layouts, dtypes):
        if layout != "contiguous" and dtype != torch.float32:
            continue  # every layout in float32; the other dtypes contiguous
        if C > 4 and layout != "contiguous":
            continue  # the channel blocks' sizes in every dtype, contiguous
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        input = torch.randn(N, C, H, W, generator=generator).to(dtype)
        if layout == "channels_last":
            input = input.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            input = torch.randn(N, C, H, 2 * W, generator=generator).to(dtype)[..., ::2]
        flow = torch.randn(N, 2, H, W, generator=generator).to(acc)
        metric = torch.randn(N, 1, H, W, generator=generator).to(acc)
        maxima = {4: backend.splat_maximum(flow, metric), 5: backend.splat_maximum(flow, metric, 5)}
        for kind, normalisation in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 0), (3, 3), (4, 0), (5, 0), (5, 3)]:
            m = metric if kind >= 2 else None
            maximum = maxima.get(kind)
            out, normaliser = backend.splat_forward(input, flow, m, kind, normalisation, maximum)
            if dtype in (torch.float16, torch.bfloat16):  # the result written in its own dtype too
                backend.splat_forward(input, flow, m, kind, normalisation, maximum, cast=True)
            grad = torch.randn(N, C, H, W, generator=generator).to(acc)
            # Every output mask and a normaliser's gradient for soft; the full gradient otherwise.
            masks = ([True, True, True], [True, False, False], [False, True, True]) if kind == 3 else ([True, True, True],)
            for mask in masks:
                for grad_normaliser in (None, torch.randn(N, 1, H, W, generator=generator).to(acc)) if kind == 3 else (None,):
                    backend.splat_backward(grad, grad_normaliser, input, flow, m, out, normaliser, kind, normalisation,
                                           mask, maximum)


def constexprs_of(fn, constexprs) -> dict:
    """The constexpr arguments by name (``_pack_args`` keys them by position)."""
    names = [p.name for p in fn.params]
    return {names[path[0]]: value for path, value in constexprs.items()}


def jobs_for(architectures) -> list[tuple]:
    """Every distinct compile the launches ask for: (architecture, launcher, kernel, signature,
    constexprs, attrs, options, the launcher's specialisation), in a fixed order, so that each
    shard takes the same list."""
    jobs, seen = [], set()
    for architecture in architectures:
        target = GPUTarget("cuda", int(architecture), 32)
        backend = make_backend(target)
        for kernel, args, kwargs in LAUNCHES:
            fn = kernel  # the JITFunction
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            key = (architecture, fn.__name__, str(specialization), str(options))
            if key in seen:
                continue
            seen.add(key)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
            jobs.append((architecture, "triton", fn, signature, constexprs, attrs, options, specialization))
            inductor_signature, inductor_constexprs, inductor_attrs = as_inductor_specialises(
                fn, bound_args, signature, constexprs, attrs)
            if inductor_constexprs == constexprs:
                continue  # no integer argument is 1: Inductor compiles what the launcher does
            signature, constexprs, attrs = inductor_signature, inductor_constexprs, inductor_attrs
            key = (architecture, fn.__name__, "inductor", str(signature))
            if key not in seen:
                seen.add(key)
                jobs.append((architecture, "inductor", fn, signature, constexprs, attrs, options, specialization))
    return jobs


def compile_all(architectures, shard: int = 0, shards: int = 1) -> list[str]:
    """Compile and read every job of ``jobs_for`` whose index is ``shard`` modulo ``shards``."""
    problems, compiled = [], 0
    for architecture, launcher, fn, signature, constexprs, attrs, options, specialization in jobs_for(architectures)[shard::shards]:
        target = GPUTarget("cuda", int(architecture), 32)
        source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
        try:
            binary = triton.compile(source, target=target, options=options.__dict__)
        except Exception as error:  # a launch the launcher would make and that does not compile
            problems.append(f"{fn.__name__} sm_{architecture} ({launcher}) {signature} {constexprs}: "
                            f"{type(error).__name__}: {error}")
            continue
        compiled += 1
        problems += read(binary, f"{fn.__name__} sm_{architecture} {launcher} {specialization}", fn.__name__,
                         constexprs_of(fn, constexprs).get("KIND"), options.enable_fp_fusion)
    print(f"compiled {compiled} kernel specialisations from {len(LAUNCHES)} launches for sm_{', sm_'.join(architectures)}")
    return problems


def as_inductor_specialises(fn, bound_args, signature, constexprs, attrs):
    """The launch as torch.compile's Inductor compiles a user-defined Triton kernel
    (``define_user_defined_triton_kernel``): every integer argument equal to 1, sizes and strides
    alike and whatever ``do_not_specialize`` says, becomes a constexpr."""
    signature, constexprs, attrs = dict(signature), dict(constexprs), dict(attrs)
    for index, (name, value) in enumerate(zip(signature, bound_args.values())):
        if signature[name] != "constexpr" and isinstance(value, int) and not isinstance(value, bool) and value == 1:
            signature[name] = "constexpr"
            constexprs[(index,)] = 1
            attrs.pop((index,), None)
    return signature, constexprs, attrs


def read(binary, name: str, kernel: str, kind: int | None, fp_fusion: bool) -> list[str]:
    """What is wrong with one compiled kernel of the function named ``kernel`` (its KIND, if it
    has one; launched with ``fp_fusion``): see the module's docstring."""
    problems = []
    ptx = binary.asm["ptx"]
    if fp_fusion is not False:
        problems.append(f"{name}: launched with FMA contraction allowed")
    # Kernels without exp: no FMA at all (exp's own library code has FMAs of its own). The
    # scatter-max's KIND (4 or 5) only chooses which taps count.
    if (kind not in (3, 4) or kernel == "_splat_max_kernel") and "fma.rn" in ptx:
        problems.append(f"{name}: an FMA in the PTX (contraction must be off)")
    # No flushing of subnormals outside the atomics (docs/spec.md, floating point): a floor that
    # flushes puts a pixel with a negative subnormal flow in the other cell.
    flushing = [line.strip() for line in ptx.splitlines() if ".ftz" in line and not line.lstrip().startswith(("atom", "red"))]
    if flushing:
        problems.append(f"{name}: an instruction that flushes subnormals: {flushing[0]}")
    if ".local" in ptx:
        problems.append(f"{name}: local memory in the PTX (a spill)")
    spilled = local_memory(binary.asm["cubin"])
    if spilled:
        problems.append(f"{name}: {spilled}")
    # Sizes and indices are 64-bit: no product is formed in 32 bits (docs/spec.md, sizes).
    narrow = [line.strip() for line in binary.asm["ttir"].splitlines() if "arith.muli" in line and ": i32" in line]
    if narrow:
        problems.append(f"{name}: a 32-bit product in the TTIR: {narrow[0]}")
    if kernel in ("_splat_fwd_kernel", "_splat_max_kernel"):
        for ordering in ("acq_rel", "fence.", "membar"):
            if ordering in ptx:
                problems.append(f"{name}: {ordering} around the atomics (they must be relaxed)")
    # sm_90 adds a quad of float32 lanes in one vector atomic (docs/performance.md): the
    # forward's float32 adds are all .v4.f32, none scalar.
    target = binary.metadata.target
    arch = target.arch if hasattr(target, "arch") else target[1]
    if kernel == "_splat_fwd_kernel" and int(arch) >= 90:
        adds = set(re.findall(r"\b(?:red|atom)\.global\.[\w.]*?add\.((?:v\d+\.)?f32)\b", ptx))
        if adds - {"v4.f32"}:
            problems.append(f"{name}: float32 atomic adds {sorted(adds)}, expected v4.f32 only")
    return problems


def local_memory(cubin: bytes) -> str | None:
    """What the SASS of ``cubin`` spills to local memory (cuobjdump's resource usage: STACK, the
    thread's stack frame where ptxas puts spilled registers, and LOCAL, bytes per thread), or
    None."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True).stdout
    if "LOCAL:" not in usage:
        return f"no resource usage read from the cubin: {usage[:200]!r}"
    spills = [line.strip() for line in usage.splitlines() if "LOCAL:" in line and ("LOCAL:0 " not in line or "STACK:0 " not in line)]
    return f"local memory in the SASS (a spill): {spills[0]}" if spills else None


def main(arguments) -> int:
    """``triton_aot.py [--shards N] ARCH...``: with N > 1, N processes of this script compile a
    share each (``--shard I/N``), side by side."""
    parser = argparse.ArgumentParser(description="Compile and check every Triton launch for CUDA targets.")
    parser.add_argument("architectures", nargs="*", default=["80", "90"], help="compute capabilities (80 90)")
    parser.add_argument("--shards", type=int, default=1, help="processes that compile a share each")
    parser.add_argument("--shard", help="I/N: compile share I of N here (what --shards starts)")
    args = parser.parse_args(arguments)
    if args.shard is None and args.shards > 1:
        workers = [subprocess.Popen([sys.executable, __file__, "--shard", f"{i}/{args.shards}", *args.architectures])
                   for i in range(args.shards)]
        return max(worker.wait() for worker in workers)
    shard, shards = (int(part) for part in args.shard.split("/")) if args.shard else (0, 1)
    record()
    problems = compile_all(args.architectures, shard, shards)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
