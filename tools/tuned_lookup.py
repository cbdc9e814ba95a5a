"""After `slagen tune`, in a new process: does a run-time call find the tuned configs without tuning again?

    python tools/tuned_lookup.py [--seq-len 32760] [--block 128x64] [--topk 0.05]

For the triton forward and backward and the tilelang forward of SLA marginal (softmax, bf16, d=128) it
prints the config the run-time lookup returns (slagen.autotune.select.config_for: memory → user cache →
shared caches) and where it came from, then runs one forward+backward through slagen.attention with the
"slagen" logger at DEBUG, so the lookups the call itself makes are printed too. Exits 1 when a record the
user cache holds for this GPU and shape bucket is not found.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

import slagen
from slagen.autotune import cache, records, select
from slagen.backends import tilelang as tl_backend
from slagen.backends.triton import bwd as tr_bwd
from slagen.backends.triton import fwd as tr_fwd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=32760)
    ap.add_argument("--block", default="128x64")
    ap.add_argument("--topk", type=float, default=0.05)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("slagen").setLevel(logging.DEBUG)
    bq, bk = (int(x) for x in args.block.split("x"))
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 12, args.seq_len, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    fields = dict(block_q=bq, block_k=bk, feature_map="softmax", scope="marginal", has_negligible=False)
    density = max(1, int(args.topk * -(-args.seq_len // bk))) / -(-args.seq_len // bk)
    missing = 0
    for backend, mod in (("triton", tr_fwd), ("triton", tr_bwd), ("tilelang", tl_backend)):
        spec = mod.kernel_spec(q, **fields)
        stored = cache.lookup(spec.canonical, backend, select.gpu_name(dev), spec.arch,
                              records.shape_bucket(args.seq_len, density))
        got = select.config_for(spec, backend, dev, args.seq_len, density, check=mod.check_config)
        where = stored[1] if stored else "no record: default"
        print(f"{backend:8s} {spec.role:8s} {spec.canonical}: {where}: {got}")
        missing += bool(stored) and got != stored[0]["config"]
    select.forget()
    for backend in ("triton", "tilelang"):
        out = slagen.attention(q, k, v, topk=args.topk, block_q=bq, block_k=bk, backend=backend)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    print("lookup: " + ("a stored record was NOT used" if missing else "every stored record was found"))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
