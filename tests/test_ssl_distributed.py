"""Teacher normalisation under torch.distributed (gloo, 2 ranks) equals the single-process result
on the concatenated batch, also when one rank has no rows."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from histotx.ssl.centering import Centering, sinkhorn_knopp

K = 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(9, K, generator=g)
    masked = torch.randn(5, K, generator=g)
    return full, [full[:4], full[4:]], masked, [masked, masked[:0]]  # rank 1 has no masked tokens


def _worker(rank, world, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, parts, _, masked_parts = _inputs()
        centering = Centering(K, momentum=0.5)
        centering.update(parts[rank])
        out = {
            "center": centering.center.clone(),
            "sinkhorn": sinkhorn_knopp(parts[rank], 0.1),
            "sinkhorn_masked": sinkhorn_knopp(masked_parts[rank], 0.1),
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_centering_and_sinkhorn_are_global_over_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    full, _, masked, _ = _inputs()
    reference = Centering(K, momentum=0.5)
    reference.update(full)
    # Only the order of the fp32 sums over rows differs (per rank, then all-reduced, vs all at once): each
    # sum of N rows is exact to ~N·eps32 relative, and Sinkhorn takes 3 of them per iteration chain.
    eps32, n = 2.0**-23, full.shape[0]
    tol = 4 * n * eps32
    torch.testing.assert_close(r0["center"], reference.center, rtol=tol, atol=tol)
    torch.testing.assert_close(r1["center"], reference.center, rtol=tol, atol=tol)
    # Sinkhorn: the reordered sum moves log q by ~N·eps32 per normalisation, and values of log q up to
    # M = max|x|/T round at ~M·eps32 once they differ: 3 iterations × 2 normalisations, safety factor 2.
    sinkhorn_tol = 2 * 3 * 2 * (n + float(full.abs().max() / 0.1)) * eps32
    torch.testing.assert_close(
        torch.cat([r0["sinkhorn"], r1["sinkhorn"]]), sinkhorn_knopp(full, 0.1), atol=sinkhorn_tol, rtol=sinkhorn_tol
    )
    assert r1["sinkhorn_masked"].shape == (0, K)
    torch.testing.assert_close(r0["sinkhorn_masked"], sinkhorn_knopp(masked, 0.1), atol=sinkhorn_tol, rtol=sinkhorn_tol)
