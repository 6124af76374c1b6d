"""SSL loss terms against hand-computed references (explicit loops, no shared helpers).

The losses compute in fp32 whatever their input (by design: bf16 autocast upstream), the references in
Python floats. An fp32 log-softmax of logits of magnitude M is exact to about eps32·M per entry, and
the kernels that evaluate it differ between CPUs, so tolerances are derived from the inputs' magnitude
(``fp32_tol``), not fixed constants that happen to pass on one machine.
"""

import math

import pytest
import torch

from histotx.ssl.centering import Centering, sinkhorn_knopp
from histotx.ssl.losses import DINOLoss, KoLeoLoss, MaskedExpressionLoss, iBOTLoss

EPS32 = 2.0**-23


def fp32_tol(magnitude: float, terms: int = 1) -> float:
    """Absolute error bound, with a safety factor of 8, of an fp32 sum of ``terms`` log-probabilities of
    logits whose magnitude (after the temperature) is at most ``magnitude``."""
    return 8 * EPS32 * max(magnitude, 1.0) * terms


def _softmax(row, temp):
    e = [math.exp(v / temp) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _ce(p_teacher, s_row, temp):
    q = _softmax(s_row, temp)
    return -sum(p * math.log(qq) for p, qq in zip(p_teacher, q, strict=True))


def test_dino_loss_equals_cross_entropy_of_hand_softmaxes():
    g = torch.Generator().manual_seed(0)
    n_global, n_local, batch, k = 2, 3, 4, 7
    student = torch.randn(n_global + n_local, batch, k, generator=g, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(n_global, batch, k, generator=g, dtype=torch.float64) / 0.05, -1)
    got = DINOLoss(student_temperature=0.1)(student, teacher).item()
    total, pairs = 0.0, 0
    for t in range(n_global):
        for s in range(n_global + n_local):
            if s == t:
                continue
            total += sum(_ce(teacher[t, b].tolist(), student[s, b].tolist(), 0.1) for b in range(batch)) / batch
            pairs += 1
    assert pairs == 2 * 5 - 2
    assert got == pytest.approx(total / pairs, abs=fp32_tol(float(student.abs().max()) / 0.1, k))


def test_dino_loss_rejects_unpaired_crops():
    with pytest.raises(ValueError, match="pair"):
        DINOLoss()(torch.zeros(2, 3, 5), torch.zeros(2, 4, 5))


def test_ibot_loss_weights_each_crop_equally():
    g = torch.Generator().manual_seed(1)
    k = 5
    crop_index = torch.tensor([0, 0, 0, 2])  # crop 0: 3 masked tokens, crop 1: none, crop 2: one
    student = torch.randn(4, k, generator=g, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(4, k, generator=g, dtype=torch.float64), -1)
    got = iBOTLoss(0.1)(student, teacher, crop_index, n_crops=3).item()
    ce = [_ce(teacher[i].tolist(), student[i].tolist(), 0.1) for i in range(4)]
    expected = ((ce[0] + ce[1] + ce[2]) / 3 + ce[3]) / 3
    assert got == pytest.approx(expected, abs=fp32_tol(float(student.abs().max()) / 0.1, k))


def test_ibot_loss_without_masked_tokens_is_a_connected_zero():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = iBOTLoss()(student, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), n_crops=4)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


def test_koleo_matches_nearest_neighbour_log_distance():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    got = KoLeoLoss(eps=0.0)(x).item()
    d01, d02, d12 = math.sqrt(2), math.dist([1, 0], [0.6, 0.8]), math.dist([0, 1], [0.6, 0.8])
    expected = -(math.log(min(d01, d02)) + math.log(min(d01, d12)) + math.log(min(d02, d12))) / 3
    assert got == pytest.approx(expected, abs=fp32_tol(1.0, 3))  # unit vectors: log-distances O(1)


def test_koleo_finite_with_duplicates_and_tiny_batches():
    x = torch.tensor([[1.0, 2.0, 3.0]] * 3 + [[0.0, 1.0, 0.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    single = torch.ones(1, 3, requires_grad=True)
    assert KoLeoLoss()(single).item() == 0.0


def test_masked_expression_is_multinomial_nll_over_measured_genes():
    logits = torch.tensor([[0.5, 1.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    offsets = torch.tensor([0, 2, 2, 3])  # token 1 has no counts: ignored
    gene = torch.tensor([0, 2, 1])
    weight = torch.tensor([3.0, 1.0, 5.0])
    panel = torch.tensor([True, True, True, False])  # gene 3 not measured
    got = MaskedExpressionLoss()(logits, offsets, gene, weight, panel).item()

    def logsm(row, keep):
        z = math.log(sum(math.exp(v) for v, m in zip(row, keep, strict=True) if m))
        return [v - z for v in row]

    l0 = logsm(logits[0].tolist(), panel.tolist())
    l2 = logsm(logits[2].tolist(), panel.tolist())
    expected = (-(0.75 * l0[0] + 0.25 * l0[2]) + -(1.0 * l2[1])) / 2
    assert got == pytest.approx(expected, abs=fp32_tol(float(logits.abs().max()), 4))  # computed in fp32


def test_centering_softmax_and_momentum_update():
    c = Centering(3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert torch.allclose(c.softmax(logits, 0.5), torch.softmax(logits / 0.5, -1))
    c.update(logits)
    assert torch.allclose(c.center, torch.full((1, 3), 0.2))  # 0.1 × batch mean 2
    assert torch.allclose(c.softmax(logits, 0.5), torch.softmax((logits - 0.2) / 0.5, -1))


def test_sinkhorn_rows_and_columns():
    g = torch.Generator().manual_seed(3)
    n, k = 12, 4
    q = sinkhorn_knopp(torch.randn(n, k, generator=g), temperature=0.5, n_iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(n), atol=1e-5)  # each sample a distribution
    assert torch.allclose(q.sum(0), torch.full((k,), n / k), atol=1e-3)  # prototypes used equally
    # the default 3 iterations: rows exact, columns close to balanced; and no overflow at low temperature
    q3 = sinkhorn_knopp(torch.randn(n, k, generator=g) * 100, temperature=0.04)
    assert torch.isfinite(q3).all() and torch.allclose(q3.sum(1), torch.ones(n), atol=1e-5)


def test_sinkhorn_matches_the_classic_iteration():
    g = torch.Generator().manual_seed(4)
    logits, temp = torch.randn(10, 6, generator=g, dtype=torch.float64), 0.2
    q = torch.exp(logits / temp).t()
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True)
        q /= 6
        q /= q.sum(dim=0, keepdim=True)
        q /= 10
    expected = (q * 10).t()
    # fp32 log-domain iterations: each of the 2·3 normalisations rounds log q at eps32·max|logits / T|
    tol = 6 * fp32_tol(float(logits.abs().max()) / temp)
    torch.testing.assert_close(sinkhorn_knopp(logits, temp).double(), expected, atol=tol, rtol=tol)
