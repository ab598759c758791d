"""Memory planning: the estimator (:mod:`.estimator`), model shapes from configs and presets (:mod:`.shapes`),
the ``lightning-adapt estimate`` command (:mod:`.cli`) and the description of a live run (:mod:`.live`).

No Lightning here: the memory-report callback hands the live run's settings to :mod:`.live`.
"""

from lightning_adapt.memory.estimator import *  # noqa: F403 - the estimator is this package's public face
from lightning_adapt.memory.estimator import __all__ as __all__
