# Sourced by tools/device_run.sh: the Triton candidates worth timing beside the defaults on an H100/H200 at
# the headline shape (`slagen tune --config`; each override is checked against the kernel's check_config and
# reported when it does not apply). Measured outcomes: docs/perf-notes.md.
# (session 4: epilogue 'fused', tile_n 128 and pre_warps 4 measured slower than the defaults; dropped)
TRITON_TUNE_ARGS=(
  --config '{"pre_per_sm": 4}' --config '{"pre_per_sm": 4, "pre_warps": 4}' --config '{"pre_stages": 4}'
  --config '{"pre_tile": 32}' --config '{"num_stages": 4}'
  --config '{"dq": {"num_stages": 3}}' --config '{"dkdv": {"num_stages": 3}}'
  --config '{"dkdv": {"block_n": 32}}'
)
# The TileLang backend's candidates (its forward and backward roles; an override a role lacks is skipped):
# two selected key blocks per forward / dq step, and the Triton backward against the TileLang one.
# (session 4: forward tile_n 128 measured slower, 1.461 vs 1.419 ms; dq tile_n 128 4.750 vs 4.787 ms backward)
# ctas_per_sm 2 applies to 64-row tiles only (reported and skipped at 128 rows); default there since session 7
# (1.399 vs 1.756 ms forward at 64x64), so the candidate is 1. tma_store: default on since session 7 (128x64
# 1.244 vs 1.355 ms); at 64-row tiles it is off with two CTAs (the pair, untimed, is a candidate).
# prefetch_h measured slower (128x64 1.800 vs 1.355 ms, session 7): a candidate for other cards.
# The backward's dq / dkdv epilogues (session 8, 128x64 backward: default 4.834, tma_store 4.523 — default
# since —, both 4.513, lin_init alone 4.842): lin_init on top of the tma_store default, and the old stores.
# Forward tile_n 128 (two selected blocks per step): 1.189 vs 1.207 ms (session 8, noise; slower in 4 and 7).
# overlap (session 8): S_{t+1} = QK_{t+1}ᵀ in flight during step t's softmax (FA3's intra-warpgroup overlap):
# 1.157 vs 1.202 ms at 128x64; default at d 128 / 128-row tiles since session 9 (its 39 GPU cases passed), so
# the candidate is the old loop there and overlap on 64-row tiles elsewhere.
# dq / dkdv lin_fused: the linear terms inside the TileLang kernels instead of the Triton `_dq` / `_dkdv`
# (session 10, backward: 3.896 ms without, 3.725 dkdv alone, 3.870 dq alone, 3.686 both); default where it
# applies since, so the candidates are without it, each alone, and lin_init (which needs lin_fused off).
# 64-row tiles with two CTAs per SM at 128x64 blocks (untimed there: each query block's K / V read by its two
# CTAs, one CTA's softmax under the other's GEMMs; at 64x64 blocks 1.399 vs 1.756 ms, session 7).
# pingpong (session 11): the two consumer warpgroups take turns at the tensor cores (FlashAttention-3's order);
# sparse-only 0.806 vs overlap 0.702 ms given the map at 128x64 (tools/forward_configs.py): slower, a candidate.
# 64-row tiles with two CTAs per SM and the TMA store: 1.136 vs 1.156 ms (session 11 tune, SLA forward with its
# block map; the same process's profile showed its sla_forward at 0.838 ms, so within noise at best).
# (session 5, 64x64 block map: pool_stages 3 / pool_warps 8 slower.)
# Session 13 (interleaved rounds, given the map): 64-row tiles with two CTAs per SM at 128x64 are slower
# (sparse-only 0.766 / 0.858 ms with / without the TMA store vs 0.639–0.701), kept as candidates for other cards;
# pre_async (the pre-pass's asynchronous H stores) default since (SLA forward 1.010 -> 0.984 ms): the old
# synchronous stores are the candidate.
# persistent (session 16): one CTA per SM, hand-written producer / consumer; 0.989 vs 1.000 ms SLA marginal and
# 0.705 vs 0.689 sparse-only given the map (9 interleaved rounds): a candidate.
TILELANG_TUNE_CANDIDATES=(
  --config '{"backward": "triton"}' --config '{"dq": {"tile_n": 128}}' --config '{"ctas_per_sm": 1}'
  --config '{"tma_store": true}' --config '{"tma_store": false}' --config '{"prefetch_h": true}'
  --config '{"tile_n": 128}' --config '{"overlap": true}' --config '{"overlap": false}'
  --config '{"tile_m": 64, "num_warps": 4, "ctas_per_sm": 2, "tma_store": false, "overlap": false}'
  --config '{"tile_m": 64, "num_warps": 4, "ctas_per_sm": 2, "overlap": false}'
  --config '{"pingpong": true, "overlap": false}' --config '{"pre_async": false}'
  --config '{"persistent": true, "overlap": false, "num_stages": 3}'
  --config '{"dq": {"lin_init": true, "lin_fused": false}, "dkdv": {"lin_init": true, "lin_fused": false}}'
  --config '{"dq": {"tma_store": false}, "dkdv": {"tma_store": false}}'
  --config '{"dkdv": {"lin_fused": false}}' --config '{"dq": {"lin_fused": false}}'
  --config '{"dq": {"lin_fused": false}, "dkdv": {"lin_fused": false}}'
)
