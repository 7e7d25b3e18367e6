"""Region proposals for R-CNN and the proposal-recall claim: selective search (Uijlings
et al. 2013; OpenCV's fast and quality modes) and EdgeBoxes (Zitnick & Dollar 2014),
cached on disk.

EdgeBoxes needs an edge map and an orientation map. The structured-edge model usually
used for both (``model.yml.gz``) cannot be had offline, so the edges here are the
gradient magnitude of the smoothed grey image kept on Canny's thinned edge pixels (Canny's
non-maximum suppression does what structured edges' NMS would), and the orientation comes
from the second derivatives of the smoothed magnitude (the formula of OpenCV's
``StructuredEdgeDetection::computeOrientation``). Expect lower recall than with
structured edges.

The cache (``ProposalCache``) keys each result by the image's pixels (its SHA-256), the
method and its parameters, so a second epoch or run computes nothing; each entry keeps
the seconds it took to compute. Boxes are normalised ``(ymin, xmin, ymax, xmax)`` in
[0, 1], in the method's own order (EdgeBoxes: by score; selective search: by its
hierarchy, small regions first within each strategy).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from data.splits import DataError

METHODS = ("selective_search_fast", "selective_search_quality", "edge_boxes")
CACHE_VERSION = 1
EDGE_BOXES_PARAMS = {
    "alpha": 0.65,
    "beta": 0.75,
    "min_score": 0.01,
    "canny": (50, 150),
    "blur": 1.5,
}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise DataError(
            "region proposals need OpenCV's contrib modules: "
            "pip install opencv-contrib-python-headless"
        ) from None
    if not hasattr(cv2, "ximgproc"):
        raise DataError(
            "cv2.ximgproc is missing: install opencv-contrib-python-headless (not opencv-python)"
        )
    return cv2


def _normalised(xywh: np.ndarray, height: int, width: int) -> np.ndarray:
    xywh = np.asarray(xywh, np.float32).reshape(-1, 4)
    x, y, w, h = xywh[:, 0], xywh[:, 1], xywh[:, 2], xywh[:, 3]
    boxes = np.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=1)
    return np.clip(boxes, 0.0, 1.0).astype(np.float32)


def selective_search(image: np.ndarray, quality: bool = False, count: int = 2000) -> np.ndarray:
    """Selective search boxes of an RGB uint8 image [H, W, 3]: the first ``count`` of
    OpenCV's fast (or quality) mode, normalised."""
    cv2 = _cv2()
    cv2.setNumThreads(1)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[..., ::-1]))  # OpenCV wants BGR
    if quality:
        ss.switchToSelectiveSearchQuality()
    else:
        ss.switchToSelectiveSearchFast()
    rects = np.asarray(ss.process()).reshape(-1, 4)[:count]
    return _normalised(rects, image.shape[0], image.shape[1])


def edge_maps(image: np.ndarray, params: dict = EDGE_BOXES_PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """(edges, orientation) float32 maps of an RGB uint8 image for EdgeBoxes (see the
    module docstring)."""
    cv2 = _cv2()
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    smooth = cv2.GaussianBlur(grey.astype(np.float32) / 255.0, (0, 0), params["blur"])
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx * gx + gy * gy)
    magnitude /= max(float(magnitude.max()), 1e-6)
    thin = cv2.Canny(grey, *params["canny"]) > 0
    edges = (magnitude * thin).astype(np.float32)
    blurred = cv2.GaussianBlur(magnitude, (0, 0), 2.0)
    ox = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
    oy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
    oxx = cv2.Sobel(ox, cv2.CV_32F, 1, 0, ksize=3)
    oxy = cv2.Sobel(ox, cv2.CV_32F, 0, 1, ksize=3)
    oyy = cv2.Sobel(oy, cv2.CV_32F, 0, 1, ksize=3)
    orientation = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi).astype(np.float32)
    return edges, orientation


def edge_boxes(
    image: np.ndarray, count: int = 2000, params: dict = EDGE_BOXES_PARAMS
) -> np.ndarray:
    """EdgeBoxes of an RGB uint8 image, best first, normalised."""
    cv2 = _cv2()
    cv2.setNumThreads(1)
    edges, orientation = edge_maps(image, params)
    eb = cv2.ximgproc.createEdgeBoxes()
    eb.setMaxBoxes(int(count))
    eb.setAlpha(params["alpha"])
    eb.setBeta(params["beta"])
    eb.setMinScore(params["min_score"])
    result = eb.getBoundingBoxes(edges, orientation)
    rects = result[0] if isinstance(result, tuple) else result
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    return _normalised(np.asarray(rects).reshape(-1, 4)[:count], image.shape[0], image.shape[1])


def compute(image: np.ndarray, method: str, count: int) -> np.ndarray:
    """The first ``count`` proposals of ``method`` for an RGB uint8 image, normalised."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(
            f"proposals: expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}"
        )
    if method == "selective_search_fast":
        return selective_search(image, quality=False, count=count)
    if method == "selective_search_quality":
        return selective_search(image, quality=True, count=count)
    if method == "edge_boxes":
        return edge_boxes(image, count=count)
    raise DataError(f"proposals: unknown method {method!r}; accepted: {', '.join(METHODS)}")


def default_cache_dir() -> Path:
    """``$DEEPTRENDS_PROPOSAL_CACHE``, else ``~/.cache/deeptrends/proposals``."""
    env = os.environ.get("DEEPTRENDS_PROPOSAL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deeptrends" / "proposals"


class ProposalCache:
    """Proposals on disk, one ``.npz`` per (image content, method, parameters).

    ``get`` returns ``(boxes, seconds)``: cached, or computed, written atomically and
    returned; ``computed`` and ``hits`` count what this instance did; ``seconds_of``
    holds the seconds per image each method took (as recorded when computed)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else default_cache_dir()
        self.computed = 0
        self.hits = 0
        self.seconds_of: dict[str, list[float]] = {}

    def key(self, image: np.ndarray, method: str, count: int) -> str:
        params = EDGE_BOXES_PARAMS if method == "edge_boxes" else {}
        h = hashlib.sha256(np.ascontiguousarray(image).tobytes())
        h.update(
            json.dumps(
                [CACHE_VERSION, list(image.shape), method, int(count), params], sort_keys=True
            ).encode()
        )
        return h.hexdigest()

    def get(self, image: np.ndarray, method: str, count: int) -> tuple[np.ndarray, float]:
        image = np.ascontiguousarray(image)
        path = self.folder / method / f"{self.key(image, method, count)}.npz"
        if path.is_file():
            try:
                with np.load(path) as data:
                    boxes, seconds = data["boxes"], float(data["seconds"])
                self.hits += 1
                self.seconds_of.setdefault(method, []).append(seconds)
                return boxes, seconds
            except (OSError, ValueError, KeyError):
                pass  # unreadable: computed again below
        start = time.perf_counter()
        boxes = compute(image, method, count)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, boxes=boxes, seconds=np.float64(seconds))
        os.replace(tmp, path)
        self.computed += 1
        self.seconds_of.setdefault(method, []).append(seconds)
        return boxes, seconds

    def mean_seconds(self, method: str) -> float:
        values = self.seconds_of.get(method, [])
        return float(np.mean(values)) if values else 0.0
