"""The built-in retrieval stages, one file each (registered by path in :mod:`memkit.retrieval.stage`)."""
