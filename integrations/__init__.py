"""Hugging Face integration: attention functions, long-input forward/generate, MemLong and LongMem.

Installed as ``memkit.integrations``. Importing it imports transformers and torch.
"""
