"""lightning-adapt: full fine-tuning, LoRA and QLoRA for any LightningModule through configuration."""

__version__ = "0.1.0"
