"""LoRA adapters: the wrapper and its merge math (:mod:`.lora`), which layers to adapt (:mod:`.targeting`),
injection, freezing and the trainable table (:mod:`.inject`), adapter-only checkpoints (:mod:`.checkpoint`),
fused sibling projections (:mod:`.fused`), in-place ``torch.compile`` by blocks (:mod:`.compiled`).

Pure torch: nothing here imports Lightning. This ``__init__`` imports nothing, so that lower layers
(:mod:`lightning_adapt.quantize` reads :mod:`.targeting`) never pull the whole folder in.
"""
