"""Unit tests run on tiny models with one CPU thread, offline."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test machine's cores are shared; one thread also keeps float results reproducible.
torch.set_num_threads(1)
