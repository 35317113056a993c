"""Fused pair-MLP kernels (wsra_dist/kernels) against the float64 eager definition, on the CPU through
Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes; real shapes run in bench/bench_gpu.py on a GPU."""

import pytest
import torch

from .helpers import triton_interpret  # noqa: E402

with triton_interpret():  # the kernels are decorated at import: interpreted here
    triton = pytest.importorskip("triton")
    from wsra_dist.kernels import pair_mlp_logits, pair_mlp_reference, triton_pair_mlp_available  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    """And while these tests run (the availability check and the launches read it too)."""
    with triton_interpret():
        yield


def _inputs(B, T, N, H, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(B, T, H), mk(N, H), mk(H), mk(())


def _check(B, T, N, H, seed=0, mask=None):
    pv, pt, w, c = _inputs(B, T, N, H, seed)
    g = torch.randn(B, T, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if mask is not None:  # masked snippets: what the losses do with padding (zero upstream gradient there)
        g = g * mask.unsqueeze(-1)
    ref_in = [x.clone().requires_grad_() for x in (pv, pt, w, c)]
    ref = pair_mlp_reference(*ref_in)
    ref.backward(g)
    got_in = [x.float().clone().requires_grad_() for x in (pv, pt, w, c)]
    got = pair_mlp_logits(*got_in)
    got.backward(g.float())
    assert got.shape == (B, T, N) and got.dtype == torch.float32
    scale = max(1.0, float(ref.detach().abs().max()))
    assert float((got.detach().double() - ref.detach()).abs().max()) <= 2e-5 * scale
    for name, a, b in zip(("pv", "pt", "w", "c"), got_in, ref_in):
        tol = 2e-5 * max(1.0, float(b.grad.abs().max()))
        assert a.grad is not None and a.grad.shape == b.grad.shape, name
        assert float((a.grad.double() - b.grad).abs().max()) <= tol, name
    return got_in


def test_available_under_the_interpreter():
    assert triton_pair_mlp_available("cpu")


@pytest.mark.parametrize("B, T, N, H", [
    (2, 3, 5, 7),      # nothing a power of 2
    (1, 1, 1, 1),      # T = 1, N = 1, H = 1
    (3, 1, 9, 33),     # T = 1, H just past a tile
    (2, 21, 1, 16),    # N = 1 (one query), DiDeMo's 21 candidates
    (4, 5, 18, 20),    # several tiles on every axis
])
def test_values_and_all_four_gradients(B, T, N, H):
    _check(B, T, N, H)


def test_masked_rows_get_zero_gradient_and_match():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    got = _check(2, 5, 6, 9, seed=3, mask=mask)
    assert float(got[0].grad[0, 3:].abs().max()) == 0.0 and float(got[0].grad[1, 1:].abs().max()) == 0.0


def test_relu_boundary_and_dead_units():
    """pv + pt exactly 0 gets no gradient (as torch's relu), and a hidden unit that is never active
    gets exactly zero gradient in pv, pt and w."""
    pv = torch.zeros(1, 2, 3)
    pt = torch.zeros(2, 3)
    pt[:, 1] = 1.0
    pv[..., 2] = -5.0
    w = torch.ones(3)
    c = torch.zeros(())
    xs = [x.clone().requires_grad_() for x in (pv, pt, w, c)]
    out = pair_mlp_logits(*xs)
    out.sum().backward()
    assert torch.equal(out, torch.ones(1, 2, 2))
    assert xs[0].grad[..., 0].abs().max() == 0 and xs[0].grad[..., 2].abs().max() == 0
    assert torch.equal(xs[2].grad, torch.tensor([0.0, 4.0, 0.0]))


def test_non_contiguous_inputs_and_bad_shapes():
    pv, pt, w, c = (x.float() for x in _inputs(2, 4, 3, 6))
    out = pair_mlp_logits(pv.transpose(0, 1).contiguous().transpose(0, 1), pt.t().contiguous().t(), w, c)
    assert torch.allclose(out, pair_mlp_reference(pv, pt, w, c), atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        pair_mlp_logits(pv, pt[:, :5], w, c)


def test_scorer_uses_the_kernel_where_available_and_matches_eager():
    """The model's depth-1 φ through `model.pair_kernel=triton` equals the eager chunked kernel."""
    from wsra_dist.model import Scorer, ScorerConfig

    torch.manual_seed(0)
    eager = Scorer(ScorerConfig(video_dim=6, text_dim=5, hidden=10, depth=1, pair_kernel="eager"))
    fused = Scorer(ScorerConfig(video_dim=6, text_dim=5, hidden=10, depth=1, pair_kernel="triton"))
    fused.load_state_dict(eager.state_dict())
    v, t = torch.randn(3, 4, 6), torch.randn(7, 5)
    a, b = eager.all_pairs_logits(v, t), fused.all_pairs_logits(v, t)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), q in zip(eager.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), n
