"""The performance benchmark (``jobs/benchmark.py`` is its command line):

  harness     timing, peak memory, a fresh child process per measured method, goals, the JSON file,
              and ``run``, which runs suites without knowing the CLI
  workload    the sizes (full and --quick), the randomly initialised models, the random inputs
  references  the slow, obviously-correct references written by this project (per-example autograd
              loop, vmap, our double-backward objective and its solver, brute-force head
              gradients): the tests' brute-force twins use the same functions
  stage1, stage2, projection, scaling, gpu
              one module per suite: its methods, its JSON fields (``HELP``) and its goals
  peers       against outside code and the limit (issue 14): Opacus ghost clipping, our
              re-creation of the authors' joint-gradient approach, forward / fwd+bwd floors

Nothing here is imported by the pipeline; ``scaling`` alone imports Ray.
"""
