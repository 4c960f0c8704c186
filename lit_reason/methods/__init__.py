"""One LightningModule per method."""

from lit_reason.methods.dpo import DPO
from lit_reason.methods.dqo import DQO
from lit_reason.methods.dvo import DVO
from lit_reason.methods.dvpo import DVPO
from lit_reason.methods.dvpo_gvm import DVPOGVM
from lit_reason.methods.grpo import GRPO, RLOO
from lit_reason.methods.offline import OfflineRL
from lit_reason.methods.online import OnlineRL
from lit_reason.methods.oreo import OREO, ValueOfflineRL
from lit_reason.methods.ppo import PPO
from lit_reason.methods.rft import RFT
from lit_reason.methods.sft import SFT
from lit_reason.methods.vineppo import VinePPO

__all__ = ["DPO", "DQO", "DVO", "DVPO", "DVPOGVM", "GRPO", "OREO", "OfflineRL", "OnlineRL", "PPO", "RFT", "RLOO", "SFT", "ValueOfflineRL", "VinePPO"]
