"""The pure-PyTorch core: no Ray, no file I/O of its own (a test enforces that it never imports
Ray). It runs and is benchmarked in one process, on CPU or one GPU.

  text        the ONE tokenisation rule for a (prompt, completion) training pair
  lm          access to a causal LM: completion states, the head, its logits tail
  headgrad    closed-form LM-head gradients, norms, clipping, the single-backward matching loss
  privacy     the DP boundary: calibration, Poisson sampling, the noisy release, its record
  admm        independent per-example ADMM solves against a released target
  projection  the KV-cached projection of free embeddings onto tokens
  scoring     completion log-likelihoods and mean-pooled states (no gradient)
  selection   pure rules that filter, dedupe, rank and balance scored candidates
  coreset     herding and k-center baselines
  training    the downstream losses and the training loop (one process; Ray Train wraps it)
  gradient_error  the normalised head-gradient error of a training set (paper Fig. 2a)
"""
