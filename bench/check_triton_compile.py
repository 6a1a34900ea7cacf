"""Compile every Triton kernel of fusedface in every shipped launch configuration for sm_80 and sm_90,
without a GPU, and check the machine code: zero register spills and shared memory within the
architecture's limit.

    python bench/check_triton_compile.py [--arch 80 90] [--jobs N] [--json out.json]

For each (kernel, launch config, dtype, arch): ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", arch, 32))`` with the specialisation a real launch at B = D = 512 gets
(pointers and 16-divisible integers marked ``tt.divisibility = 16``), then

* registers, stack frame and local memory per thread from the cubin, read with the ``cuobjdump``
  shipped inside the triton wheel (``cuobjdump --dump-resource-usage``); a non-zero stack frame or
  local-memory size means spills (Triton kernels use no stack otherwise);
* shared memory from the compiled kernel's metadata (``kernel.metadata.shared``), against the
  per-block opt-in limit: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100).

Every kernel is compiled with its heaviest flags (support-vector rewrite on, ``dℓ/dc`` split into
hi + lo, fp16 rescaling, NPT with k = 16), plus the fast-gradient and atomic variants of the
gradient kernels. Prints a table and exits 1 on any spill, over-limit shared memory or compile error.
Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces kernels by Python functions).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}


def _cuobjdump() -> str:
    import triton
    base = os.path.dirname(triton.__file__)
    hits = sorted(glob.glob(os.path.join(base, "backends", "nvidia", "bin", "cuobjdump*")))
    if not hits:
        raise FileNotFoundError(f"no cuobjdump under {base}/backends/nvidia/bin (the triton wheel ships one)")
    return hits[0]


# the margin tile kernels' issue-16 extensions: the default specialisation (all off), and the heaviest
EXT_OFF = dict(QUAD=0, HAS_RT=0, FILTER=0, SUBC=1, SUBC_PAD=1)
EXT_ON = dict(QUAD=1, HAS_RT=1, FILTER=1)  # curricular rewrite with rt, inter-class filtering
SUBCENTERS = (2, 3, 8)  # K > 1 variants, on the launcher's K > 1 configuration (triton_tiles.SUB_CONFIGS)


def _variants():
    """(kernel, config name, dtype, flags) for every shipped configuration."""
    from fusedface.backends import triton_tiles as T
    out = [v if v[1] == "npt" else v[:4] + (dict(EXT_OFF, **v[4]),) for v in _base_variants(T)]
    for arch, kern, cfg, dt, flags in list(out):
        if kern == "npt" or flags.get("tag", "") not in ("", "streamD"):
            continue
        tag = flags.get("tag", "")
        out.append((arch, kern, cfg, dt, dict(flags, **EXT_ON, tag=tag + "+qf" if tag else "qf")))
        prec = {"bf16": "16", "fp16": "16", "fp32": "32", "fp64": "64"}[dt]
        sub = T.SUB_CONFIGS.get((arch, kern, prec), cfg)
        for K in SUBCENTERS:
            pad = 1 << (K - 1).bit_length()
            kcfg = T._sub_cfg(sub, K)
            kf = dict(flags, **EXT_ON, SUBC=K, SUBC_PAD=pad, tag=tag + f"+K{K}" if tag else f"K{K}")
            if "RESIDENT" in kf:
                kf["RESIDENT"] = int(sub.resident and 512 <= sub.block_d) if not tag else 0
            out.append((arch, kern, kcfg, dt, kf))
    return out


def _base_variants(T):
    out = []
    for (arch, kern, prec), cfg in sorted(T.CONFIGS.items()):
        if kern == "dw_fast":  # the dW config used with FUSEDFACE_TRITON_FAST_GRAD=1
            for dt in ("bf16", "fp16"):
                out.append((arch, "dw", cfg, dt, dict(NEGATIVE=1, CAST=0, UPCAST=0, PRECISION="ieee", SPLIT_DC=0,
                                                      RESCALE=int(dt == "fp16"), RESIDENT=int(cfg.resident and 512 <= cfg.block_d),
                                                      GRAD_T=int(cfg.grad_t), tag="fast")))
            continue
        dts = {"16": ["bf16", "fp16"], "32": ["fp32"], "64": ["fp64"]}[prec]
        for dt in dts:
            precision = ["ieee", "tf32", "tf32x3"] if dt == "fp32" else ["ieee"]
            for p in precision:
                flags = dict(NEGATIVE=1, CAST=0, UPCAST=0, PRECISION=p)
                if kern in ("dx", "dw"):
                    # RESIDENT as a launch at D = 512 sets it (one feature chunk covers D)
                    flags.update(SPLIT_DC=int(dt in ("bf16", "fp16")), RESCALE=int(dt == "fp16"),
                                 RESIDENT=int(cfg.resident and 512 <= cfg.block_d), GRAD_T=int(cfg.grad_t))
                    if kern == "dx":
                        flags["ATOMIC"] = 0
                if kern == "npt":
                    flags = dict(K=16, K_PAD=16, CAST=0, UPCAST=0, PRECISION=p)
                out.append((arch, kern, cfg, dt, flags))
                if kern == "dx" and dt in ("bf16", "fp16"):
                    out.append((arch, kern, cfg, dt, dict(flags, SPLIT_DC=0, tag="fast")))
                if kern == "dx" and dt == "bf16":
                    out.append((arch, kern, cfg, dt, dict(flags, ATOMIC=1, tag="atomic")))
                if kern in ("dx", "dw") and flags.get("RESIDENT"):  # D > block_d streams D instead
                    out.append((arch, kern, cfg, dt, dict(flags, RESIDENT=0, tag="streamD")))
    return out


STEP_KERNELS = ("step_fwd", "step_dw", "step_prologue", "step_merge", "step_reduce", "step_dx", "hybrid_fwd",
                "hybrid_bwd", "optim_update")
# the dW kernel with the in-backward optimizer's update in its epilogue (fusedface.optim): tag -> (constexprs,
# state dtype or None for W's); "adamw16": bf16 state beside an fp32 W (state_dtype=torch.bfloat16)
OPTIM_VARIANTS = {"sgd": (dict(OPTIM=1, MOMENTUM=1), None), "adamw": (dict(OPTIM=2, MOMENTUM=0), None),
                  "adamw16": (dict(OPTIM=2, MOMENTUM=0), "bf16")}
NO_OPTIM = dict(OPTIM=0, MOMENTUM=0, ROUND_BITS=0)


def _step_variants():
    """The training step's kernels (``fusedface/backends/triton.py``): the fused forward and dW in every
    shipped configuration for bf16, fp16 and mixed (bf16 x, fp32 W), the opt-in hi + lo split, and
    the O(B·D) / epilogue kernels once per arch."""
    from fusedface.backends import triton as TS
    out = []
    for (arch, kern), cfg in sorted(TS.STEP_CONFIGS.items()):
        base = kern.split("_")[0]
        mixed = kern.endswith("_mixed")
        optim_cfg = kern.endswith("_optim")  # the dW config of the in-backward optimizer's epilogue only
        # the layout flags as a launch at D = 512 sets them (the launcher's own rule)
        layout = TS.fwd_flags(cfg, 512) if base == "fwd" else TS.dw_flags(cfg, 512)
        if kern.endswith("_split"):  # the forward's config under FUSEDFACE_TRITON_SPLIT_GRAD=1
            out.append((arch, "step_fwd", cfg, "bf16", dict(NEGATIVE=1, W_CAST=0, SPLIT=1, RESCALE=0, UPCAST=0,
                                                            PRECISION="ieee", COUNT_SV=1, NEED_DX=1, wdt="bf16",
                                                            tag="split", **layout)))
            continue
        pairs = [("bf16", "fp32")] if mixed else ([("bf16", "bf16"), ("fp16", "fp16")] if base == "fwd"
                                                  else [("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")])
        for dt, wdt in pairs:
            common = dict(NEGATIVE=1, W_CAST=int(wdt != dt), SPLIT=0, RESCALE=int(dt == "fp16"), UPCAST=0,
                          PRECISION="ieee", wdt=wdt, **layout)
            flags = dict(common, COUNT_SV=1, NEED_DX=1) if base == "fwd" else dict(common, PER_ROW=0, **NO_OPTIM)
            if not optim_cfg:
                out.append((arch, "step_" + base, cfg, dt, flags))
            if base == "dw" and not optim_cfg:  # the opt-in split runs on the same config
                out.append((arch, "step_" + base, cfg, dt, dict(flags, SPLIT=1, tag="split")))
            if base == "dw" and (optim_cfg or (arch, "dw_optim") not in TS.STEP_CONFIGS):
                # the in-backward optimizer's epilogue (SGD with momentum, AdamW; bf16 state for the mixed W),
                # and AdamW behind the split, on the arch's "dw_optim" config where it has one
                for tag, (ce, sdt) in OPTIM_VARIANTS.items():
                    if sdt is None or wdt == "fp32":
                        out.append((arch, "step_dw", cfg, dt, dict(flags, **ce, sdt=sdt or wdt, tag=tag)))
                out.append((arch, "step_dw", cfg, dt, dict(flags, SPLIT=1, OPTIM=2, sdt=wdt, tag="sp-adam")))
    from fusedface.backends.triton_tiles import LaunchConfig
    small = LaunchConfig(TS._row_block(512), 0, 0, 512, num_warps=TS.SMALL_WARPS, num_stages=1)
    for arch in ("sm80", "sm90"):
        for dt, wdt in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")):
            out.append((arch, "step_prologue", small, dt, dict(M2_VEC=1, M3_VEC=1, POLICY=1, STRAIGHT=0,
                                                               W_CAST=int(wdt != dt), UPCAST=0, wdt=wdt)))
            out.append((arch, "step_dx", small, dt, dict(PER_ROW=0, GX_GIVEN=0, W_CAST=int(wdt != dt), UPCAST=0,
                                                         wdt=wdt)))
        # AdaFace's clip policy (POLICY 3) in the step's prologue, with its per-row margins
        out.append((arch, "step_prologue", small, "bf16", dict(M2_VEC=1, M3_VEC=1, POLICY=3, STRAIGHT=0, W_CAST=0,
                                                               UPCAST=0, wdt="bf16", tag="clip")))
        out.append((arch, "step_merge", small, "fp32", dict(NEED_DX=1, wdt="fp32")))
        out.append((arch, "step_reduce", LaunchConfig(1024, 0, 0, 0), "fp32", dict(MEAN=1, wdt="fp32")))
        out.append((arch, "hybrid_fwd", TS.EPI, "fp32", dict(NEGATIVE=1, COUNT_SV=1, wdt="fp32")))
        out.append((arch, "hybrid_bwd", TS.EPI_BWD, "fp32", dict(NEGATIVE=1, PER_ROW=0, wdt="fp32")))
        # the hybrid's update (fusedface.optim): fp32 W and state, and bf16 W (16-bit heads under 16,384 classes)
        upd = LaunchConfig(TS.OPTIM_ROWS, 0, 0, 128, num_warps=4, num_stages=1)
        for wdt, tag, ce in (("fp32", "sgd", dict(OPTIM=1, MOMENTUM=1)), ("fp32", "adamw", dict(OPTIM=2, MOMENTUM=0)),
                             ("bf16", "adamw", dict(OPTIM=2, MOMENTUM=0))):
            out.append((arch, "optim_update", upd, "fp32", dict(ce, ROUND_BITS=0, wdt=wdt, sdt=wdt, tag=tag)))
    return out


HYPER = dict(wd="fp32", momentum="fp32", damp1="fp32", neg_lr="fp32", first="i32", nesterov="i32", decay="fp32",
             lerp_w="fp32", beta2="fp32", w2="fp32", neg_step="fp32", bc2_sqrt="fp32", eps="fp32")


def _step_signature(kern: str, dt: str, wdt: str, sdt: str):
    x, w, f, i64, i32 = DTYPES[dt], DTYPES[wdt], "*fp32", "*i64", "i32"
    s = DTYPES[sdt]
    ints = dict(B=i32, C=i32, D=i32, stride_x=i32, stride_w=i32)
    sc = dict(scale="fp32", sv_a="fp32", sv_b="fp32")
    parts = dict(m_ptr=f, l_ptr=f, best_ptr=f, arg_ptr=i64, sv_ptr="*i32")
    rowv = dict(xinv_ptr=f, winv_ptr=f, f_ptr=f, ylab_ptr=i64, lse_ptr=f, slope_ptr=f, g_ptr=f, wscale_ptr=f)
    if kern == "step_fwd":
        return dict(x_ptr=x, w_ptr=w, xinv_ptr=f, f_ptr=f, ylab_ptr=i64, winv_ptr=f, **parts, e_ptr=f, **ints,
                    n_splits=i32, **sc)
    if kern == "step_dw":
        return dict(x_ptr=x, w_ptr=w, **rowv, dw_ptr=w, s1_ptr=s, s2_ptr=s, **ints, stride_dw=i32, stride_s=i32, **sc,
                    **HYPER)
    if kern == "optim_update":
        return dict(g_ptr=f, w_ptr=w, s1_ptr=s, s2_ptr=s, n_rows=i32, D=i32, stride_g=i32, stride_w=i32, stride_s=i32,
                    **HYPER)
    if kern == "step_prologue":
        return dict(x_ptr=x, w_ptr=w, y_ptr=i64, m2_ptr=f, m3_ptr=f, xinv_ptr=f, f_ptr=f, slope_ptr=f, ylab_ptr=i64,
                    **ints, ignore_index=i32, m1="fp32", m2_val="fp32", m3_val="fp32")
    if kern == "step_dx":
        return dict(x_ptr=x, w_ptr=w, xinv_ptr=f, ylab_ptr=i64, f_ptr=f, lse_ptr=f, slope_ptr=f, g_ptr=f,
                    wscale_ptr=f, e_ptr=f, dx_ptr=x, B=i32, D=i32, stride_x=i32, stride_w=i32, scale="fp32")
    if kern == "step_merge":
        return dict(**parts, e_ptr=f, f_ptr=f, ylab_ptr=i64, lse_ptr=f, rows_ptr=f, pred_ptr=i64, svc_ptr="*i32",
                    ebar_ptr=f, B=i32, D=i32, n_splits=i32, scale="fp32")
    if kern == "step_reduce":
        return dict(rows_ptr=f, ylab_ptr=i64, loss_ptr=f, wscale_ptr=f, B=i32)
    if kern == "hybrid_fwd":
        return dict(buf_ptr=f, xinv_ptr=f, winv_ptr=f, f_ptr=f, ylab_ptr=i64, **parts, B=i32, n=i32, c0=i32,
                    part0=i32, n_parts=i32, **sc)
    return dict(buf_ptr=f, **{k: v for k, v in rowv.items()}, coef_ptr=f, B=i32, n=i32, c0=i32, **sc)


def _step_meta(kern: str, cfg) -> dict:
    if kern in ("step_fwd", "step_dw"):
        return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d)
    if kern in ("step_prologue", "step_dx", "step_merge", "optim_update"):
        return dict(BLOCK_R=cfg.block_m, BLOCK_D=cfg.block_d)
    if kern == "step_reduce":
        return dict(BLOCK=cfg.block_m)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)


def _signature(kern: str, dt: str):
    p = DTYPES[dt]
    acc = "*fp64" if dt == "fp64" else "*fp32"
    ptr_in = {"x_ptr": p, "w_ptr": p, "xinv_ptr": acc, "winv_ptr": acc, "y_ptr": "*i64"}
    ints = {"B": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32"}
    scal = {k: "fp32" for k in ("s_hi", "s_lo", "a_hi", "a_lo", "b_hi", "b_lo")}
    if kern in ("fwd", "dx", "dw"):  # issue 16: per-row t_b, q of the rewrite, the filter threshold
        scal.update(rt_ptr=acc, **{k: "fp32" for k in ("q_hi", "q_lo", "thr_hi", "thr_lo")})
    if kern == "fwd":
        sig = {**ptr_in, "f_ptr": acc, "m_ptr": acc, "l_ptr": acc, "best_ptr": acc, "arg_ptr": "*i64",
               "sv_ptr": "*i32", **ints, "n_splits": "i32", **scal}
    elif kern == "dx":
        sig = {**ptr_in, "f_ptr": acc, "lse_ptr": acc, "gl_ptr": acc, "dcy_ptr": acc, "gx_ptr": acc,
               **ints, "n_splits": "i32", **scal}
    elif kern == "dw":
        sig = {**ptr_in, "f_ptr": acc, "lse_ptr": acc, "gl_ptr": acc, "dcy_ptr": acc, "dw_ptr": p,
               **ints, "stride_dw": "i32", **scal}
    else:
        sig = {**ptr_in, "val_ptr": acc, "idx_ptr": "*i64", **ints, "n_splits": "i32"}
    return sig


def compile_one(job):
    arch, kern, cfg, dt, flags = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedface.backends.triton_tiles import _KERNELS
    from fusedface.triton_kernels import margin_step

    step = kern in STEP_KERNELS
    fn = getattr(margin_step, kern + "_kernel") if step else _KERNELS[kern]
    wdt = flags.get("wdt", dt)
    sdt = flags.get("sdt") or wdt
    flags = {k: v for k, v in flags.items() if k not in ("tag", "wdt", "sdt")}
    consts = dict(flags, **(_step_meta(kern, cfg) if step else cfg.meta()))
    sig = _step_signature(kern, dt, wdt, sdt) if step else _signature(kern, dt)
    full = {}
    for name in fn.arg_names:
        full[name] = "constexpr" if name in consts else sig[name]
    missing = [n for n in fn.arg_names if n not in full]
    assert not missing, missing
    # a launch at B = D = 512 specialises pointers and 16-divisible ints
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if full[n].startswith("*") or n in ("B", "D", "stride_x", "stride_w", "stride_dw", "stride_s", "stride_g")}
    t0 = time.time()
    src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(k.asm["cubin"])
        path = fh.name
    try:
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    hgmma = len(re.findall(r"\bHGMMA\b", sass))
    hmma = len(re.findall(r"\bHMMA\b", sass))
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output: {res!r}")
    reg, stack, _, local = (int(g) for g in m.groups())
    # the hot dots of the default path's 16-bit kernels on sm_90 must be warpgroup MMA (no mma.sync)
    hot = step and kern in ("step_fwd", "step_dw") and arch == 90 and dt in ("bf16", "fp16")
    return dict(kernel=kern, arch=f"sm_{arch}",
                dtype=dt + ("/W " + wdt if wdt != dt else "") + ("/S " + sdt if sdt != wdt else ""),
                tag=job[4].get("tag", ""),
                config=f"M{cfg.block_m} N{cfg.block_n} K{cfg.block_k}" + (f" D{cfg.block_d}" if cfg.block_d else "")
                + f" w{cfg.num_warps} s{cfg.num_stages}",
                flags=" ".join(f"{a}={b}" for a, b in flags.items() if a in ("PRECISION", "SPLIT_DC", "ATOMIC", "RESIDENT",
                                                                             "GRAD_T", "K", "SPLIT", "T_DOT", "T_RECOMP",
                                                                             "OPTIM")),
                hgmma=hgmma, hmma=hmma, wgmma_required=hot, wgmma_ok=(not hot) or (hgmma > 0 and hmma == 0),
                registers=reg, spill_bytes=stack + local, shared=int(k.metadata.shared),
                shared_limit=SMEM_LIMIT[arch], seconds=round(time.time() - t0, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    jobs = [(int(a[2:]),) + v[1:] for v in _variants() + _step_variants() for a in [v[0]] if int(a[2:]) in args.arch]
    rows, failed = [], []
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as ex:
        futs = {ex.submit(compile_one, j): j for j in jobs}
        for fut in cf.as_completed(futs):
            j = futs[fut]
            try:
                rows.append(fut.result())
            except Exception as exc:  # a compile error is a failure, reported with its job
                failed.append((j, f"{type(exc).__name__}: {exc}"))
    rows.sort(key=lambda r: (r["arch"], r["kernel"], r["dtype"], r["tag"], r["flags"]))
    hdr = (f"{'kernel':<13} {'arch':<6} {'dtype':<19} {'variant':<7} {'config':<26} {'flags':<40} {'regs':>4} "
           f"{'spill':>5} {'smem KiB':>9} {'limit':>6} {'HGMMA':>6} {'HMMA':>5}  ok")
    print(hdr)
    print("-" * len(hdr))
    bad = 0
    for r in rows:
        ok = r["spill_bytes"] == 0 and r["shared"] <= r["shared_limit"] and r["wgmma_ok"]
        bad += not ok
        print(f"{r['kernel']:<13} {r['arch']:<6} {r['dtype']:<19} {r['tag'] or 'default':<7} {r['config']:<26} "
              f"{r['flags']:<40} {r['registers']:>4} {r['spill_bytes']:>5} {r['shared'] / 1024:>9.1f} "
              f"{r['shared_limit'] // 1024:>6} {r['hgmma']:>6} {r['hmma']:>5}  {'yes' if ok else 'NO'}")
    for j, err in failed:
        print(f"COMPILE ERROR {j[1]} sm_{j[0]} {j[3]} {j[2]}: {err}")
    print(f"{len(rows)} compiled, {len(failed)} failed to compile, {bad} over a limit or without warpgroup MMA "
          f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, failed=[[str(j), e] for j, e in failed]), fh, indent=1)
    return 1 if (failed or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
