"""gradmm-ray: differentially private synthetic text by last-layer gradient matching (GRADMM).

The layers, bottom up (a module imports from its own layer and those listed before it; the
Ray Train driver in distributed/ also reads the finetune application's typed config):

  errors, env, config,  user errors, the process environment, the typed configuration, shipped
  presets/, provenance  presets, package versions and figures for reports
  models/               model files: the cache, model.name, the tiny model, SmolLM2's conversion
  core/                 pure torch, no Ray (a test enforces it): the tokenisation rule, LM access,
                        head gradients, privacy, ADMM, projection, scoring, selection, training
  io/                   the real-data reader, the output directory, the inputs' identity
  distributed/          the Ray layer: connecting, actor pools, one module per stage, Ray Train
  distill/, finetune/   the applications: CLI, pipeline or job, report
  bench/                the benchmark's harness, our reference implementations and its suites

The DP boundary, in one place:

  io.real_data ──► distributed.targets ──► core.privacy.release_noisy_sums ──► targets.safetensors
   (real rows,      (stage 1: clipped        (noise from the OS CSPRNG,          (noisy per-class
    streamed by      per-example sums)         added once)                          sums only)
    distributed.real_rows)
                                                                                      │
  distributed.solve, distributed.select, distill.output ◄──────────────────────────────┘
   (stages 2 and 3 read the release only; tests/test_layers.py proves they cannot import
    io.real_data). The opt-in audit (distributed.audit) streams the real rows again, outside
    the guarantee.
"""

__version__ = "0.1.0"
