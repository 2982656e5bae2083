"""Vector-store backends, one file each, registered by name in :mod:`memkit.bank`.

Installed as ``memkit.backends``. Importing this package imports no backend library;
each module imports its library at module import, which the lazy registry triggers on first use.
"""
