"""The fused DiDeMo scan (kernels/corpus_scan.py) against its float64 definition and against the eager parts
path of search, on the CPU through Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes."""


import pytest
import torch

from .helpers import triton_interpret  # noqa: E402

with triton_interpret():  # the kernels are decorated at import: interpreted here
    triton = pytest.importorskip("triton")
    from wsra_dist.kernels import didemo_scan_logits, didemo_scan_reference  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_interpreter():
    """And while these tests run (the availability check and the launches read it too)."""
    with triton_interpret():
        yield


def _parts(V, H, M, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return (r(V, H).to(dtype), r(M, 6, V, H).to(dtype), torch.rand(V, 21, M, generator=gen) + 0.5,
            torch.rand(V, 21, generator=gen) + 0.5, r(21, H), r(H), r(H), r(H), r(()))


@pytest.mark.parametrize("V,H,M,dtype", [(1, 8, 1, torch.float32), (37, 20, 2, torch.float32),
                                         (17, 33, 1, torch.float16), (0, 8, 1, torch.float32)])
def test_scan_matches_the_definition_and_the_stores_blocks(V, H, M, dtype):
    from wsra_dist.corpus.store import DidemoChunkStore

    g, local, den, norm, tef, bias, pt, w, c0 = _parts(V, H, M, dtype)
    got = didemo_scan_logits(g, local, den, norm, tef, bias, pt, w, c0)
    ref = didemo_scan_reference(g, local, den, norm, tef, bias, pt, w, c0)
    assert got.shape == (V, 21) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-5 * max(1.0, (float(ref.abs().max()) if ref.numel() else 0.0)))
    if V:  # the eager parts path that search uses without the kernel
        pv = DidemoChunkStore(g, local, den, norm, tef, bias).flat().view(V, 21, H)
        assert torch.allclose(((pv + pt).clamp_min(0) @ w + c0), got, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        didemo_scan_logits(g, local[:, :5], den, norm, tef, bias, pt, w, c0)


def test_search_through_the_scan_ranks_as_the_eager_path(trained_didemo, tmp_path):
    from wsra_dist.corpus.index import CorpusIndex, build_index
    from wsra_dist.corpus.search import Searcher, scan_kernel_applies

    build_index(trained_didemo / "run", [str(trained_didemo / "shards" / "test")], tmp_path / "idx", "fp16")
    eager = Searcher(CorpusIndex.load(tmp_path / "idx"), device="cpu")
    assert not scan_kernel_applies(eager.model, eager._corpus.store, torch.device("cpu"))  # auto: CUDA only
    fused = Searcher(CorpusIndex.load(tmp_path / "idx"), encoder=eager.encoder, device="cpu")
    fused.model.scorer.cfg.pair_kernel = "triton"  # the interpreter stands in for the GPU
    assert scan_kernel_applies(fused.model, fused._corpus.store, torch.device("cpu"))
    q = "a person opens a door"
    a, b = eager.search(q, top_k=10), fused.search(q, top_k=10)
    assert [(m.video, m.start, m.end) for m in a] == [(m.video, m.start, m.end) for m in b]
    assert [m.score for m in a] == pytest.approx([m.score for m in b], abs=1e-5)
