"""Ready-made LightningModules that the recipes use and users can copy."""

from lightning_adapt.tasks.base import TaskModule
from lightning_adapt.tasks.causal_lm import CausalLMTask
from lightning_adapt.tasks.classification import SequenceClassificationTask
from lightning_adapt.tasks.preference import PreferenceTask

__all__ = ["CausalLMTask", "PreferenceTask", "SequenceClassificationTask", "TaskModule"]
