"""``lightning-adapt inspect`` (rank diagnostics of a trained adapter) and its pictures.

Top layer (beside the CLI): reads checkpoints and adapter directories, prints, writes PNGs with matplotlib's
Agg backend. The math lives in :mod:`lightning_adapt.adapters.spectrum`.
"""
