"""Memory planning: the estimator (:mod:`.estimator`), model shapes from configs and presets (:mod:`.shapes`),
the ``lightning-adapt estimate`` command (:mod:`.cli`), the description of a live run (:mod:`.live`) and the verdict
on whether a run fits its device (:mod:`.fit`).

No Lightning here: the memory-report and fit-check callbacks hand the live run's settings to :mod:`.live`.
"""

from lightning_adapt.memory.estimator import *  # noqa: F403 - the estimator is this package's public face
from lightning_adapt.memory.estimator import __all__ as __all__
