"""Vector-tier measurements: SSCD separation and speed, Redis vector index throughput and memory.

Run ``python -m imgdedup.bench.vector_bench --help``; the numbers in docs-parts/vectors.md came
from the commands listed there. Everything is seeded, so reruns differ only by machine load.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont, ImageOps

#: Variant name -> how it was made; each is a near duplicate of its base (a true positive pair).
VARIANTS = ("jpeg50", "half", "crop80", "flip", "border10", "caption")


def make_variants(image: Image.Image, seed: int = 0) -> dict[str, Image.Image]:
    """The edits of `VARIANTS` applied to one RGB image (seeded crop offset)."""
    rng = random.Random(seed)
    w, h = image.size
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=50)
    side = 0.8 ** 0.5
    cw, ch = round(w * side), round(h * side)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    pad = (round(w * 0.1), round(h * 0.1))
    return {
        "jpeg50": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        "half": image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS),
        "crop80": image.crop((x0, y0, x0 + cw, y0 + ch)),
        "flip": ImageOps.mirror(image),
        "border10": ImageOps.expand(image, border=pad + pad, fill=(0, 0, 0)),
        "caption": _caption(image, "Breaking: look at this amazing picture!"),
    }


def _caption(image: Image.Image, text: str) -> Image.Image:
    """A meme-style caption: white text on a dark band over the bottom sixth of the image."""
    out = image.copy()
    w, h = out.size
    band = max(12, h // 6)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, h - band, w, h), fill=(20, 20, 20))
    font = ImageFont.load_default(size=max(8, band // 2))
    draw.text((w // 20, h - band + band // 4), text, fill=(255, 255, 255), font=font)
    return out
