"""The variant generator: the ONE list of transforms every evaluation uses, and a deterministic way
to apply it. Same seed, same bases, same Pillow -> byte-identical files, so a measured table can
be reproduced and two runs compared variant by variant."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Op = Callable[[Image.Image, np.random.Generator], Image.Image]

#: Encoding of a variant: (Pillow format, save options, file extension).
_JPEG90 = ("JPEG", {"quality": 90}, "jpg")


@dataclass(frozen=True)
class Transform:
    """One variant kind: pixel operations applied in order, then an encoding."""

    name: str
    ops: tuple[Op, ...]
    encoding: tuple[str, dict, str] = _JPEG90
    description: str = ""
    composed: bool = False


@dataclass(frozen=True)
class Variant:
    """A generated file: which base it came from and by which transform."""

    image_id: str
    base_id: str
    transform: str
    path: Path


# --- pixel operations --------------------------------------------------------------------------

def _resize(scale: float) -> Op:
    def op(im, rng):
        w, h = im.size
        return im.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.LANCZOS)
    return op


def _crop_area(area: float, off_centre: bool = False) -> Op:
    """Keep `area` of the pixels; centred, or pushed towards a random corner (seeded)."""
    def op(im, rng):
        w, h = im.size
        side = area ** 0.5
        cw, ch = round(w * side), round(h * side)
        if off_centre:
            fx, fy = rng.choice([0.1, 0.9]), rng.choice([0.1, 0.9])
        else:
            fx = fy = 0.5
        x, y = round((w - cw) * fx), round((h - ch) * fy)
        return im.crop((x, y, x + cw, y + ch))
    return op


def _rotate(degrees: float) -> Op:
    def op(im, rng):
        return im.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    return op


def _transpose(method: Image.Transpose) -> Op:
    return lambda im, rng: im.transpose(method)


def _enhance(kind: type, factor: float) -> Op:
    return lambda im, rng: kind(im).enhance(factor)


def _grayscale(im, rng):
    return ImageOps.grayscale(im).convert("RGB")


def _blur(im, rng):
    return im.filter(ImageFilter.GaussianBlur(radius=max(1.0, max(im.size) / 400)))


def _noise(im, rng):
    arr = np.asarray(im, dtype=np.float32)
    arr = arr + rng.normal(0.0, 10.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, size))


def _caption(im, rng):
    """Meme-style white text with a black outline across the bottom."""
    im = im.copy()
    w, h = im.size
    draw = ImageDraw.Draw(im)
    size = max(12, h // 10)
    text = "WHEN THE CODE WORKS"
    font = _font(size)
    while draw.textlength(text, font=font) > 0.9 * w and size > 10:
        size -= 2
        font = _font(size)
    x = (w - draw.textlength(text, font=font)) / 2
    draw.text((x, h - size * 1.4), text, font=font, fill=(255, 255, 255), stroke_width=max(1, size // 12),
              stroke_fill=(0, 0, 0))
    return im


def _logo(im, rng):
    """A logo-sized badge (about 15 % of the width) in a random corner, colours from the seed."""
    im = im.copy()
    w, h = im.size
    side = max(12, round(0.15 * min(w, h)))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    x = 4 if rng.random() < 0.5 else w - side - 4
    y = 4 if rng.random() < 0.5 else h - side - 4
    draw = ImageDraw.Draw(im)
    draw.rounded_rectangle((x, y, x + side, y + side), radius=side // 5, fill=colour, outline=(255, 255, 255))
    draw.ellipse((x + side // 4, y + side // 4, x + 3 * side // 4, y + 3 * side // 4), fill=(255, 255, 255))
    draw.text((x + side // 3, y + side // 3), "ID", font=_font(side // 3), fill=colour)
    return im


def _border(im, rng):
    return ImageOps.expand(im, border=max(2, round(0.10 * min(im.size))), fill=(255, 255, 255))


def _letterbox(im, rng):
    """Pad with black bars to a 16:9 frame, as a video player or a thumbnail service would."""
    w, h = im.size
    cw, ch = (round(h * 16 / 9), h) if w / h < 16 / 9 else (w, round(w * 9 / 16))
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(im, ((cw - w) // 2, (ch - h) // 2))
    return canvas


def _squash(im, rng):
    w, h = im.size
    return im.resize((w, max(8, round(h * 0.7))), Image.Resampling.LANCZOS)


def _screenshot(im, rng):
    """The image at 45-65 % of the width inside an application window: light or dark theme, sidebar,
    title bar and text lines, all drawn from the seed, so screenshots of different pictures share a
    style but not a pixel-identical frame (as screenshots from different apps and screens do)."""
    w, h = im.size
    cw, ch = round(w * rng.uniform(1.6, 2.0)), round(h * rng.uniform(1.4, 1.8))
    dark = rng.random() < 0.5
    bg, panel, ink = ((32, 34, 40), (45, 48, 56), (120, 125, 135)) if dark else \
        ((242, 242, 245), (225, 228, 234), (165, 170, 180))
    canvas = Image.new("RGB", (cw, ch), bg)
    draw = ImageDraw.Draw(canvas)
    bar = max(12, ch // int(rng.integers(14, 22)))
    draw.rectangle((0, 0, cw, bar), fill=tuple(int(c) for c in rng.integers(20, 90, size=3)))
    for i, colour in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
        draw.ellipse((8 + i * bar, bar // 4, 8 + i * bar + bar // 2, 3 * bar // 4), fill=colour)
    side = round(cw * rng.uniform(0.1, 0.22))
    draw.rectangle((0, bar, side, ch), fill=panel)
    for row in range(bar * 2, ch - bar, max(8, bar)):
        length = int(rng.integers(max(2, side // 3), max(3, side - 8)))
        draw.rectangle((8, row, 8 + length, row + max(3, bar // 4)), fill=ink)
    scale = rng.uniform(0.45, 0.65) * (cw - side) / w
    scaled = im.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.LANCZOS)
    x = side + int(rng.integers(0, max(1, cw - side - scaled.width)))
    y = bar + int(rng.integers(0, max(1, (ch - bar - scaled.height) // 2)))
    canvas.paste(scaled, (x, y))
    text_y = y + scaled.height + 8
    while text_y < ch - 10:
        length = int(rng.integers((cw - side) // 4, max((cw - side) // 4 + 1, cw - side - 40)))
        draw.rectangle((side + 20, text_y, side + 20 + length, text_y + 4), fill=ink)
        text_y += 14
    return canvas


def _jpeg_roundtrip(quality: int) -> Op:
    """A lossy re-encode in the middle of a composition (the final encoding is separate)."""
    def op(im, rng):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return op


# --- the list ----------------------------------------------------------------------------------

def _t(name, ops=(), encoding=_JPEG90, description="", composed=False) -> Transform:
    return Transform(name, tuple(ops), encoding, description, composed)


#: Every transform of the generated set, in report order. Parameters are chosen to span "trivially
#: the same" to "a human still says it is the same picture"; change them here and nowhere else.
TRANSFORMS: tuple[Transform, ...] = (
    _t("exact_copy", encoding=("COPY", {}, "jpg"), description="the same bytes"),
    _t("jpeg_q75", encoding=("JPEG", {"quality": 75}, "jpg"), description="re-encoded JPEG quality 75"),
    _t("jpeg_q50", encoding=("JPEG", {"quality": 50}, "jpg"), description="re-encoded JPEG quality 50"),
    _t("jpeg_q30", encoding=("JPEG", {"quality": 30}, "jpg"), description="re-encoded JPEG quality 30"),
    _t("png", encoding=("PNG", {"optimize": False}, "png"), description="lossless PNG re-encode"),
    _t("webp", encoding=("WEBP", {"quality": 80, "method": 4}, "webp"), description="WebP quality 80"),
    _t("resize_50", [_resize(0.5)], description="downscaled to 50 % per side"),
    _t("resize_25", [_resize(0.25)], description="downscaled to 25 % per side"),
    _t("upscale_150", [_resize(1.5)], description="upscaled to 150 % per side"),
    _t("crop_90", [_crop_area(0.9)], description="centre crop keeping 90 % of the area"),
    _t("crop_80", [_crop_area(0.8)], description="centre crop keeping 80 % of the area"),
    _t("crop_70", [_crop_area(0.7)], description="centre crop keeping 70 % of the area"),
    _t("crop_50", [_crop_area(0.5)], description="centre crop keeping 50 % of the area"),
    _t("crop_offcentre_80", [_crop_area(0.8, off_centre=True)], description="80 % of the area, off centre"),
    _t("rotate_3", [_rotate(3)], description="rotated 3 degrees (canvas grows, black corners)"),
    _t("rotate_10", [_rotate(10)], description="rotated 10 degrees (canvas grows, black corners)"),
    _t("rotate_90", [_transpose(Image.Transpose.ROTATE_90)], description="rotated 90 degrees"),
    _t("rotate_180", [_transpose(Image.Transpose.ROTATE_180)], description="rotated 180 degrees"),
    _t("flip_h", [_transpose(Image.Transpose.FLIP_LEFT_RIGHT)], description="mirrored left-right"),
    _t("grayscale", [_grayscale], description="converted to grayscale"),
    _t("brightness_130", [_enhance(ImageEnhance.Brightness, 1.3)], description="brightness x1.3"),
    _t("brightness_70", [_enhance(ImageEnhance.Brightness, 0.7)], description="brightness x0.7"),
    _t("contrast_60", [_enhance(ImageEnhance.Contrast, 0.6)], description="contrast x0.6"),
    _t("saturation_150", [_enhance(ImageEnhance.Color, 1.5)], description="saturation x1.5"),
    _t("blur", [_blur], description="Gaussian blur, radius = longest side / 400 (>= 1 px)"),
    _t("noise", [_noise], description="Gaussian noise, sigma 10 (seeded)"),
    _t("caption", [_caption], description="meme caption across the bottom"),
    _t("logo", [_logo], description="logo badge, 15 % of the short side, random corner"),
    _t("border_10", [_border], description="white border, 10 % of the short side on each side"),
    _t("letterbox_16x9", [_letterbox], description="black bars to a 16:9 frame"),
    _t("squash_70", [_squash], description="height squashed to 70 % (aspect change)"),
    _t("screenshot", [_screenshot], description="pasted at 45-65 % width into an application window (seeded)"),
    _t("crop_90+resize_50+jpeg_q50", [_crop_area(0.9), _resize(0.5)], ("JPEG", {"quality": 50}, "jpg"),
       "crop 90 %, downscale 50 %, JPEG 50", composed=True),
    _t("rotate_3+crop_90", [_rotate(3), _crop_area(0.9)], description="rotate 3 degrees then crop 90 %",
       composed=True),
    _t("brightness_130+contrast_60+noise", [_enhance(ImageEnhance.Brightness, 1.3),
                                            _enhance(ImageEnhance.Contrast, 0.6), _noise],
       description="brighter, flatter, noisy", composed=True),
    _t("caption+jpeg_q30", [_caption, _jpeg_roundtrip(60)], ("JPEG", {"quality": 30}, "jpg"),
       "captioned and recompressed twice", composed=True),
    _t("flip_h+crop_80", [_transpose(Image.Transpose.FLIP_LEFT_RIGHT), _crop_area(0.8)],
       description="mirrored and cropped to 80 %", composed=True),
)

BY_NAME: dict[str, Transform] = {t.name: t for t in TRANSFORMS}


def select(names: Sequence[str] | None) -> tuple[Transform, ...]:
    """The transforms named (all if None), in list order; unknown names raise with the valid ones."""
    if not names:
        return TRANSFORMS
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown transforms {unknown}; known: {', '.join(BY_NAME)}")
    return tuple(t for t in TRANSFORMS if t.name in set(names))


def variant_seed(seed: int, base_id: str, transform: str) -> int:
    """A seed per (run seed, base, transform) so adding a transform never changes the others' bytes."""
    digest = hashlib.blake2b(f"{seed}/{base_id}/{transform}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def apply(transform: Transform, data: bytes, rng: np.random.Generator) -> bytes:
    """The encoded bytes of one variant of the image `data`."""
    fmt, options, _ = transform.encoding
    if fmt == "COPY":
        return data
    with Image.open(io.BytesIO(data)) as src:
        im = ImageOps.exif_transpose(src).convert("RGB")
    for op in transform.ops:
        im = op(im, rng)
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def generate(bases: Sequence[Path], out_dir: Path, seed: int = 0,
             transforms: Sequence[Transform] = TRANSFORMS, progress=None) -> list[Variant]:
    """Write every (base, transform) variant to out_dir as ``<base>__<transform>.<ext>``.

    `progress` is called with 1 after each file (a tqdm ``update``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = []
    for base in bases:
        data = base.read_bytes()
        for transform in transforms:
            rng = np.random.default_rng(variant_seed(seed, base.stem, transform.name))
            image_id = f"{base.stem}__{transform.name}"
            path = out_dir / f"{image_id}.{transform.encoding[2]}"
            path.write_bytes(apply(transform, data, rng))
            variants.append(Variant(image_id, base.stem, transform.name, path))
            if progress:
                progress(1)
    return variants
