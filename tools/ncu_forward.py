"""One SLA forward (TileLang, headline shape, map given) for Nsight Compute: warm-up calls, then the calls ncu
profiles. --sparse-only drops the linear branch; --config runs a TileLang forward config (tools/forward_configs.py's
form) instead of the default, so a loop variant can be profiled beside the default:

    ncu --kernel-name regex:sla_forward --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        --section SourceCounters -o fwd python tools/ncu_forward.py --sparse-only --config '{"tile_n": 128}'
    ncu -i fwd.ncu-rep --page source --csv --print-source sass > sass.csv   # stall samples per SASS line
"""
import argparse
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_sla import map_inputs  # noqa: E402

from slagen import reference  # noqa: E402
from slagen.backends import tilelang as tl_backend  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seq-len", type=int, default=32760)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--sparse-only", action="store_true")
ap.add_argument("--config", default="{}", help="a JSON TileLang forward config ('{}': the default)")
args = ap.parse_args()
shape = types.SimpleNamespace(seq_len=args.seq_len, heads=args.heads, block="128x64", topk=0.05)
bq, bk, (q, k, v, _), maps = map_inputs(shape)
config = json.loads(args.config)
for _ in range(4):
    tl_backend.forward(q, k, v, maps, None, None, False, block_q=bq, block_k=bk, scale=q.shape[-1] ** -0.5,
                       feature_map=None if args.sparse_only else "softmax", scope="marginal", eps=reference.EPS,
                       config=config)
torch.cuda.synchronize()
