"""What every report of both applications records about how it was made: package versions,
and figures as PNG bytes (written through the output directory, local or s3/gs)."""

from __future__ import annotations

import io
import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "gradmm-ray",
    "torch",
    "ray",
    "transformers",
    "tokenizers",
    "datasets",
    "pyarrow",
    "dp-accounting",
    "safetensors",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()
