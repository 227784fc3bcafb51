"""Images: encoding to PNG, decoding to pixels, and bringing a set of images to one shape.

The canonical table stores every image as PNG bytes (`encode_png` for pixel arrays, `to_png` for
files in any format Pillow reads, converted losslessly). `decode_image` turns them back into
uint8 pixels, rescaling 16-bit and float grayscale images rather than clipping them.

Images of different modes and sizes are accepted on purpose, as photographs usually are:
`normalise_images` converts them to one mode (grayscale when all are, else RGB, alpha dropped)
and resizes them to the most common size, logging a warning naming how many and which.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from dm_audit.errors import DataError

# The warnings are about a dataset's images: they keep the dataset's logger name.
log = logging.getLogger("dm_audit.dataset")

#: File suffixes read as images (image folders, and sniffing image-path columns).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# PIL modes holding a single intensity channel (alpha, where present, is dropped on decode).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def encode_png(image: np.ndarray) -> bytes:
    """Encode one image as PNG.

    Parameters
    ----------
    image : numpy.ndarray of uint8, shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)
        Pixel values.

    Returns
    -------
    bytes
        The PNG file.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(f"an image must have shape (H, W[, 1|3|4]), got {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_compatible(image: Image.Image) -> Image.Image:
    """The image in a mode PNG can store without losing what the pixels show."""
    if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        return image
    if image.mode in _GRAY_MODES:
        return Image.fromarray(_gray_to_uint8(image))
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def to_png(data: bytes, where: str) -> bytes:
    """Check that ``data`` is a decodable image and return it as PNG bytes.

    PNG input is returned unchanged (after a full decode to prove it is readable); other formats
    are decoded and re-encoded losslessly.

    Parameters
    ----------
    data : bytes
        An encoded image in any format Pillow reads.
    where : str
        The file or row the bytes came from, named in the error message.

    Returns
    -------
    bytes
        PNG-encoded image.

    Raises
    ------
    DataError
        If the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "PNG":
                return bytes(data)
            buffer = io.BytesIO()
            _png_compatible(image).save(buffer, format="PNG")
            return buffer.getvalue()
    except UnidentifiedImageError:
        # Pillow's message names its in-memory buffer, not the file.
        raise DataError(
            f"cannot decode the image at {where}: not an image in a format Pillow reads"
        ) from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode the image at {where}: {exc}") from exc


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """One intensity channel as uint8 (H, W); 16-bit and float images are rescaled, not clipped."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if image.mode in ("LA", "La"):
        return np.asarray(image.getchannel(0))
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        return (array.astype(np.uint32) // 257).astype(np.uint8)
    # 32-bit integer and float images have no fixed range: 16-bit data is the common case.
    top = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def decode_image(data: bytes, *, gray: bool) -> np.ndarray:
    """Decode one image to uint8 pixels.

    Parameters
    ----------
    data : bytes
        Encoded image (PNG in the canonical table).
    gray : bool
        Decode to one intensity channel (``L``) instead of RGB.

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 1) if ``gray`` else (H, W, 3)
        Alpha channels are dropped.
    """
    with Image.open(io.BytesIO(data)) as image:
        if gray:
            if image.mode in _GRAY_MODES:
                return _gray_to_uint8(image)[:, :, None]
            return np.asarray(image.convert("L"))[:, :, None]
        if image.mode in _GRAY_MODES and image.mode not in ("1", "L", "LA"):
            return np.repeat(_gray_to_uint8(image)[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _image_header(data: bytes) -> tuple[str, tuple[int, int]]:
    """Mode and (H, W) of an encoded image, read from its header only."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, (image.height, image.width)


def _common_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most common (H, W); ties go to the larger area, then the larger height."""
    counts = Counter(sizes)
    return max(counts, key=lambda hw: (counts[hw], hw[0] * hw[1], hw[0]))


def _report_normalisation(
    headers: Sequence[tuple[str, tuple[int, int]]],
    size: tuple[int, int],
    why: str,
    gray: bool,
    ids: Sequence[str],
    source: str,
) -> None:
    """Warn, naming examples, when images are resized or converted to a common mode."""
    resized = [i for i, (_, hw) in enumerate(headers) if hw != size]
    target = "L" if gray else "RGB"
    converted = sorted({mode for mode, _ in headers} - {target})
    if resized:
        sizes = [(ids[i], *headers[i][1]) for i in resized[:3]]
        shown = ", ".join(f"{eid!r} ({h}x{w})" for eid, h, w in sizes)
        log.warning(
            "%s: resized %d of %d images to %dx%d (%s), e.g. %s",
            source,
            len(resized),
            len(headers),
            size[0],
            size[1],
            why,
            shown,
        )
    if converted:
        # Only modes with an alpha channel lose one (LA, RGBA, PA, La, RGBa).
        alpha = [mode for mode in converted if "A" in mode or "a" in mode]
        log.warning(
            "%s: converted images of mode(s) %s to %s%s",
            source,
            ", ".join(converted),
            target,
            f" (alpha of {', '.join(alpha)} dropped)" if alpha else "",
        )


def normalise_images(
    blobs: Sequence[bytes],
    ids: Sequence[str],
    source: str,
    size: tuple[int, int] | None = None,
    *,
    warn: bool = True,
) -> np.ndarray:
    """Decode encoded images to one uint8 array of a common mode and size.

    Images are converted to one intensity channel when all of them are grayscale, and to RGB
    otherwise (alpha is dropped). They are then brought to a common size: ``size`` when given,
    else the most common (H, W) (ties: the larger area). Images of a different size are resized
    (bilinear, aspect ratio not kept), with a warning naming some of them.

    Parameters
    ----------
    blobs : sequence of bytes, length N
        Encoded images.
    ids : sequence of str, length N
        Example ids, named in the warnings.
    source : str
        Where the images come from, named in the warnings.
    size : (int, int), optional
        Target (H, W).
    warn : bool
        Log the resize and conversion warnings (off when they were already given for the
        same images).

    Returns
    -------
    numpy.ndarray of uint8, shape (N, H, W, C)
        C is 1 (grayscale) or 3 (RGB).
    """
    if len(blobs) == 0:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    headers = [_image_header(b) for b in blobs]
    gray = all(mode in _GRAY_MODES for mode, _ in headers)
    height, width = size if size is not None else _common_size([hw for _, hw in headers])
    why = "as asked" if size is not None else "the most common size"
    if warn:
        _report_normalisation(headers, (height, width), why, gray, ids, source)
    out = np.empty((len(blobs), height, width, 1 if gray else 3), dtype=np.uint8)
    for i, (blob, (_, hw)) in enumerate(zip(blobs, headers, strict=True)):
        pixels = decode_image(blob, gray=gray)
        if hw != (height, width):
            resized = Image.fromarray(pixels[:, :, 0] if gray else pixels).resize(
                (width, height), Image.Resampling.BILINEAR
            )
            pixels = np.asarray(resized).reshape(height, width, -1)
        out[i] = pixels
    return out
