"""One LightningModule per method."""

from lit_reason.methods.sft import SFT

__all__ = ["SFT"]
