"""learner.distributed in a real 2-process gloo group: the global mask equals the single-process mask
over the rank-major concatenation, ties and padding included; counts sum exactly across ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from learner.masks import forking_mask

ROOT = Path(__file__).resolve().parents[2]
SIZES = (37, 64)      # unequal per-rank token counts

# Each rank: the same seeded global batch, its own slice of it; results go to a JSON file (no pickle).
WORKER = r"""
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from learner.distributed import all_reduce_floats, global_forking_mask
from tests.integration.test_global_mask_gloo import make_batch, SIZES

rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=60))
try:
    entropy, valid = make_batch()
    start = sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    res = {}
    for name, rho, variant, use_valid in [("top", 0.2, "top", False), ("top_pad", 0.3, "top", True),
                                          ("bottom", 0.2, "bottom", True), ("tiny", 1e-6, "top", False),
                                          ("all", 1.0, "top", True), ("random", 0.25, "random", True)]:
        gen = torch.Generator().manual_seed(11)       # same state on every rank
        mask, tau = global_forking_mask(entropy[mine], rho, variant, valid=valid[mine] if use_valid else None,
                                        generator=gen)
        res[name] = {"mask": mask.tolist(), "tau": tau}
    res["sum"] = all_reduce_floats([float(valid[mine].sum()), 1.5 * (rank + 1), 2.0 ** 40 + rank])
    res["empty_rank"] = global_forking_mask(entropy[mine] if rank == 0 else torch.zeros(0), 0.2)[0].tolist()
finally:
    dist.destroy_process_group()
json.dump(res, open(out, "w"))
"""


def make_batch():
    g = torch.Generator().manual_seed(5)
    n = sum(SIZES)
    entropy = torch.randint(0, 4, (n,), generator=g).float() * 0.5     # heavy ties, across the rank boundary
    valid = torch.rand(n, generator=g) < 0.7
    return entropy, valid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_mask_equals_single_process_mask(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(port), str(tmp_path / f"{r}.json")],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], logs
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]

    entropy, valid = make_batch()
    cases = {"top": (0.2, "top", None), "top_pad": (0.3, "top", valid), "bottom": (0.2, "bottom", valid),
             "tiny": (1e-6, "top", None), "all": (1.0, "top", valid), "random": (0.25, "random", valid)}
    for name, (rho, variant, v) in cases.items():
        ref, ref_tau = forking_mask(entropy, rho, variant, valid=v, generator=torch.Generator().manual_seed(11))
        got = res[0][name]["mask"] + res[1][name]["mask"]
        assert got == ref.tolist(), name
        assert res[0][name]["tau"] == res[1][name]["tau"] == ref_tau, name
    # ties straddle the boundary between the two ranks' tokens: the selection really had to break them
    top, tau = forking_mask(entropy, 0.2)
    assert int(((entropy == tau) & ~top).sum()) > 0 and int(((entropy == tau) & top).sum()) > 0
    assert sum(res[0]["top"]["mask"]) + sum(res[1]["top"]["mask"]) == 21        # ceil(0.2 * 101)

    expected = [float(valid.sum()), 1.5 + 3.0, 2.0 ** 41 + 1]
    assert res[0]["sum"] == res[1]["sum"] == expected
    ref_empty, _ = forking_mask(entropy[:SIZES[0]], 0.2)
    assert res[0]["empty_rank"] == ref_empty.tolist() and res[1]["empty_rank"] == []
