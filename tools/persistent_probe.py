"""Feasibility probe for a persistent sparse forward with a hand-written producer / consumer (TileLang 0.1.15).

    python tools/persistent_probe.py                  # on an H100/H200: check against slagen's kernel, time both
    python tools/persistent_probe.py --compile-only   # anywhere with nvcc: compile the four kernels for sm_90a

The library's forward runs one CTA per 128-row query tile; TileLang's automatic warp specialisation puts a CTA
barrier per tile, so a tile's prologue (Q, the first K / V) and epilogue (normalise, store O; for SLA the
linear branch, ~0.08 ms of the headline forward) are not overlapped with any loads (docs/perf-notes.md,
session 14, "Next"). Here one CTA per SM walks its tiles (tile = cta + i·SMs, query block fastest, as the
library's grid orders them): a producer warpgroup issues TMA loads of every tile's Q (two buffers), each
selected key block's K, V (``--stages`` buffers) and, for SLA, the tile's H_i, running ahead into the next tile
while the two consumer warpgroups finish the current one; full / empty mbarriers with phase parity hand the
buffers over. The key loop is the library's online softmax in exp2, plain and (a second kernel) with the next
step's QKᵀ in flight during this step's softmax (FlashAttention-3's intra-warpgroup overlap, as the library's
default loop).

Sparse-only and SLA marginal (softmax φ; the linear epilogue as the library's: H_i / Z_i from the same pre-pass
and mask GEMMs), key blocks of 64 and query tiles of 128 rows, D = 128, bf16, no Proj, inference (no LSE / O^l
outputs), lengths that are multiples of 128 (no partial blocks: no masks). It checks O against slagen's TileLang
forward on the same block map (relative error), then times both given the map (CUDA-event medians, rounds in
turn; the SLA rows include the pre-pass and mask GEMMs, the same in both).

Outcome (session 15, H200, L = 32768, H = 12, 5 rounds; docs/perf-notes.md): correct (O within 3e-3 of the
library's) and slower — sparse-only 0.796 ms (overlap 1.008) vs the library's 0.662, SLA marginal 1.589
(overlap 1.915) vs 0.956. The SASS then showed why: the tile's coordinates, derived from its index by
64-bit divisions at every use, cost the producer ~1000 instructions per key step and serialised the epilogue's
Z_i loads; they are now 32-bit registers formed once per tile (SASS 18.5k → 11.8k lines, the producer's step
~150 instructions, the Z_i loads issued together). That form is not GPU-run yet.
"""

import argparse
import statistics

D, M, N = 128, 128, 64
LOG2E = 1.4426950408889634


def kernel_source(num_sms: int, stages: int, overlap: bool, marginal: bool):
    """The TileLang prim_func of the probe for a grid of ``num_sms`` CTAs (``marginal``: with SLA's linear
    branch, scope marginal, softmax φ, as the library's epilogue: O += φ(Q_i)H_i / (φ(Q_i)·Z_i + eps))."""
    import tilelang.language as T

    DT, ACC = T.bfloat16, T.float32
    B, H, L, Tm, W = T.dynamic("B H L Tm W")

    @T.prim_func
    def persistent_forward(Q: T.Tensor((B, H, L, D), DT), K: T.Tensor((B, H, L, D), DT),
                           V: T.Tensor((B, H, L, D), DT), O: T.Tensor((B, H, L, D), DT),
                           LUT: T.Tensor((B, H, Tm, W), T.int32), CNT: T.Tensor((B, H, Tm), T.int32),
                           HG: T.Tensor((B, H, Tm, D, D), DT), ZG: T.Tensor((B, H, Tm, D), ACC),
                           EPS: T.float32, SM_SCALE: T.float32):
        with T.Kernel(num_sms, threads=384) as (cta,):
            Q_s = T.alloc_shared([2, M, D], DT)
            K_s = T.alloc_shared([stages, N, D], DT)
            V_s = T.alloc_shared([stages, N, D], DT)
            O_s = T.alloc_shared([M, D], DT)           # O's staging; with the linear branch φ(Q_i) first
            Hi_s = T.alloc_shared([D, D], DT)
            # full: the producer's 128 threads arrive (T.tma_copy only adds the expected bytes); empty: the
            # consumers' 256
            q_full, q_empty = T.alloc_barrier([128, 128]), T.alloc_barrier([256, 256])
            k_full, k_empty = T.alloc_barrier([128] * stages), T.alloc_barrier([256] * stages)
            v_full, v_empty = T.alloc_barrier([128] * stages), T.alloc_barrier([256] * stages)
            h_full, h_empty = T.alloc_barrier([128]), T.alloc_barrier([256])
            acc_s = T.alloc_fragment([M, N], ACC)
            acc_n = T.alloc_fragment([M, N], ACC)
            acc_c = T.alloc_fragment([M, N], DT)
            acc_o = T.alloc_fragment([M, D], ACC)
            m = T.alloc_fragment([M], ACC)
            m_prev = T.alloc_fragment([M], ACC)
            rescale = T.alloc_fragment([M], ACC)
            row_sum = T.alloc_fragment([M], ACC)
            l = T.alloc_fragment([M], ACC)
            qf = T.alloc_fragment([M, D], ACC)
            q_max = T.alloc_fragment([M], ACC)
            q_sum = T.alloc_fragment([M], ACC)
            q_den = T.alloc_fragment([M], ACC)
            den = T.alloc_fragment([M], ACC)
            den_s = T.alloc_shared([M], ACC)
            lin = T.alloc_fragment([M, D], ACC)
            tx = T.get_thread_binding()
            sl2 = SM_SCALE * LOG2E
            n_mine = T.ceildiv(Tm * H * B - cta, num_sms)
            step = T.alloc_var(T.int32)       # key steps so far (both roles count alike: stage and parity)
            step = 0
            # The tile's coordinates, formed once per tile in 32-bit registers: as expressions of the tile
            # index they were re-derived (64-bit divisions and modulos by the run-time Tm, H: ~250 subroutine
            # calls in the SASS) at every use, in the producer's per-step LUT read and the epilogue's loads.
            qb, h, b = T.alloc_var(T.int32), T.alloc_var(T.int32), T.alloc_var(T.int32)
            if tx >= 256:                     # producer warpgroup: TMA loads only
                T.dec_max_nreg(24)
                for it in T.serial(n_mine):
                    tile = cta + it * num_sms
                    qb = tile % Tm
                    h = (tile // Tm) % H
                    b = tile // (Tm * H)
                    T.mbarrier_wait_parity(q_empty[it % 2], ((it // 2) % 2) ^ 1)
                    T.tma_copy(Q[b, h, qb * M:(qb + 1) * M, :], Q_s[it % 2, :, :], barrier=q_full[it % 2])
                    T.mbarrier_arrive(q_full[it % 2])
                    for t in T.serial(CNT[b, h, qb]):
                        s = step % stages
                        kb = LUT[b, h, qb, t] * N
                        T.mbarrier_wait_parity(k_empty[s], ((step // stages) % 2) ^ 1)
                        T.tma_copy(K[b, h, kb:kb + N, :], K_s[s, :, :], barrier=k_full[s])
                        T.mbarrier_arrive(k_full[s])
                        T.mbarrier_wait_parity(v_empty[s], ((step // stages) % 2) ^ 1)
                        T.tma_copy(V[b, h, kb:kb + N, :], V_s[s, :, :], barrier=v_full[s])
                        T.mbarrier_arrive(v_full[s])
                        step = step + 1
                    if marginal:      # H_i after the tile's keys: waits for the previous tile's epilogue
                        T.mbarrier_wait_parity(h_empty[0], (it % 2) ^ 1)
                        T.tma_copy(HG[b, h, qb, :, :], Hi_s, barrier=h_full[0])
                        T.mbarrier_arrive(h_full[0])
            else:                             # two consumer warpgroups, 64 rows each
                T.inc_max_nreg(240)
                for it in T.serial(n_mine):
                    tile = cta + it * num_sms
                    qb = tile % Tm
                    h = (tile // Tm) % H
                    b = tile // (Tm * H)
                    n = CNT[b, h, qb]
                    T.fill(acc_o, 0)
                    T.fill(l, 0)
                    T.fill(m, -T.infinity(ACC))
                    T.mbarrier_wait_parity(q_full[it % 2], (it // 2) % 2)
                    if overlap and n > 0:     # step 0's S before the loop
                        T.mbarrier_wait_parity(k_full[step % stages], (step // stages) % 2)
                        T.gemm(Q_s[it % 2, :, :], K_s[step % stages, :, :], acc_s, transpose_B=True,
                               clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                    for t in T.serial(n):
                        s = step % stages
                        if overlap:           # S_{t+1} in flight during step t's softmax
                            if t + 1 < n:
                                s1 = (step + 1) % stages
                                T.mbarrier_wait_parity(k_full[s1], ((step + 1) // stages) % 2)
                                T.gemm(Q_s[it % 2, :, :], K_s[s1, :, :], acc_n, transpose_B=True,
                                       clear_accum=True, policy=T.GemmWarpPolicy.FullRow,
                                       annotations={"wg_wait": -1})
                        else:
                            T.mbarrier_wait_parity(k_full[s], (step // stages) % 2)
                            T.gemm(Q_s[it % 2, :, :], K_s[s, :, :], acc_s, transpose_B=True, clear_accum=True,
                                   policy=T.GemmWarpPolicy.FullRow)
                        T.copy(m, m_prev)
                        T.reduce_max(acc_s, m, dim=1, clear=False)
                        for i in T.Parallel(M):
                            rescale[i] = T.exp2((m_prev[i] - m[i]) * sl2)
                        for i, c in T.Parallel(M, N):
                            acc_s[i, c] = T.exp2(acc_s[i, c] * sl2 - m[i] * sl2)
                        T.reduce_sum(acc_s, row_sum, dim=1)
                        for i in T.Parallel(M):
                            l[i] = l[i] * rescale[i] + row_sum[i]
                        for i, c in T.Parallel(M, D):
                            acc_o[i, c] *= rescale[i]
                        T.copy(acc_s, acc_c)
                        T.mbarrier_wait_parity(v_full[s], (step // stages) % 2)
                        T.gemm(acc_c, V_s[s, :, :], acc_o, policy=T.GemmWarpPolicy.FullRow)
                        T.mbarrier_arrive(k_empty[s])  # K_t's last reader (S_t) and V_t's (P·V) are done
                        T.mbarrier_arrive(v_empty[s])
                        if overlap:
                            T.copy(acc_n, acc_s)
                        step = step + 1
                    if marginal:      # the library's epilogue, Q_s released once φ(Q_i) is formed
                        T.copy(Q_s[it % 2, :, :], qf)
                        T.reduce_max(qf, q_max, dim=1)
                        for i, c in T.Parallel(M, D):
                            qf[i, c] = T.exp2((qf[i, c] - q_max[i]) * LOG2E)
                        T.reduce_sum(qf, q_sum, dim=1)
                        for i, c in T.Parallel(M, D):
                            qf[i, c] = qf[i, c] / q_sum[i]
                        T.copy(qf, O_s)
                        T.mbarrier_arrive(q_empty[it % 2])
                        for i, c in T.Parallel(M, D):
                            qf[i, c] = qf[i, c] * ZG[b, h, qb, c]
                        T.reduce_sum(qf, q_den, dim=1)
                        for i in T.Parallel(M):
                            den_s[i] = q_den[i] + EPS
                        T.copy(den_s, den)
                        T.mbarrier_wait_parity(h_full[0], it % 2)
                        T.gemm(O_s, Hi_s, lin, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                        T.mbarrier_arrive(h_empty[0])
                        for i, c in T.Parallel(M, D):
                            acc_o[i, c] = T.if_then_else(l[i] > 0, acc_o[i, c] / l[i], 0.0) + lin[i, c] / den[i]
                    else:
                        T.mbarrier_arrive(q_empty[it % 2])
                        for i, c in T.Parallel(M, D):
                            acc_o[i, c] = T.if_then_else(l[i] > 0, acc_o[i, c] / l[i], 0.0)
                    T.copy(acc_o, O_s)
                    T.copy(O_s, O[b, h, qb * M:(qb + 1) * M, :])

    return persistent_forward


def compile_probe(num_sms: int, stages: int, overlap: bool, marginal: bool):
    import tilelang

    from slagen.backends.tilelang import TARGET
    return tilelang.compile(kernel_source(num_sms, stages, overlap, marginal), target=TARGET,
                            pass_configs={tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=32768, help="a multiple of 128")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--sms", type=int, default=0, help="CTAs of the persistent grid (default: the GPU's SMs, 132)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    if args.seq_len % M:
        raise SystemExit(f"--seq-len must be a multiple of {M} (the probe has no masks), got {args.seq_len}")
    import torch
    sms = args.sms or (torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available()
                       else 132)
    kernels = {(mg, ov): compile_probe(sms, args.stages, ov, mg) for mg in (False, True) for ov in (False, True)}
    if args.compile_only:
        for (mg, ov), k in kernels.items():
            print(f"== {'SLA marginal' if mg else 'sparse-only'}{', overlap' if ov else ''}: "
                  f"{len(k.get_kernel_source())} characters of CUDA")
        return

    from triton.testing import do_bench

    from slagen import reference
    from slagen.autotune.tuner import rotation
    from slagen.backends import tilelang as tl_backend
    from slagen.backends.triton import selection

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    n_crit, _ = reference.block_counts(reference.num_blocks(args.seq_len, N), args.topk, 0.0)
    maps = list(selection.block_map(q, k, n_crit, 0, M, N))
    lut, cnt = maps[1].contiguous(), maps[2].contiguous()
    common = dict(block_q=M, block_k=N, scale=D ** -0.5, scope="marginal", eps=reference.EPS)
    spec = tl_backend.kernel_spec(q, block_q=M, block_k=N, feature_map="softmax", scope="marginal",
                                  has_negligible=False)
    cfg = tl_backend._call_config(spec, q, k, maps, None)
    unused = (torch.empty((*lut.shape[:3], D, D), dtype=q.dtype, device="cuda"),
              torch.empty((*lut.shape[:3], D), dtype=torch.float32, device="cuda"))

    def library(marginal):
        return lambda: tl_backend.forward(q, k, v, maps, None, None, False,
                                          feature_map="softmax" if marginal else None, **common)[0]

    def persistent(kern, marginal):
        def run():      # the same pre-pass and mask GEMMs as the library's call, then the probe's kernel
            sums = (tl_backend.marginal_sums(spec, cfg, *tl_backend.linear_terms_of(spec, cfg, k, v), maps[0])
                    if marginal else unused)
            o = torch.empty_like(q)
            kern(q, k, v, o, lut, cnt, *sums, reference.EPS, D ** -0.5)
            return o
        return run

    rows, marginal_of = {}, {}
    for mg in (False, True):
        what = "SLA marginal, map given" if mg else "sparse-only, map given"
        rows[f"{what}: library"] = library(mg)
        for ov in (False, True):
            rows[f"{what}: persistent{' + overlap' if ov else ''}"] = persistent(kernels[(mg, ov)], mg)
        marginal_of.update({name: mg for name in rows if name.startswith(what)})
    wants = {mg: library(mg)().float() for mg in (False, True)}
    for name, fn in rows.items():
        want = wants[marginal_of[name]]
        got = fn().float()
        err = ((got - want).norm() / want.norm()).item()
        print(f"{name}: rel. err vs the library {err:.2e}{'' if err < 1e-2 else '  <-- WRONG'}", flush=True)
    times = {name: [] for name in rows}
    for r in range(args.rounds):
        for name in rotation(list(rows), r):
            times[name].append(do_bench(rows[name], warmup=10, rep=60, return_mode="median"))
    flops = 4 * args.heads * args.seq_len * n_crit * N * D
    print(f"\n{torch.cuda.get_device_name()} B=1 H={args.heads} L={args.seq_len} D={D} bf16, 128x64, "
          f"{n_crit} key blocks per row, {sms} CTAs, {args.stages} stages; medians of {args.rounds} rounds")
    print("| call | ms | min–max | sparse TFLOP/s |\n|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.3f} | {min(t):.3f}–{max(t):.3f} | {flops / med / 1e9:.0f} |")


if __name__ == "__main__":
    main()
