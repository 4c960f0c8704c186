"""One LightningModule per method."""

from lit_reason.methods.grpo import GRPO, RLOO
from lit_reason.methods.online import OnlineRL
from lit_reason.methods.ppo import PPO
from lit_reason.methods.sft import SFT
from lit_reason.methods.vineppo import VinePPO

__all__ = ["GRPO", "OnlineRL", "PPO", "RLOO", "SFT", "VinePPO"]
