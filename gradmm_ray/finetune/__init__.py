"""The fine-tuning and evaluation application (the paper's downstream protocol)."""
