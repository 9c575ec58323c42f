"""Intensity conventions of the store and conversions into them.

The store keeps one channel per image as uint16: 0..65535 stands for float 0..1, and high values
are dense (bone bright). Integer sources keep every level exactly: 8-bit value v becomes v * 257,
16-bit values are stored unchanged. Other integer types are mapped linearly from their full type
range; float sources already in [0, 1] are kept, other float data is scaled from its own minimum
to its maximum (recorded as ``intensity=minmax``).
"""

from __future__ import annotations

import numpy as np

from preprocess.errors import IngestError

STORE_MAX = 65535
STORE_DTYPE = np.uint16

# RGB-encoded greyscale: a pixel counts as coloured when its channels differ by more than this
# share of full scale. JPEG chroma rounding stays far below it.
GREY_CHANNEL_TOLERANCE = 0.02
# Share of coloured pixels allowed in a greyscale image (burned-in coloured markers or rulers).
GREY_COLOURED_FRACTION = 0.001


def to_store_uint16(image01: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] to store values.

    Args:
        image01: (H, W) float array; values outside [0, 1] are clipped, NaN becomes 0.
    Returns:
        (H, W) uint16 array, round(image01 * 65535).
    """
    return rescale_to_store(image01, 0.0, 1.0)


def from_store_uint16(stored: np.ndarray) -> np.ndarray:
    """Convert store values to float32 in [0, 1]; the inverse of :func:`to_store_uint16`."""
    return np.asarray(stored, dtype=np.float32) * np.float32(1.0 / STORE_MAX)


def rescale_to_store(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 65535 linearly, clip outside, round; ``high < low`` inverts.

    Args:
        values: (H, W) array of any real dtype; NaN becomes 0.
        low, high: the values that become 0 and 65535; they must differ.
    Returns:
        (H, W) uint16 array.
    """
    if high == low:
        raise IngestError(f"cannot scale intensities: the value range [{low}, {high}] is empty")
    scale = STORE_MAX / (high - low)
    scaled = np.multiply(values, scale, dtype=np.float64)
    scaled -= low * scale
    # fmax/fmin (unlike clip) also replace NaN.
    np.fmax(scaled, 0.0, out=scaled)
    np.fmin(scaled, float(STORE_MAX), out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(STORE_DTYPE)


def integers_to_store(values: np.ndarray) -> np.ndarray:
    """Map an integer or boolean image from its full type range to store values.

    uint8 and uint16 keep every level exactly (v * 257, and v); bool becomes 0 and 65535; signed
    and wider types map [type min, type max] linearly.

    Args:
        values: (H, W) array of bool or integer dtype.
    Returns:
        (H, W) uint16 array.
    """
    if values.dtype == np.bool_:
        return values.astype(STORE_DTYPE) * STORE_DTYPE(STORE_MAX)
    if values.dtype == np.uint16:
        return values.copy() if not values.flags.writeable else values
    if values.dtype == np.uint8:
        stored = values.astype(STORE_DTYPE)
        stored *= 257
        return stored
    if not np.issubdtype(values.dtype, np.integer):
        raise IngestError(f"pixel type {values.dtype} is not an integer type")
    info = np.iinfo(values.dtype)
    return rescale_to_store(values, float(info.min), float(info.max))


def floats_to_store(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Map a float image to store values and name the mapping.

    Returns:
        ((H, W) uint16 array, "unit" when the data was already in [0, 1], else "minmax").
    Raises:
        IngestError: the image has no finite value or all finite values are equal.
    """
    finite = np.isfinite(values)
    if not finite.any():
        raise IngestError("float pixel data has no finite value")
    low = float(values[finite].min())
    high = float(values[finite].max())
    if 0.0 <= low and high <= 1.0:
        return to_store_uint16(values), "unit"
    require_varying_range(low, high, "float pixel data")
    return rescale_to_store(values, low, high), "minmax"


def to_greyscale(pixels: np.ndarray, full_scale: float) -> np.ndarray:
    """Reduce an RGB(A)-encoded greyscale image to one channel; reject true colour.

    Args:
        pixels: (H, W, C) array with C = 3 (RGB) or 4 (RGBA; alpha must be opaque).
        full_scale: the maximum value of the type (255 for 8-bit), for the colour tolerance.
    Returns:
        (H, W) array of the same dtype: the first channel when all channels are equal, else the
        rounded channel mean.
    Raises:
        IngestError: the image is true colour, or its alpha channel is not opaque.
    """
    if pixels.shape[-1] == 4:
        if int(pixels[..., 3].min()) < full_scale:
            raise IngestError("image has a transparent alpha channel; export it without "
                              "transparency as greyscale")
        pixels = pixels[..., :3]
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return np.ascontiguousarray(red)

    channels = pixels.astype(np.float32)
    spread = channels.max(axis=-1) - channels.min(axis=-1)
    coloured = float(np.mean(spread > GREY_CHANNEL_TOLERANCE * full_scale))
    if coloured > GREY_COLOURED_FRACTION:
        raise IngestError(
            f"true colour image: {coloured:.1%} of pixels differ between colour channels by more "
            f"than {GREY_CHANNEL_TOLERANCE:.0%} of full scale (at most "
            f"{GREY_COLOURED_FRACTION:.1%} allowed); export it as greyscale")
    return np.rint(channels.mean(axis=-1)).astype(pixels.dtype)


def require_varying_range(low: float, high: float, what: str) -> None:
    """Raise IngestError when ``low == high``: a constant image is a decoding failure."""
    if low == high:
        raise IngestError(f"{what} is constant (every pixel is {low:g}); the file or its decoder "
                          "is broken, a blank image is never stored")


def require_varying(values: np.ndarray, what: str) -> None:
    """Raise IngestError when every pixel of ``values`` has the same value."""
    require_varying_range(float(values.min()), float(values.max()), what)
