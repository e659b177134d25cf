"""Opening image files: one place that turns Pillow's many failure modes into a ``DatasetError``."""

from __future__ import annotations

from PIL import Image

from bobench.data.errors import DatasetError

SKIP_BAD_IMAGES_FIX = (
    "replace or delete the file, or add ?skip_bad_images=true to the dataset spec "
    "(e.g. imagefolder:/data/pets?skip_bad_images=true) to drop unreadable images"
)


def open_rgb(path: str, fix: str = SKIP_BAD_IMAGES_FIX) -> Image.Image:
    """Decode the image at ``path`` fully and return it in RGB.

    Args:
        path: the image file.
        fix: what the error tells the user to do about an unreadable file (the default suits the
            classification readers, which take ``?skip_bad_images=true``; readers whose images carry
            annotations pass their own).

    Raises:
        DatasetError: naming the file, when it is gone, unreadable, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            if img.mode == "P" and "transparency" in img.info:
                # Going straight from a palette with transparency to RGB makes Pillow warn.
                return img.convert("RGBA").convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(
            f"image {path} no longer exists: the dataset changed after it was loaded; load it again."
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc}); {fix}.") from exc


def check_image(path: str) -> str | None:
    """Check the header and structure of the image at ``path`` without decoding its pixels.

    Returns:
        ``None`` when Pillow's ``verify()`` accepts the file, else the reason it was refused. A file that
        passes can still fail to decode later (``verify`` does not decode pixel data).
    """
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # verify() raises many unrelated types (SyntaxError, struct.error, ...)
        return f"{type(exc).__name__}: {exc}"
    return None
