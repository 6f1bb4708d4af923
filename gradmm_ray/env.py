"""The process environment every entry point sets before tokenizers, transformers or Ray load.

Entry points (the two CLIs, the jobs, the tests' conftest) call ``set_defaults`` first thing;
Ray's worker processes inherit the driver's environment, so the actors see the same values.
"""

from __future__ import annotations

import os

# Defaults a user's environment may override.
DEFAULTS = {
    # The tokenizers library's Rust thread pool and fork() (Ray workers, DataLoader) do not mix:
    # it warns once per process and can deadlock.
    "TOKENIZERS_PARALLELISM": "false",
    # No usage report from Ray: a job over private data phones nothing home.
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Forced for runs that use only bundled data and cached models (tests, benchmarks, the quality
# job): a hub lookup that misses costs ~25 s of retries each.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def set_defaults(*, offline: bool = False) -> None:
    """Set DEFAULTS where unset; with ``offline``, force OFFLINE too."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if offline:
        os.environ.update(OFFLINE)
