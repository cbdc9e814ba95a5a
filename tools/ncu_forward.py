"""One SLA forward (TileLang, headline shape, map given) for Nsight Compute: warm-up calls, then the calls ncu
profiles (`ncu --kernel-name regex:sla_forward --launch-skip 2 --launch-count 1 python tools/ncu_forward.py`).
--sparse-only drops the linear branch."""
import argparse

import torch

import slagen

ap = argparse.ArgumentParser()
ap.add_argument("--seq-len", type=int, default=32760)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--sparse-only", action="store_true")
args = ap.parse_args()
torch.manual_seed(0)
q, k, v = (torch.randn(1, args.heads, args.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
bmap = slagen.block_map(q, k, topk=0.05, block_q=128, block_k=64)
fmap = None if args.sparse_only else "softmax"
for _ in range(4):
    slagen.attention(q, k, v, topk=0.05, block_q=128, block_k=64, feature_map=fmap, block_map=bmap,
                     backend="tilelang")
torch.cuda.synchronize()
