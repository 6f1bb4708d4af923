"""gradmm-ray: differentially private synthetic text by last-layer gradient matching (GRADMM)."""

__version__ = "0.1.0"
