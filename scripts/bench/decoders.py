"""JPEG decoders per core: raycv's decode (Pillow with draft mode) against the others.

Issue 19 part 3 asks for a faster decoder only where it measures faster and installs
cleanly from the registries. Each method turns a JPEG file's bytes into the cached
working-size square (shorter side resized to ``--size``, centre-cropped, as
``raycv.data.images.decode`` does), on one thread, in this process (no Ray: the decode's
own cost per file):

* ``raycv (Pillow, draft)``: ``raycv.data.images.decode``: Pillow's libjpeg-turbo, DCT-scaled
  to the smallest 1/2, 1/4 or 1/8 size that still covers the working size, EXIF orientation;
* ``Pillow, no draft``: the same without draft mode (what draft buys);
* ``torchvision.io.decode_jpeg``: full-size decode (libjpeg-turbo), then the same resize;
* ``simplejpeg``: libjpeg-turbo through its own wheel, DCT-scaled as draft does, then the
  same resize (in the dev extra for this script; not a dependency of raycv).

The others skip EXIF orientation, which a replacement would still have to read, so they
are lower bounds. Files: the clothing photos of ../shared/data (mostly 288x384) or ``--photos``,
then JPEGs made from one of them (or a rendered shape) at each ``--sides`` (quality 90).
Median of ``--repeats`` passes. Run by hand, not in CI:

    python scripts/bench/decoders.py
    python scripts/bench/decoders.py --size 258 --sides 1024,4000
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import results
import torch
from PIL import Image, ImageOps

from raycv.data.images import decode

log = logging.getLogger("bench")
Decoder = Callable[[bytes, int], np.ndarray]


def parse_args(argv: list[str] | None = None):
    p = results.parser(__file__, __doc__, "every pass of every method on every file set")
    p.add_argument("--size", type=int, default=147, help="working size in px (default 147)")
    p.add_argument(
        "--sides",
        default="1024,2000,4000",
        help="long sides of the made JPEGs, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--photos",
        type=Path,
        default=results.CLOTHING,
        help="an ImageFolder of JPEGs, train/<class>/*.jpg (default: %(default)s; "
        "without it the made JPEGs start from a rendered shape)",
    )
    p.add_argument("--files", type=int, default=200, help="photos per set (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="passes per method (default 3)")
    return p.parse_args(argv)


def _fit(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR), np.uint8)


def _pillow_no_draft(data: bytes, size: int) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return _fit(img, size)


def _torchvision(data: bytes, size: int) -> np.ndarray:
    from torchvision.io import decode_jpeg

    pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return _fit(Image.fromarray(pixels.permute(1, 2, 0).numpy()), size)


def _simplejpeg(data: bytes, size: int) -> np.ndarray:
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size, min_height=size)
    return _fit(Image.fromarray(pixels), size)


def decoders() -> dict[str, Decoder]:
    found = {
        "raycv (Pillow, draft)": lambda data, size: decode(data, "bench", size),
        "Pillow, no draft": _pillow_no_draft,
        "torchvision.io.decode_jpeg": _torchvision,
    }
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        log.info("simplejpeg is not installed (scripts/setup.sh installs it): row left out")
    else:
        found["simplejpeg"] = _simplejpeg
    return found


def file_sets(folder: Path, count: int, sides: list[int]) -> dict[str, list[bytes]]:
    """Real photos where ``folder`` has them, then photo-sized JPEGs made from one."""
    photos = sorted(folder.glob("train/*/*.jpg"))[:count]
    sets = {f"{folder.name} photos": [p.read_bytes() for p in photos]} if photos else {}
    base = Image.open(photos[0]).convert("RGB") if photos else _shape()
    for side in sides:
        made = []
        for i in range(count):
            img = base.resize((side * 3 // 4, side), Image.Resampling.BICUBIC).rotate(i * 7)
            out = io.BytesIO()
            img.save(out, "JPEG", quality=90)
            made.append(out.getvalue())
        sets[f"made, {side * 3 // 4}x{side}"] = made
    return sets


def _shape() -> Image.Image:
    from raycv.data.shapes import render

    sample = render(0, image_size=384, num_classes=3, difficulty="hard", seed=0)
    return Image.fromarray(sample["image"])


def time_method(fn: Decoder, files: list[bytes], size: int, repeats: int) -> list[float]:
    """Milliseconds per file of each pass."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in files:
            fn(data, size)
        passes.append((time.perf_counter() - start) / len(files) * 1e3)
    return passes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    torch.set_num_threads(1)  # per core: the decode runs one file per task thread
    info = results.machine()
    sets = file_sets(args.photos, args.files, [int(s) for s in args.sides.split(",")])
    methods = decoders()
    rows, out = [], {"machine": info, "size": args.size, "ms_per_file": {}}
    for set_name, files in sets.items():
        log.info("%s: %d files", set_name, len(files))
        timed = {
            name: time_method(fn, files, args.size, args.repeats) for name, fn in methods.items()
        }
        base = results.median(timed["raycv (Pillow, draft)"])
        for name, passes in timed.items():
            ms = results.median(passes)
            rows.append([set_name, name, ms, 1e3 / ms, results.ratio(base, ms)])
        out["ms_per_file"][set_name] = timed
    print(results.header(f"JPEG decode to {args.size} px, one thread", info))
    columns = ["files", "decoder", "ms/file", "files/s", "vs raycv"]
    print(results.table(columns, rows))
    results.write(args.out, out)


if __name__ == "__main__":
    main()
