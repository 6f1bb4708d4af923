"""Entry point: `python jobs/distill.py [--config my.yaml] [flags]`, locally or through
`ray job submit --working-dir . -- python jobs/distill.py ...`. See `--help`."""

import sys

from gradmm_ray.distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
