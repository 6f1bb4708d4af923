"""The thin Ray layer: connecting and actor pools (``ray_env``), one module per stage (actor
adapters of a few lines around the core, and the stage's driver), and Ray Train (``train``)."""
