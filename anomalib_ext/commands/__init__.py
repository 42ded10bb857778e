"""Subcommands of our own (``score``, ``doctor``); the rest is anomalib's CLI (``anomalib_ext.cli``)."""
