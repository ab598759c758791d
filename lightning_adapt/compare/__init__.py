"""``lightning-adapt compare`` (full vs LoRA vs QLoRA, measured on the user's own recipes, projected with the
estimator, pictured) and ``lightning-adapt inspect`` (rank diagnostics of a trained adapter).

Top layer (beside the CLI): runs fits in child processes, reads their records, checkpoints and adapter
directories, prints, writes PNGs with matplotlib's Agg backend. The math lives in
:mod:`lightning_adapt.adapters.spectrum` and :mod:`lightning_adapt.memory`.
"""
