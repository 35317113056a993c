"""Ground free-text queries in one video's features with a trained checkpoint.

    from wsra_dist.ground import load_model
    g = load_model("runs/demo/run")
    g.ground(features, ["a man opens the door"], duration=30.0)

DiDeMo-trained checkpoints take the video's (6, D) chunk features and rank the 21 chunk moments;
snippet-trained (Charades-STA) checkpoints take (T, D) snippets and rank WSRA's proportional windows.
The text encoder and pooling are the ones recorded in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.features_manifest import describe_extractor, manifest_path, read_manifest, same_extractor
from .data.records import DataError
from .geometry import DIDEMO_CANDIDATES, benchmark_windows, window_features, window_snippet_range
from .evaluation.formats import scored_windows
from .evaluation.predict import load_run


def read_features(spec: str) -> np.ndarray:
    """`VIDEO.npy` or `FILE.h5:KEY` (the key may contain dots and colons; the split is at the first ':' after .h5).

    Checked here: the file and key exist, the array is numeric, 2-D ((T, D), or (T, 1, 1, D) as some I3D
    releases store it) with T >= 1, and finite."""
    where = spec
    path, key = split_spec(spec)
    if key is not None:
        import h5py

        if not path.is_file():
            raise DataError(f"{path}: no such HDF5 features file")
        try:
            with h5py.File(path, "r") as f:
                node = f.get(key)
                if not isinstance(node, h5py.Dataset):
                    some = ", ".join(repr(k) for k in list(f.keys())[:3])
                    raise DataError(f"{path}: no dataset {key!r}" + (f" (it holds e.g. {some})" if some else " (empty file)"))
                x = np.asarray(node[()])
        except OSError as e:
            raise DataError(f"{path}: cannot read HDF5: {e}") from None
    else:
        if not Path(spec).is_file():
            raise DataError(f"{spec}: no such features file (VIDEO.npy or FILE.h5:KEY)")
        try:
            x = np.load(spec, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{spec}: not a numeric .npy array: {e}") from None
        if not isinstance(x, np.ndarray):
            raise DataError(f"{spec}: holds several arrays (.npz); give one (T, D) array")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where}: dtype {x.dtype} is not a real number type")
    if x.ndim == 4 and x.shape[1:3] == (1, 1):
        x = x.reshape(x.shape[0], x.shape[3])
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise DataError(f"{where}: features of shape {x.shape}, expected (T, D) with T >= 1")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: features contain NaN or inf")
    return x


def check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        queries = [queries]
    if not queries:
        raise DataError("give at least one query")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"query {i + 1} is empty")
    return [q.strip() for q in queries]


def check_duration(duration: float | None) -> float | None:
    if duration is None:
        return None
    if not (np.isfinite(duration) and duration > 0):
        raise DataError(f"--duration must be a positive number of seconds, got {duration}")
    return float(duration)


def check_fps(fps: float | None) -> float | None:
    if fps is None:
        return None
    if not (np.isfinite(fps) and fps > 0):
        raise DataError(f"--fps must be a positive number of snippets per second, got {fps}")
    return float(fps)


ASK_TIME = "--fps SNIPPETS_PER_SECOND or --duration SECONDS"  # what `ground` offers; `index` has no --duration


def snippet_length(rows: int, duration: float | None, fps: float | None, ask: str = ASK_TIME) -> float:
    """The video's length in seconds for `rows` snippet features: `duration`, else rows / fps.

    Never assumed (a snippet used to be taken as 1 s, so features at 2 fps put moments past the video's end).
    With both, they must agree to one snippet: `wsra-dist features` makes ceil(duration x fps) rows, other
    extractors floor or round."""
    fits = fps is None or duration is None or (rows - 1) / fps - 1e-6 <= duration <= (rows + 1) / fps + 1e-6
    if not fits:
        given = "--duration" if ask == ASK_TIME else "the recorded duration"
        raise DataError(f"{given} {duration:g} s does not fit the features: {rows} snippets at {fps:g} per second "
                        f"cover {rows / fps:g} s (the video's length is expected within one snippet of it)")
    if duration is not None:
        return duration
    if fps is not None:
        return rows / fps
    raise DataError("these snippet features do not say how long the video is (no features manifest of "
                    f"`wsra-dist features` beside them): give {ask}")


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`FILE.h5:KEY` -> (FILE.h5, KEY); `VIDEO.npy` -> (VIDEO.npy, None).  The split is at the first ':' after
    .h5 / .hdf5: keys may contain dots and colons."""
    low = spec.lower()
    for ext in (".h5:", ".hdf5:"):
        i = low.find(ext)
        if i >= 0:
            return Path(spec[: i + len(ext) - 1]), spec[i + len(ext):]
    return Path(spec), None


@dataclass(frozen=True)
class FeatureTiming:
    """The time axis `--features` carry: snippets per second and the video's length, when known."""

    fps: float | None = None
    duration: float | None = None  # seconds, as the features manifest records the video


def features_timing(spec: str, info: dict, rows: int, fps: float | None = None,
                    duration: float | None = None, ask: str = ASK_TIME) -> FeatureTiming:
    """The time axis of `--features SPEC` (`rows` stored rows) for a checkpoint with `info`.

    From the features manifest that `wsra-dist features` wrote beside them (OUT/manifest.json for a folder of
    .npy, FILE.h5.manifest.json for an HDF5), else from `fps` (--fps).  Refused in one line: features whose
    manifest records another extractor than the checkpoint's (model, weights, fps, pooling, layout, dim), a
    video the manifest does not list or lists with another row count, --fps unlike the manifest's or the
    checkpoint's extractor's, --fps for a DiDeMo checkpoint (its chunks are 5 s by the layout), and snippet
    features with no manifest, no --fps and no `duration` (--duration)."""
    fps = check_fps(fps)
    if fps is not None and info.get("benchmark") == "didemo":
        tail = "; give --duration for a video shorter than 30 s" if ask == ASK_TIME else ""
        raise DataError(f"--fps: a DiDeMo checkpoint reads 5-s chunks, whose time is fixed by the layout{tail}")
    path, key = split_spec(spec)
    source = path if key is not None else path.parent  # an HDF5, or the folder of a charades-layout .npy
    manifest = read_manifest(source)
    trained = info.get("extractor") if isinstance(info.get("extractor"), dict) else None
    if manifest is None:
        if fps is None and duration is None and info.get("benchmark") != "didemo":
            raise DataError(f"{spec}: no features manifest of `wsra-dist features` ({manifest_path(source)}) says "
                            f"how many seconds a snippet covers: give {ask}")
        _check_fps_against(fps, trained)
        return FeatureTiming(fps=fps)
    return _manifest_timing(spec, manifest, manifest_path(source), key or path.stem, rows, fps, trained)


def _manifest_timing(spec: str, manifest: dict, where: Path, key: str, rows: int, fps: float | None,
                     trained: dict | None) -> FeatureTiming:
    made = manifest["extractor"]
    if trained is not None and not same_extractor(trained, made):
        raise DataError(f"{spec}: features made by {describe_extractor(made)} (features manifest {where}), but the "
                        f"checkpoint was trained on features of {describe_extractor(trained)}; extract them with "
                        "the checkpoint's extractor, or give the raw video with --video")
    videos = manifest["videos"]
    rec = videos.get(key) or videos.get(key.split("/")[0])  # activitynet layout: KEY is VIDEO/c3d_features
    if not isinstance(rec, dict):
        raise DataError(f"{spec}: video {key!r} is not listed in the features manifest {where}: these features "
                        "were not written by that `wsra-dist features` run")
    if rec.get("T") is not None and int(rec["T"]) != rows:
        raise DataError(f"{spec}: holds {rows} rows but the features manifest {where} lists {rec['T']} for this "
                        "video: the file changed after extraction")
    made_fps = float(made["fps"]) if made.get("fps") else None
    if fps is not None and made_fps is not None and fps != made_fps:
        raise DataError(f"--fps {fps:g}: the features manifest {where} records {made_fps:g} snippets per second "
                        "for these features")
    duration = rec.get("duration")
    return FeatureTiming(fps=made_fps or fps, duration=float(duration) if duration else None)


def _check_fps_against(fps: float | None, trained: dict | None) -> None:
    """--fps must be the rate the checkpoint's features were extracted at, when it records one."""
    trained_fps = trained.get("fps") if trained and not isinstance(trained.get("concat"), list) else None
    if fps is not None and trained_fps and float(trained_fps) != fps:
        raise DataError(f"--fps {fps:g}: the checkpoint was trained on features of {describe_extractor(trained)}; "
                        "features at another rate are not what it learnt")


@dataclass
class Grounder:
    model: torch.nn.Module
    info: dict
    device: torch.device
    _encoder: object = None
    text_model: str | None = None  # a local folder overriding the recorded text model

    @property
    def encoder(self):
        if self._encoder is None:
            from .data.text import TextEncoder

            t = self.info.get("text") or {}
            if not t:
                raise DataError("this checkpoint records no text model; it cannot encode free text")
            name = self.text_model or t.get("model")
            try:
                enc = TextEncoder(name, t.get("pooling", "layers_mean"), max_length=t.get("max_length", 64))
            except FileNotFoundError as e:
                raise DataError(f"{e}; the checkpoint was trained with text model {t.get('model')!r}: give its local "
                                "folder with --text-model PATH") from None
            if enc.dim != self.info["dims"]["text"]:
                raise DataError(f"text model {name} gives {enc.dim}-d features but the checkpoint expects "
                                 f"{self.info['dims']['text']}-d")
            if t.get("identity") and enc.identity != t["identity"]:
                raise DataError(f"text model at {enc.path} differs from the one the checkpoint was trained with "
                                 f"({t.get('model')}, identity {t['identity']} != {enc.identity})")
            self._encoder = enc
        return self._encoder

    def _candidates(self, feats: np.ndarray, duration: float | None, fps: float | None = None):
        """-> (candidate features (C, D), moments in seconds (C, 2), snippet features for α, snippet times)."""
        bench = self.info.get("benchmark")
        reader = self.info.get("reader", {})
        if bench == "didemo":
            from .geometry import didemo_candidates_from_chunks

            layout = self.info.get("layout") or {"modalities": [feats.shape[-1]], "tef": reader.get("tef", False)}
            mdims = tuple(int(d) for d in layout["modalities"])
            if feats.ndim != 2 or feats.shape != (6, sum(mdims)):
                raise DataError(f"a DiDeMo checkpoint takes (6, {sum(mdims)}) chunk features (feature files "
                                f"{'+'.join(map(str, mdims))} side by side), got {feats.shape}")
            cand = didemo_candidates_from_chunks(torch.from_numpy(feats).double(), mdims,
                                                 bool(layout.get("tef", False))).float().numpy()
            length = duration or 30.0
            if length <= 20.0 or length > 30.0:  # DiDeMo videos have 5 or 6 five-second chunks
                raise DataError(f"--duration {length:g} (given, or the video's length): a DiDeMo video lasts more "
                                "than 20 and at most 30 s (6 chunks of 5 s, the last ones may be empty)")
            moments = np.array([[5.0 * s, min(5.0 * (e + 1), length)] for s, e in DIDEMO_CANDIDATES])
            singles = cand[:6]
            times = np.array([[5.0 * k, min(5.0 * (k + 1), length)] for k in range(6)])
            return cand, moments, singles, times
        if feats.ndim == 4:
            feats = feats.reshape(feats.shape[0], -1)
        length = snippet_length(feats.shape[0], duration, fps)  # from the stored rows, before any resampling
        if reader.get("resample"):
            from .data.charades import resample

            feats = resample(feats, int(reader["resample"]))
        T = feats.shape[0]
        wins = benchmark_windows(bench, length)  # the windows evaluate ranks (Charades-STA's or ActivityNet's)
        times = np.stack([np.arange(T) * length / T, (np.arange(T) + 1) * length / T], 1)
        return window_features(feats, wins, length), wins, feats, times

    def _calibrated(self, rank_l: torch.Tensor, text: torch.Tensor, snippets: np.ndarray, moments: np.ndarray,
                    times: np.ndarray) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Per query: (the values its candidates are ranked by under the checkpoint's model.scale_calibration, as
        evaluate ranks them (evaluation/predict.py), those candidates (C, 2) in seconds).  rank_l (Q, C): the
        values without calibration; span puts each query's best span first (predict.with_span)."""
        from .evaluation.predict import with_span
        from .scale_calibration import DIDEMO_GROUPS, calibrate, inside_outside, window_groups

        mode = getattr(self.model, "scale_calibration", "none")
        if mode == "none":
            return [(r, moments) for r in rank_l]
        bench = self.info.get("benchmark")
        length = float(times[-1, 1])
        groups = torch.tensor(DIDEMO_GROUPS) if bench == "didemo" else window_groups(bench, length)
        if mode in ("contrast", "span"):  # φ of each snippet, then inside vs outside each window / the masses
            sn = torch.from_numpy(np.ascontiguousarray(snippets)).to(self.device)
            sl = self.model.scorer.pair_logits(sn.unsqueeze(0), text.unsqueeze(1))  # (Q, T)
            ranges = torch.tensor([window_snippet_range(a, b, length, sn.shape[0]) for a, b in moments])
            if mode == "contrast":
                return [(inside_outside(q, ranges, self.model.contrast_weight), moments) for q in sl]
            return [with_span(q, ranges, moments, groups, length, self.model.span_threshold,
                              getattr(self.model, "span_band", 0.0))[:2] for q in sl]
        return [(r, moments) for r in calibrate(mode, rank_l, groups, self.model.scale_stats)]

    @torch.inference_mode()
    def ground(self, features: np.ndarray, queries: Sequence[str], duration: float | None = None,
               top_k: int = 5, fps: float | None = None) -> list[dict]:
        """Top moments (seconds) with scores per query, best first; also α and φ over the snippets/chunks and
        every candidate's moment and score ("candidate_moments", "candidate_scores": what figures.py draws).

        Snippet features need their time axis: `duration` (the video's seconds) or `fps` (snippets per second,
        the video then lasts T / fps), both when known (they must agree to one snippet); never assumed.
        DiDeMo's chunks are 5 s by the layout (`duration` defaults to 30 s)."""
        queries = check_queries(queries)
        duration = check_duration(duration)
        fps = check_fps(fps)
        if int(top_k) < 1:
            raise DataError(f"--top-k must be >= 1, got {top_k}")
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] < 1 or not np.isfinite(feats).all():
            raise DataError(f"features must be a finite (T, D) array with T >= 1, got shape {feats.shape}")
        cand, moments, snippets, times = self._candidates(feats, duration, fps)
        if cand.shape[1] != self.info["dims"]["video"]:
            raise DataError(f"features give {cand.shape[1]}-d candidates but the checkpoint expects "
                             f"{self.info['dims']['video']}-d")
        text = torch.from_numpy(self.encoder.encode(list(queries))).to(self.device)
        c = torch.from_numpy(cand).to(self.device)
        logits_t = self.model.scorer.pair_logits(c.unsqueeze(0), text.unsqueeze(1))  # (Q, C) in candidate space
        scores_t = torch.sigmoid(logits_t)
        # what evaluate ranks by (DiDeMo with model.chunk_consistency: WSRA.rank_logits; else φ itself), ordered by
        # the logits: a float32 sigmoid saturates at 1 for confident candidates
        ranked = self._calibrated(self.model.rank_logits(logits_t).double(), text, snippets, moments, times)
        if self.info.get("benchmark") == "didemo":  # Eq. 2 over the 6 single-chunk candidates
            phi = scores_t[:, :6].cpu().numpy()  # φ per chunk: the single-chunk candidates' scores
            alpha = torch.softmax(self.model.attention_scale * scores_t[:, :6], -1).cpu().numpy()
        else:
            sn = torch.from_numpy(np.ascontiguousarray(snippets)).to(self.device)
            mask = torch.ones(len(queries), sn.shape[0], dtype=torch.bool, device=self.device)
            o = self.model(sn.expand(len(queries), -1, -1), mask, text)
            alpha, phi = o.alpha.cpu().numpy(), o.scores.cpu().numpy()
        out = []
        mu = self.model.chunk_consistency if self.model.didemo is not None else 0.0
        for q, (v, mq), a, p in zip(queries, ranked, alpha, phi):
            k, s = v.double().cpu().numpy(), torch.sigmoid(v.double()).cpu().numpy()
            order = np.argsort(-k, kind="stable")[:top_k]
            out.append({"query": q, "moments": [[round(float(mq[i, 0]), 3), round(float(mq[i, 1]), 3)] for i in order],
                        "scores": [float(s[i]) for i in order], "alpha": a.tolist(), "snippet_times": times.tolist(),
                        # what figures.py draws (the CLI's --json leaves these out)
                        "phi": p.tolist(), "candidate_moments": np.round(mq, 3).tolist(),
                        "candidate_scores": s.tolist(), "chunk_consistency": mu})
        return out


def load_model(run_dir: str | Path, device: str | None = None, text_model: str | None = None) -> Grounder:
    """Load a trained run folder for grounding."""
    import json

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_run(run_dir, dev)
    manifest_reader = json.loads((Path(run_dir) / "wsra_model.json").read_text()).get("reader", {})
    info["reader"] = manifest_reader
    return Grounder(model, info, dev, text_model=text_model)


def plot_attention(results: list[dict], path: str | Path,
                   truths: Sequence[tuple[float, float] | None] | None = None, benchmark: str | None = None) -> None:
    """The paper's Figure 7 (`--plot`): φ, α, top-k moments and ground truth per query; PNG/PDF/SVG by extension.

    Drawn by `figures.save_grounding` (matplotlib is imported there, only when a plot is asked for)."""
    from .figures import save_grounding

    save_grounding(results, path, truths, benchmark)


def ground_cli(checkpoint, features: str | None, queries: list[str], duration, top_k: int, plot, truths: list[str],
               text_model: str | None = None, video: str | None = None, video_model: str | None = None,
               fps: float | None = None) -> list[dict]:
    """`wsra-dist ground`: the inputs checked before the model is loaded, then the ranked moments per query."""
    if (features is None) == (video is None):
        raise DataError("give exactly one of --features (precomputed features) and --video (a raw video file)")
    if video is not None and fps is not None:
        raise DataError("--fps is for --features; --video extracts at the rate the checkpoint records")
    queries = check_queries(queries)
    duration = check_duration(duration)
    fps = check_fps(fps)
    if top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {top_k}")
    if plot and Path(plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise DataError(f"--plot {plot}: give a .png, .pdf or .svg file name")
    if len(truths) > len(queries):
        raise DataError(f"{len(truths)} --truth spans for {len(queries)} queries")
    spans = []
    for t in truths:
        try:
            s, e = (float(x) for x in t.split(","))
        except ValueError:
            raise DataError(f"--truth {t!r}: expected START,END in seconds") from None
        if not (np.isfinite(s) and np.isfinite(e) and 0 <= s <= e):
            raise DataError(f"--truth {t!r}: expected 0 <= START <= END, finite seconds")
        spans.append((s, e))
    g = load_model(checkpoint, text_model=text_model)
    if video is not None:  # the checkpoint's own extractor (wsra-dist features) on the raw video
        from .video.pipeline import checkpoint_features

        feats, seconds = checkpoint_features(g.info, video, video_model)
        duration = duration or seconds
    else:
        feats = read_features(features)
        timing = features_timing(features, g.info, feats.shape[0], fps, duration)  # never an assumed 1 s per snippet
        duration, fps = duration or timing.duration, timing.fps
    res = g.ground(feats, queries, duration, top_k, fps=fps)
    if plot:
        plot_attention(res, plot, spans, g.info.get("benchmark"))
    # pred_relevant_windows: the same ranking in the moment_detr / lighthouse format ([start, end, score], seconds)
    return [{"query": r["query"], "moments": r["moments"], "scores": r["scores"],
             "pred_relevant_windows": scored_windows(r["moments"], r["scores"])} for r in res]
