"""Packed variable-length attention: every backend against the per-sample reference.

Backends sum in different orders (and the order depends on the CPU's kernels), so CPU equivalences are
checked in float64 with tolerances near its precision; the GPU test compares bf16 kernels at bf16's.
"""

from __future__ import annotations

import pytest
import torch

from histotx.model.attention import PackedSeq, attend, resolve_backend, xformers_usable

LENGTHS = [5, 1, 37, 12, 37]


def random_qkv(lengths, heads=3, dim=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), 3, heads, dim, generator=g, dtype=torch.float32).to(device, dtype)


def run(qkv, lengths, backend):
    qkv = qkv.detach().clone().requires_grad_(True)
    out = attend(qkv, PackedSeq(lengths, qkv.device, backend))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * grad_out).sum().backward()
    return out.detach(), qkv.grad


@pytest.mark.parametrize("lengths", [LENGTHS, [16, 16, 16]])
@pytest.mark.parametrize("backend", ["sdpa", "loop"])
def test_packed_matches_reference_outputs_and_gradients(lengths, backend):
    qkv = random_qkv(lengths)
    out, grad = run(qkv, lengths, backend)
    ref_out, ref_grad = run(qkv, lengths, "reference")
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=1e-10)


def test_reference_attends_within_each_sample_only():
    qkv = random_qkv(LENGTHS)
    out = attend(qkv, PackedSeq(LENGTHS, "cpu", "reference"))
    # the third sample alone gives the same rows
    start = sum(LENGTHS[:2])
    alone = attend(qkv[start : start + LENGTHS[2]], PackedSeq([LENGTHS[2]], "cpu", "reference"))
    torch.testing.assert_close(out[start : start + LENGTHS[2]], alone, atol=0, rtol=0)
    # and is an explicit softmax(q kᵀ / √d) v
    q, k, v = qkv[start : start + LENGTHS[2]].unbind(1)
    weights = torch.einsum("ihd,jhd->hij", q, k).div(8**0.5).softmax(-1)
    torch.testing.assert_close(alone, torch.einsum("hij,jhd->ihd", weights, v), atol=1e-10, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_reference_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    qkv = random_qkv(LENGTHS)
    with torch.no_grad():
        out = attend(qkv, PackedSeq(LENGTHS, "cpu", "flex"))
        ref = attend(qkv, PackedSeq(LENGTHS, "cpu", "reference"))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu"), uniform=True) == "sdpa"
    assert resolve_backend("auto", torch.device("cpu"), uniform=False) == "loop"
    assert PackedSeq([3, 3], "cpu").backend == "sdpa" and PackedSeq([3, 4], "cpu").backend == "loop"
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("fastest", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one token"):
        PackedSeq([3, 0], "cpu")
    with pytest.raises(ValueError, match="tokens"):
        attend(random_qkv([4]), PackedSeq([5], "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["xformers", "flex"])
def test_gpu_backends_match_sdpa_in_bf16(backend):
    if backend == "xformers" and not xformers_usable():
        pytest.skip("xformers kernels do not run on this GPU / torch build")
    lengths = [197, 3333, 1, 600]
    qkv = random_qkv(lengths, heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    out, grad = run(qkv, lengths, backend)
    ref_out, ref_grad = run(qkv, lengths, "sdpa")
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=3e-2, rtol=3e-2)
    assert resolve_backend("auto", torch.device("cuda")) == ("xformers" if xformers_usable() else "sdpa")
