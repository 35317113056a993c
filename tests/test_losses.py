"""Every vectorised WSRA function against the loop-by-loop reference (float64, padded batches)."""

import dataclasses

import pytest
import torch

from wsra_dist import losses as L
from wsra_dist.model import WSRA, ScorerConfig, pool_foreground_background, referring_attention
from wsra_dist.objective import Batch, wsra_objective

from . import reference as R


def make_batch(seed=0, n=9, dv=7, dt=5, tmax=6, n_videos=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, tmax + 1, (n,), generator=g)
    lengths[0] = tmax
    video = torch.randn(n, tmax, dv, generator=g, dtype=torch.float64)
    mask = torch.arange(tmax)[None] < lengths[:, None]
    video = video * mask[..., None]  # padding rows are zero, as the loader writes them
    text = torch.randn(n, dt, generator=g, dtype=torch.float64)
    vids = torch.randint(0, n_videos, (n,), generator=g)
    target = torch.zeros(n, tmax, dtype=torch.float64)
    target[:, 0] = 1
    return Batch(video, mask, text, vids, target)


def make_model(dv=7, dt=5, seed=0, **kw):
    torch.manual_seed(seed)
    return WSRA(ScorerConfig(video_dim=dv, text_dim=dt, hidden=8, depth=2, **kw)).double()


@pytest.mark.parametrize("norm", ["l2", "none"])
def test_phi_fused_equals_concatenation(norm):
    b = make_batch()
    m = make_model(input_norm=norm)
    fused = m.scorer.all_pairs(b.video, b.text)
    naive = m.scorer.all_pairs_naive(b.video, b.text)
    torch.testing.assert_close(fused, naive, rtol=0, atol=1e-12)
    for (i, t, q) in [(0, 0, 0), (3, 1, 7), (8, 1, 2)]:
        assert abs(float(fused[i, t, q]) - R.phi(m.scorer, b.video[i, t], b.text[q])) < 1e-12


def test_phi_chunked_and_recomputed_equal_plain():
    b = make_batch()
    m = make_model()
    ref = m.scorer.all_pairs(b.video, b.text)
    m.scorer.cfg.query_chunk, m.scorer.cfg.recompute = 4, True
    v = b.video.clone().requires_grad_()
    out = m.scorer.all_pairs(v, b.text)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    out.sum().backward()
    g1 = v.grad.clone()
    v.grad = None
    m.scorer.cfg.query_chunk, m.scorer.cfg.recompute = 0, False
    m.scorer.all_pairs(v, b.text).sum().backward()
    torch.testing.assert_close(g1, v.grad, rtol=1e-12, atol=1e-12)


def test_attention_and_pooling_match_reference():
    b = make_batch()
    m = make_model()
    out = m(b.video, b.mask, b.text)
    for i in range(b.video.shape[0]):
        T = int(b.mask[i].sum())
        sc = [R.phi(m.scorer, b.video[i, t], b.text[i]) for t in range(T)]
        a = R.attention(sc)
        fg, bg = R.fg_bg(b.video[i, :T], a)
        assert torch.allclose(out.alpha[i, :T], torch.tensor(a, dtype=torch.float64), atol=1e-12)
        assert float(out.alpha[i, T:].abs().sum()) == 0.0
        assert torch.allclose(out.fg[i], fg, atol=1e-12)
        assert torch.allclose(out.bg[i], bg, atol=1e-12)


def test_background_uses_valid_length():
    v = torch.ones(1, 4, 2, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    alpha = referring_attention(torch.zeros(1, 4, dtype=torch.float64), mask)
    fg, bg = pool_foreground_background(v, alpha, mask)
    # α = 1/3 on 3 valid snippets: v_b = (3 * 2/3) / (3 - 1) = 1
    torch.testing.assert_close(fg, torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(bg, torch.ones(1, 2, dtype=torch.float64))


CONFIGS = [
    L.LossConfig(w_cross=1.0),
    L.LossConfig(w_cross=1.0, tau=3.0, margin=0.3, k_top=2, k_last=1, snippet_negatives="sum",
                 snippet_videos="sum", gamma_denominator="others", cross_negatives="hard"),
    L.LossConfig(w_cross=1.0, k_top=1, k_last=0, self_in_top_k=True, snippet_negatives="in_log"),
    L.LossConfig(w_cross=1.0, beta_normalize=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_all_terms_equal_reference(cfg, seed):
    b = make_batch(seed=seed, n=12, n_videos=6)
    m = make_model(seed=seed)
    out = wsra_objective(m, b, cfg)
    videos = [b.video[i, : int(b.mask[i].sum())] for i in range(12)]
    ref = R.wsra_terms(m.scorer, videos, b.text, b.video_id.tolist(), cfg)
    for k in ("video", "snippet", "batch", "cross"):
        assert abs(float(out.terms[k]) - ref[k]) < 1e-10, (k, float(out.terms[k]), ref[k])
    for i, s in enumerate(ref["_samp"]):
        assert set(out.negatives.hard[i].nonzero().flatten().tolist()) == s["hard"]
        assert set(out.negatives.pseudo[i].nonzero().flatten().tolist()) == s["pseudo"]
        assert set(out.negatives.easy[i].nonzero().flatten().tolist()) == s["easy"]
        assert int(out.negatives.pseudo_positive[i]) == s["first"]


def test_local_shares_sum_to_global():
    """The same functions on row slices sum to the whole-batch value (what N processes compute)."""
    b = make_batch(n=12, n_videos=6)
    m = make_model()
    cfg = L.LossConfig(w_cross=1.0)
    whole = wsra_objective(m, b, cfg)

    # Split by computing each term directly on slices of the global tensors.
    out = m(b.video, b.mask, b.text)
    s_pos = m.scorer.pair(out.fg, b.text)
    s_neg = m.scorer.pair(out.bg, b.text)
    tn = torch.nn.functional.normalize(b.text, dim=-1)
    neg = L.sample_negatives(tn @ tn.T, b.video_id, cfg.k_top, cfg.k_last)
    parts = {"video": 0.0, "snippet": 0.0, "batch": 0.0}
    for sl in (slice(0, 5), slice(5, 12)):
        parts["video"] += float(L.video_loss(s_pos, s_neg, sl, cfg.tau, cfg.margin))
        phi_all = m.scorer.all_pairs(b.video[sl], b.text)
        pos = torch.arange(sl.start, sl.stop)
        parts["snippet"] += float(L.snippet_loss(phi_all, b.mask[sl], pos, neg.hard[sl], 12, cfg.tau, cfg.margin))
        parts["batch"] += float(L.batch_loss(out.fg, out.bg, tn @ tn.T, neg.pseudo_positive, b.video_id, sl, cfg.tau, cfg.margin))
    for k, v in parts.items():
        assert abs(v - float(whole.terms[k])) < 1e-12


def test_log1p_sum_exp_is_stable():
    z = torch.tensor([1000.0, 999.0, -1000.0], dtype=torch.float64)
    val = L.log1p_sum_exp(z, dim=0)
    assert torch.isfinite(val) and abs(float(val) - (1000 + torch.log1p(torch.exp(torch.tensor(-1.0))).item())) < 1e-9
    assert float(L.log1p_sum_exp(torch.tensor([-1e4], dtype=torch.float64), dim=0)) == pytest.approx(0.0, abs=1e-300)
    empty = L.log1p_sum_exp(torch.tensor([1.0, 2.0]), torch.tensor([False, False]), dim=0)
    assert float(empty) == 0.0


def test_gradcheck_losses():
    torch.manual_seed(0)
    n, T = 6, 4
    vids = torch.tensor([0, 0, 1, 2, 3, 4])
    phi_all = torch.rand(2, T, n, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    hard = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    pos = torch.tensor([0, 1])
    for neg in ("mean", "sum", "in_log"):
        assert torch.autograd.gradcheck(lambda p: L.snippet_loss(p, mask, pos, hard, n, 2.0, 0.1, neg), (phi_all,))
    sp = torch.rand(n, dtype=torch.float64, requires_grad=True)
    sn = torch.rand(n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: L.video_loss(a, b, slice(0, 3), 1.5, 0.1), (sp, sn))
    fg = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    bg = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    tc = torch.rand(n, n, dtype=torch.float64)
    pp = torch.tensor([2, 3, 0, 1, 5, 4])
    assert torch.autograd.gradcheck(lambda a, b: L.batch_loss(a, b, tc, pp, vids, slice(0, n), 2.0, 0.1), (fg, bg))
    pf = torch.rand(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: L.cross_video_loss(p, pos, hard, n, 5.0, 0.2), (pf,))
    lg = torch.randn(2, T, dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: L.supervised_loss(x, mask, tgt, n), (lg,))


def test_sampler_hand_built_ties_and_same_video():
    # 6 queries; queries 0 and 1 describe the same video.
    vids = torch.tensor([7, 7, 8, 9, 10, 11])
    sim = torch.tensor([
        [1.0, 0.9, 0.5, 0.5, 0.2, 0.1],
        [0.9, 1.0, 0.3, 0.8, 0.8, 0.0],
        [0.5, 0.3, 1.0, 0.4, 0.4, 0.4],
        [0.5, 0.8, 0.4, 1.0, 0.6, 0.2],
        [0.2, 0.8, 0.4, 0.6, 1.0, 0.3],
        [0.1, 0.0, 0.4, 0.2, 0.3, 1.0],
    ])
    neg = L.sample_negatives(sim, vids, k_top=1, k_last=1)
    # Query 0: candidates 2,3 (tie 0.5: batch order), 4, 5; query 1 (same video, 0.9) never counts.
    assert neg.pseudo[0].nonzero().flatten().tolist() == [2]
    assert neg.hard[0].nonzero().flatten().tolist() == [3, 4]
    assert neg.easy[0].nonzero().flatten().tolist() == [5]
    assert int(neg.pseudo_positive[0]) == 2
    # Query 1: 3 and 4 tie at 0.8 -> 3 is pseudo-positive; 0 is its own video.
    assert neg.pseudo[1].nonzero().flatten().tolist() == [3]
    assert not neg.hard[1, 0] and not neg.pseudo[1, 0] and not neg.easy[1, 0]
    assert neg.easy[1].nonzero().flatten().tolist() == [5]
    # Query 2: 3, 4, 5 tie at 0.4 between 0 (0.5) and 1 (0.3): order kept, all three hard.
    assert neg.pseudo[2].nonzero().flatten().tolist() == [0]
    assert neg.hard[2].nonzero().flatten().tolist() == [3, 4, 5]
    assert neg.easy[2].nonzero().flatten().tolist() == [1]
    # self_in_top_k: K_top = 1 is filled by the query itself, nothing else removed at the top.
    neg2 = L.sample_negatives(sim, vids, k_top=1, k_last=1, self_in_top_k=True)
    assert not neg2.pseudo.any() and int(neg2.pseudo_positive[0]) == 2
    assert neg2.hard[0].nonzero().flatten().tolist() == [2, 3, 4]
    # Never a negative or pseudo-positive of its own video.
    same = vids[:, None] == vids[None, :]
    assert not (neg.hard & same).any() and not (same.gather(1, neg.pseudo_positive[:, None])).any()


def test_sampler_too_small_batch_names_numbers():
    vids = torch.tensor([0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"5 queries, K_top=3, K_last=2.*query 0 has 3 queries of other videos"):
        L.sample_negatives(torch.rand(5, 5), vids, 3, 2)


def test_loss_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="snippet_negatives"):
        dataclasses.replace(L.LossConfig(), snippet_negatives="max").validate()


def test_pair_mlp_kernel_matches_autograd_and_gradcheck():
    from wsra_dist.model import _PairMLP1

    b = make_batch(n=5)
    torch.manual_seed(3)
    m = WSRA(ScorerConfig(video_dim=7, text_dim=5, hidden=6, depth=1, fused_kernel=True)).double()
    ref = WSRA(ScorerConfig(video_dim=7, text_dim=5, hidden=6, depth=1, fused_kernel=False)).double()
    ref.load_state_dict(m.state_dict())
    for model in (m, ref):
        model.scorer.all_pairs(b.video, b.text).pow(2).sum().backward()
    for (n1, p1), (_, p2) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12, msg=n1)
    pv = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    pt = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    c = torch.randn((), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b_, w_, c_: _PairMLP1.apply(a, b_, w_, c_, 2), (pv, pt, w, c))
