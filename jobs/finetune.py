"""Entry point: `python jobs/finetune.py --train OUTPUT/synthetic.parquet --model M --eval-data SRC
--output DIR [flags]`, locally or through `ray job submit --working-dir . -- python jobs/finetune.py
...`. See `--help`."""

import sys

from gradmm_ray.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
