"""Compile every launched Triton kernel of alignkit.kernels for sm_90, ahead of time, without a GPU.

Run by tests/test_kernels_compile.py in a subprocess (the test process runs the kernels under the
Triton interpreter, whose kernel objects cannot be compiled). Each variant mirrors what a host
launcher passes on CUDA: argument dtypes (bool masks arrive as uint8), constexpr flags, tile sizes,
autotune configs, and Triton's runtime specialisation (an int argument equal to 1 becomes the
constant 1; pointers and ints divisible by 16 carry ``tt.divisibility``). Prints one line per
variant with the registers per thread and spills of its sm_90 binary; exits 1 listing every failure.

Resources: ``CompiledKernel.n_regs`` / ``n_spills`` are filled only when the binary is loaded onto a
GPU (``driver.load_binary``: ``CU_FUNC_ATTRIBUTE_NUM_REGS`` and ``LOCAL_SIZE_BYTES / 4``); without
one they stay None. The cubin itself is produced here (Triton runs ptxas, shipped in its wheel), so
the same two numbers are read from it with ``cuobjdump --dump-resource-usage`` (also in the wheel):
``n_regs = REG``, ``n_spills = STACK / 4`` (the per-thread stack frame, which in Triton kernels holds
only register spills; Triton's own definition of n_spills). A variant that spills fails.
``python tests/compile_kernels_sm90.py [--jobs N] [FILTER]``
compiles the variants whose name contains FILTER.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before triton (and alignkit.kernels) is imported

import argparse
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from alignkit import loss_layout as L
from alignkit.kernels import fused_logprobs, gae, logprobs, ppo_loss, sampling

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232_448  # shared memory per block on sm_90: a kernel needing more compiles but fails to launch
MODULES = (gae, logprobs, fused_logprobs, ppo_loss, sampling)
F32, F64 = tl.float32, tl.float64


@dataclass(frozen=True)
class Const:
    """A constexpr argument, or an int the runtime specialises to a constant (the value 1)."""

    value: object


@dataclass
class Variant:
    """One compilation: ``args`` maps every kernel parameter to a signature type or a Const."""

    kernel: JITFunction
    label: str
    args: dict[str, str | Const]
    aligned: tuple[str, ...] = ()  # int parameters divisible by 16 (pointers always are)
    options: dict[str, int] = field(default_factory=dict)  # num_warps / num_stages of a config

    @property
    def name(self) -> str:
        return f"{self.kernel.__name__}[{self.label}]"


@dataclass(frozen=True)
class Result:
    """What compiling one variant gave: an error, or the resources of its sm_90 binary."""

    name: str
    error: str | None
    seconds: float
    n_regs: int | None = None  # registers per thread
    n_spills: int | None = None  # 4-byte words of stack per thread (Triton's n_spills)
    shared: int | None = None  # bytes of shared memory per block


def compile_variant(variant: Variant) -> Result:
    fn = variant.kernel
    start = time.perf_counter()
    resources: dict[str, int] = {}
    try:
        if list(variant.args) != fn.arg_names:
            raise TypeError(f"arguments {list(variant.args)} do not match the kernel's {fn.arg_names}")
        signature = {k: "constexpr" if isinstance(v, Const) else v for k, v in variant.args.items()}
        constexprs = {k: v.value for k, v in variant.args.items() if isinstance(v, Const)}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, (k, v) in enumerate(variant.args.items())
            if isinstance(v, str) and (v.startswith("*") or k in variant.aligned)
        }
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
            compiled = triton.compile(src, target=TARGET, options=variant.options)
        resources = binary_resources(compiled.asm["cubin"], compiled.metadata.name)
        resources["shared"] = compiled.metadata.shared
        if compiled.metadata.shared > SMEM_LIMIT:
            raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory (> {SMEM_LIMIT})")
        if resources["n_spills"] > 0:
            regs, spills = resources["n_regs"], resources["n_spills"]
            raise RuntimeError(
                f"spills registers: {regs} registers and {4 * spills} bytes of stack per thread "
                f"(n_spills={spills}); drop or shrink this config"
            )
    except Exception as exc:
        return Result(variant.name, _describe(exc), time.perf_counter() - start, **resources)
    return Result(variant.name, None, time.perf_counter() - start, **resources)


_RESOURCE_LINE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)")


def _cuobjdump() -> str:
    tool = getattr(getattr(triton, "knobs", None), "nvidia", None)
    tool = getattr(tool, "cuobjdump", None) if tool is not None else None
    if tool is None:  # pragma: no cover - every supported triton ships it (3.6 and later)
        raise RuntimeError("cuobjdump not found: triton.knobs.nvidia.cuobjdump is missing")
    return tool.path


def binary_resources(cubin: bytes, kernel_name: str) -> dict[str, int]:
    """``n_regs`` and ``n_spills`` of ``kernel_name`` in an sm_90 cubin (see the module docstring)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    for name, regs, stack in _RESOURCE_LINE.findall(out):
        if name == kernel_name:
            return {"n_regs": int(regs), "n_spills": int(stack) // 4}
    raise RuntimeError(f"no resource usage for {kernel_name} in cuobjdump's output: {out[:500]!r}")


def _describe(exc: BaseException) -> str:
    # One line: a CompilationError quotes the kernel source around the failing line (kept short);
    # the error that caused it is chained below it.
    parts = []
    while exc is not None and len(parts) < 4:
        lines = [line for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
        if len(lines) > 8:
            lines = [*lines[:1], "...", *lines[-4:]]
        parts.append(" | ".join(lines))
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)[:2000]


def _ptr(dtype: str) -> str:
    return dtype if dtype.startswith("*") else f"*{dtype}"


# ----------------------------------------------------------------------------- gae.py


def gae_variants() -> Iterator[Variant]:
    # _launch_gae: outputs, summary and carry in the accumulation dtype (fp64 iff an input is fp64);
    # without cu_seqlens the cu pointer is rewards; without a carry, n_chunks == 1 (specialised) and
    # the carry pointer is rewards. On CUDA, CHUNK >= 256 and BLOCK = min(1024, CHUNK).
    # (rewards, values, mask, ACC, BLOCK)
    inputs = [
        ("fp32", "fp32", "u8", F32, 1024),
        ("fp64", "fp64", "u8", F64, 1024),
        ("bf16", "bf16", "bf16", F32, 256),
        ("fp16", "fp32", "i64", F32, 512),
        ("fp32", "fp64", "fp32", F64, 256),
    ]
    for r, v, m, acc, block in inputs:
        out = "fp64" if acc == F64 else "fp32"
        for packed in (False, True):
            cu = "*i64" if packed else _ptr(r)
            label = f"r={r},v={v},m={m},ACC={out},BLOCK={block},PACKED={packed}"
            common = {"T": "i32", "stride_row": "i32"}
            for has_carry in (False, True):
                yield Variant(
                    gae._gae_fwd_kernel,
                    f"{label},HAS_CARRY={has_carry}",
                    {
                        "r_ptr": _ptr(r), "v_ptr": _ptr(v), "m_ptr": _ptr(m), "adv_ptr": _ptr(out),
                        "ret_ptr": _ptr(out), "carry_ptr": _ptr(out) if has_carry else _ptr(r), "cu_ptr": cu,
                        **common, "n_chunks": "i32" if has_carry else Const(1), "CHUNK": "i32",
                        **_scalars("gamma", "lam"), "HAS_CARRY": Const(has_carry),
                        "PACKED": Const(packed), "ACC": Const(acc), "BLOCK": Const(block),
                    },
                    aligned=("T", "stride_row", "CHUNK"),
                )  # fmt: skip
            yield Variant(
                gae._gae_summary_kernel,
                label,
                {
                    "r_ptr": _ptr(r), "v_ptr": _ptr(v), "m_ptr": _ptr(m), "summary_ptr": _ptr(out),
                    "cu_ptr": cu, **common, "n_chunks": "i32", "CHUNK": "i32", **_scalars("gamma", "lam"),
                    "PACKED": Const(packed), "ACC": Const(acc), "BLOCK": Const(block),
                },
                aligned=("T", "stride_row", "CHUNK"),
            )  # fmt: skip
            if r == v:  # the carry kernel sees only the summary, carry and cu pointers
                yield Variant(
                    gae._gae_carry_kernel,
                    label,
                    {
                        "summary_ptr": _ptr(out), "carry_ptr": _ptr(out), "cu_ptr": cu, "T": "i32",
                        "n_chunks": "i32", "CHUNK": "i32", "PACKED": Const(packed), "ACC": Const(acc),
                        "BLOCK": Const(16),
                    },
                    aligned=("CHUNK",),
                )  # fmt: skip
    # T = 1: a padded row's T and stride_row are both specialised to 1; a packed batch whose longest
    # row has length 1 has T = 1 and stride_row = 0. One chunk, so no carry.
    for packed in (False, True):
        for r, acc in (("fp32", F32), ("fp64", F64)):
            out = "fp64" if acc == F64 else "fp32"
            yield Variant(
                gae._gae_fwd_kernel,
                f"T=1,r=v={r},m=u8,ACC={out},BLOCK=256,PACKED={packed},HAS_CARRY=False",
                {
                    "r_ptr": _ptr(r), "v_ptr": _ptr(r), "m_ptr": "*u8", "adv_ptr": _ptr(out),
                    "ret_ptr": _ptr(out), "carry_ptr": _ptr(r), "cu_ptr": "*i64" if packed else _ptr(r),
                    "T": Const(1), "stride_row": "i32" if packed else Const(1), "n_chunks": Const(1),
                    "CHUNK": "i32", **_scalars("gamma", "lam"), "HAS_CARRY": Const(False),
                    "PACKED": Const(packed), "ACC": Const(acc), "BLOCK": Const(256),
                },
                aligned=("stride_row", "CHUNK"),
            )  # fmt: skip
    # discounted_returns_fwd: BLOCK = 1024 on CUDA, T passed twice (length and row stride); packed:
    # cu_seqlens int64 on the device (otherwise the cu pointer is rewards).
    for r, m, acc, one, packed in (
        ("fp32", "u8", F32, False, False),
        ("bf16", "fp32", F32, False, False),
        ("fp64", "u8", F64, False, False),
        ("fp32", "u8", F32, True, False),
        ("fp32", "u8", F32, False, True),
        ("fp64", "fp64", F64, False, True),
    ):
        out = "fp64" if acc == F64 else "fp32"
        length = Const(1) if one else "i32"
        yield Variant(
            gae._discounted_returns_kernel,
            f"{'T=1,' if one else ''}r={r},m={m},ACC={out},PACKED={packed},BLOCK=1024",
            {
                "r_ptr": _ptr(r), "m_ptr": _ptr(m), "out_ptr": _ptr(out),
                "cu_ptr": "*i64" if packed else _ptr(r), "T": length, "stride_row": length,
                **_scalars("gamma"), "PACKED": Const(packed),
                "ACC": Const(acc), "BLOCK": Const(1024),
            },
        )  # fmt: skip


# ----------------------------------------------------------------------------- logprobs.py


def logprobs_variants() -> Iterator[Variant]:
    # token_logprobs_fwd/bwd: logits fp32/bf16/fp16 (fp64 goes to the CPU implementation), labels
    # int64, statistics and the logit floor fp32, d logits in the logits' dtype; BLOCK_V =
    # min(next_pow2(V), 4096); without a floor its pointer is lse's.
    for x, block_v, floor in (("fp32", 4096, True), ("bf16", 4096, False), ("fp16", 1024, True)):
        tail = {
            "inv_temp": "fp32", "ignore_index": "i32", "HAS_FLOOR": Const(floor), "BLOCK_V": Const(block_v)
        }  # fmt: skip
        yield Variant(
            logprobs._token_logprobs_fwd_kernel,
            f"x={x},HAS_FLOOR={floor},BLOCK_V={block_v}",
            {
                "x_ptr": _ptr(x), "labels_ptr": "*i64", "floor_ptr": "*fp32", "logp_ptr": "*fp32",
                "ent_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "stride_xn": "i32", **tail,
            },
        )  # fmt: skip
        yield Variant(
            logprobs._token_logprobs_bwd_kernel,
            f"x={x},HAS_FLOOR={floor},BLOCK_V={block_v}",
            {
                "x_ptr": _ptr(x), "dx_ptr": _ptr(x), "labels_ptr": "*i64", "floor_ptr": "*fp32",
                "lse_ptr": "*fp32", "ent_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32",
                "V": "i32", "stride_xn": "i32", "stride_dxn": "i32", **tail,
            },
        )  # fmt: skip


# ----------------------------------------------------------------------------- fused_logprobs.py


def fused_logprobs_variants() -> Iterator[Variant]:
    # Fused lm_head kernels: autotuned on CUDA over _matmul_configs(dtype); every config in bf16
    # (without bias), every fp32 config (its own list) in both dot precisions (dot_precision: "ieee"
    # for torch's "highest", "tf32" for "high" / "medium"; the first with a bias), then fp16 with a
    # bias on the last config. Shared memory is checked against the sm_90 limit, spills fail.
    # The forward's grid is 1-D with the GROUP_N swizzle at the launcher's GROUP_N; its max_splits
    # (rows of the partial buffers) is a plain int, the constant 1 for fp16 (one split, small V).
    configs = fused_logprobs._matmul_configs(torch.bfloat16)
    cases = [("bf16", False, cfg, "tf32") for cfg in configs]
    for precision in fused_logprobs.DOT_PRECISIONS:
        fp32_configs = fused_logprobs._matmul_configs(torch.float32)
        cases += [("fp32", i == 0, cfg, precision) for i, cfg in enumerate(fp32_configs)]
    cases += [("fp16", True, configs[-1], "tf32")]
    for i, (x, has_bias, cfg, precision) in enumerate(cases):
        has_floor = i % 2 == 1  # both branches of the logit floor, across configs and dtypes
        # Sizes divisible by 16 (hidden 4096 ...), except fp16, which stands for vocab 50257 / odd H.
        label = ",".join(
            [f"x={x}", f"HAS_BIAS={has_bias}", f"HAS_FLOOR={has_floor}"]
            + [f"{k}={v}" for k, v in cfg.kwargs.items()]
            + [f"warps={cfg.num_warps}", f"stages={cfg.num_stages}"]
            + ([f"DOT_PRECISION={precision}"] if x == "fp32" else [])
        )
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        flags = {
            "HAS_BIAS": Const(has_bias),
            "HAS_FLOOR": Const(has_floor),
            **{k: Const(v) for k, v in cfg.kwargs.items()},
            "DOT_PRECISION": Const(precision),
        }
        fwd_flags = {**flags, "GROUP_N": Const(fused_logprobs.GROUP_N)}
        fwd_flags["DOT_PRECISION"] = fwd_flags.pop("DOT_PRECISION")  # the kernel's parameter order
        operands = {
            "h_ptr": _ptr(x), "w_ptr": _ptr(x), "b_ptr": _ptr(x), "labels_ptr": "*i64", "floor_ptr": "*fp32"
        }  # fmt: skip
        sizes = {"N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32"}
        aligned = ("V", "H", "stride_hn", "stride_wv", "stride_dzn") if x != "fp16" else ()
        yield Variant(
            fused_logprobs._fused_linear_logprobs_fwd_kernel,
            label,
            {
                **operands, "m_ptr": "*fp32", "s_ptr": "*fp32", "u_ptr": "*fp32", "zl_ptr": "*fp32",
                **sizes, "inv_temp": "fp32", "max_splits": Const(1) if x == "fp16" else "i32",
                **fwd_flags,
            },
            aligned=aligned,
            options=options,
        )  # fmt: skip
        yield Variant(
            fused_logprobs._fused_linear_logprobs_bwd_kernel,
            label,
            {
                **operands, "lse_ptr": "*fp32", "ent_ptr": "*fp32", "g_logp_ptr": "*fp32",
                "g_ent_ptr": "*fp32", "dz_ptr": _ptr(x), **sizes, "stride_dzn": "i32",
                "inv_temp": "fp32", "ignore_index": "i32", **flags,
            },
            aligned=aligned,
            options=options,
        )  # fmt: skip


# ----------------------------------------------------------------------------- ppo_loss.py


def _scalars(*names: str) -> dict[str, str]:
    # A Python float argument is typed fp32; scalars.split_float passes each scalar as three of them.
    return {f"{name}_{i}": "fp32" for name in names for i in range(3)}


def ppo_loss_variants() -> Iterator[Variant]:
    # Grid (B, NT) with BLOCK_T = min(next_pow2(T), 1024): NT = 1 (specialised) for T <= 1024;
    # T = 1 gives BLOCK_T = 1. Statistics and the gradient buffer are in DTYPE; each scalar parameter
    # is three fp32 float arguments (scalars.split_float).
    # (logp / values dtype, the other inputs' dtype, mask dtype, DTYPE, T and NT, BLOCK_T)
    shapes = {
        "long": ("i32", "i32", 1024),  # T > 1024: several tiles
        "short": ("i32", Const(1), 512),  # one tile
        "T=1": (Const(1), Const(1), 1),
    }
    dtype_cases = [
        ("fp32", "fp32", "u8", F32, "long"),
        ("bf16", "bf16", "bf16", F32, "short"),
        ("fp32", "fp64", "fp64", F64, "long"),
        ("fp16", "fp32", "i64", F32, "T=1"),
    ]
    for x, other, m, dt, shape in dtype_cases:
        out = "fp64" if dt == F64 else "fp32"
        t, nt, block = shapes[shape]
        label = f"{shape},x={x},other={other},m={m},DTYPE={out},BLOCK_T={block}"
        # PACKED (cu_seqlens): int64 offsets, T the longest sequence; an unused cu_ptr gets a dummy.
        for packed in (False, True):
            yield Variant(
                ppo_loss._seq_logratio_kernel,
                label + ",PACKED=True" * packed,
                {
                    "logp_ptr": _ptr(x), "old_ptr": _ptr(other), "mask_ptr": _ptr(m),
                    "partial_ptr": _ptr(out), "cu_ptr": "*i64" if packed else _ptr(out), "T": t, "NT": nt,
                    "PACKED": Const(packed), "DTYPE": Const(dt), "BLOCK_T": Const(block),
                },
                aligned=("T",),
            )  # fmt: skip
        for write_grad in (True, False):
            yield Variant(
                ppo_loss._value_fwd_kernel,
                f"{label},WRITE_GRAD={write_grad}",
                {
                    "v_ptr": _ptr(x), "old_ptr": _ptr(other), "ret_ptr": _ptr(other), "mask_ptr": _ptr(m),
                    "partial_ptr": _ptr(out), "grad_ptr": _ptr(out), "T": t, "NT": nt, **_scalars("clip"),
                    "WRITE_GRAD": Const(write_grad), "DTYPE": Const(dt), "BLOCK_T": Const(block),
                },
                aligned=("T",),
            )  # fmt: skip
        # scale_rows_bwd: grad in DTYPE; d x in the logp/values dtype; d entropy in the entropy's.
        for has_ent, packed in ((True, False), (False, False), (True, True)):
            yield Variant(
                ppo_loss._scale_rows_bwd_kernel,
                f"{label},HAS_ENT={has_ent}" + ",PACKED=True" * packed,
                {
                    "grad_ptr": _ptr(out), "mask_ptr": _ptr(m) if has_ent else _ptr(out),
                    "row_weight_ptr": _ptr(out), "dx_ptr": _ptr(x), "dent_ptr": _ptr(other if has_ent else x),
                    "cu_ptr": "*i64" if packed else _ptr(out), "T": t, **_scalars("ent_coef"),
                    "HAS_ENT": Const(has_ent), "PACKED": Const(packed), "DTYPE": Const(dt),
                    "BLOCK_T": Const(block),
                },
                aligned=("T",),
            )  # fmt: skip
        # policy_fwd: every optional input off, then every one on with each KL estimator, across the
        # loss types (LOSS_CODES: ppo_clip 0, gspo 1, cispo 2). The launcher passes a dual clip only
        # to ppo_clip (PolicyLossConfig.active_dual_clip).
        codes = L.LOSS_CODES
        flag_sets = [dict.fromkeys(("HAS_IS", "HAS_REF", "HAS_ENT", "HAS_DUAL"), False)]
        flag_sets[0].update(LOSS_TYPE=codes["ppo_clip"], KL_EST=0, WRITE_GRAD=False)
        flag_sets.append({**flag_sets[0], "LOSS_TYPE": codes["cispo"]})
        for kl, loss_type in enumerate(("gspo", "cispo", "ppo_clip", "cispo")):
            on = dict.fromkeys(("HAS_IS", "HAS_REF", "HAS_ENT"), True)
            flag_sets.append({
                **on, "HAS_DUAL": loss_type == "ppo_clip", "LOSS_TYPE": codes[loss_type], "KL_EST": kl,
                "WRITE_GRAD": True,
            })  # fmt: skip
        if shape != "long":  # the full flag sweep once (fp32 and fp64 above); ppo_clip and cispo here
            flag_sets = flag_sets[-2:]
        # Packed (cu_seqlens) launches: the training flag sets (WRITE_GRAD) once more with PACKED.
        runs = [(f, False) for f in flag_sets] + [(f, True) for f in flag_sets if f["WRITE_GRAD"]]
        for flags, packed in runs:
            on = "+".join(k for k, v in flags.items() if v is True) or "no-flags"
            on += ",PACKED=True" * packed
            yield Variant(
                ppo_loss._ppo_policy_fwd_kernel,
                f"{label},{on},LOSS_TYPE={flags['LOSS_TYPE']},KL_EST={flags['KL_EST']}",
                {
                    "logp_ptr": _ptr(x), "old_ptr": _ptr(other), "adv_ptr": _ptr(other), "mask_ptr": _ptr(m),
                    "isw_ptr": _ptr(other if flags["HAS_IS"] else x),
                    "ref_ptr": _ptr(other if flags["HAS_REF"] else x),
                    "ent_ptr": _ptr(other if flags["HAS_ENT"] else x),
                    "seq_lr_ptr": _ptr(out), "partial_ptr": _ptr(out), "grad_ptr": _ptr(out),
                    "cu_ptr": "*i64" if packed else _ptr(out), "T": t, "NT": nt,
                    **_scalars("lo", "hi", "dual", "kl"),
                    **{k: Const(v) for k, v in flags.items()}, "PACKED": Const(packed), "DTYPE": Const(dt),
                    "BLOCK_T": Const(block),
                },
                aligned=("T",),
            )  # fmt: skip


# ----------------------------------------------------------------------------- sampling.py


def sampling_variants() -> Iterator[Variant]:
    # sample_fwd: one program per row; logits fp32 / bf16 / fp16 with unit column stride, token int64,
    # logp and floor fp32, key int64 (one per row); BLOCK_V = min(next_pow2(V), 4096); top_k is passed
    # as max(top_k, 1) (1 is specialised); step an int < 2**31, never specialised (do_not_specialize).
    # Flags: GREEDY, or temperature-only / top-k / top-p / both.
    flag_sets = [
        ("greedy", True, False, False),
        ("temperature", False, False, False),
        ("top_k", False, True, False),
        ("top_p", False, False, True),
        ("top_k+top_p", False, True, True),
    ]
    # (x, BLOCK_V, V and stride_xn divisible by 16): Llama / Qwen vocabularies; GPT-2's 50257; V <= 1024
    shapes = (("fp32", 4096, True), ("bf16", 4096, True), ("fp16", 4096, False), ("fp32", 1024, False))
    for x, block_v, aligned in shapes:
        for label, greedy, has_k, has_p in flag_sets:
            yield Variant(
                sampling._sample_fwd_kernel,
                f"x={x},{label},BLOCK_V={block_v}",
                {
                    "x_ptr": _ptr(x), "key_ptr": "*i64", "token_ptr": "*i64", "logp_ptr": "*fp32",
                    "floor_ptr": "*fp32", "V": "i32", "stride_xn": "i32", "inv_temp": "fp32", "top_k": "i32",
                    "top_p": "fp32", "step": "i32", "GREEDY": Const(greedy), "HAS_TOP_K": Const(has_k),
                    "HAS_TOP_P": Const(has_p), "BLOCK_V": Const(block_v),
                },
                aligned=("V", "stride_xn") if aligned else (),
            )  # fmt: skip
    # top_k = 1 arrives as the constant 1 (runtime specialisation).
    yield Variant(
        sampling._sample_fwd_kernel,
        "x=bf16,top_k=1,top_k+top_p,BLOCK_V=4096",
        {
            "x_ptr": "*bf16", "key_ptr": "*i64", "token_ptr": "*i64", "logp_ptr": "*fp32",
            "floor_ptr": "*fp32", "V": "i32", "stride_xn": "i32", "inv_temp": "fp32", "top_k": Const(1),
            "top_p": "fp32", "step": "i32",
            "GREEDY": Const(False), "HAS_TOP_K": Const(True), "HAS_TOP_P": Const(True),
            "BLOCK_V": Const(4096),
        },
        aligned=("V", "stride_xn"),
    )  # fmt: skip


def all_variants() -> list[Variant]:
    return [
        *gae_variants(),
        *logprobs_variants(),
        *fused_logprobs_variants(),
        *ppo_loss_variants(),
        *sampling_variants(),
    ]


def uncovered(variants: list[Variant]) -> list[str]:
    """Kernels (``_..._kernel`` JIT functions of the modules) that no variant compiles."""
    compiled = {id(v.kernel) for v in variants}
    return [
        f"{module.__name__}.{name}"
        for module in MODULES
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction) and name.endswith("_kernel") and id(obj) not in compiled
    ]


_WORKER_VARIANTS: list[Variant] = []


def _compile_index(index: int) -> Result:
    # Workers rebuild the variant list (JIT functions do not pickle) and compile by index.
    if not _WORKER_VARIANTS:
        _WORKER_VARIANTS.extend(all_variants())
    return compile_variant(_WORKER_VARIANTS[index])


def _resources(result: Result) -> str:
    if result.n_regs is None:
        return f"{'':23}"
    return f"regs={result.n_regs:3d} spills={result.n_spills:<4d} smem={result.shared // 1024:3d}K"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("filter", nargs="?", default="", help="compile only variants whose name has this")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = parser.parse_args(argv)
    variants = all_variants()
    failures = [f"{name}: no variant compiles it" for name in uncovered(variants)]
    chosen = [i for i, v in enumerate(variants) if args.filter in v.name]
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile_index, chosen))
    else:
        results = [compile_variant(variants[i]) for i in chosen]
    for result in results:
        print(
            f"{'ok  ' if result.error is None else 'FAIL'} {result.seconds:5.1f}s  {_resources(result)}  "
            f"{result.name}" + (f"\n      {result.error}" * bool(result.error))
        )
        if result.error is not None:
            failures.append(f"{result.name}: {result.error}")
    wall = time.perf_counter() - start
    print(f"{len(results)} variants for {TARGET} in {wall:.1f}s, {len(failures)} failures")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
