"""GloFND: global false-negative discovery for contrastive losses (ICML 2025), as drop-in losses."""

from glofnd_losses.clip import GloFNDClipLoss
from glofnd_losses.ddp import ignore_loss_buffers_in_ddp
from glofnd_losses.ntxent import GloFNDNTXent
from glofnd_losses.siglip import GloFNDSigLipLoss
from glofnd_losses.sogclr import GloFNDSogCLRLoss
from glofnd_losses.thresholds import ThresholdOptimizer

__version__ = "0.1.0"

__all__ = [
    "GloFNDClipLoss",
    "GloFNDNTXent",
    "GloFNDSigLipLoss",
    "GloFNDSogCLRLoss",
    "ThresholdOptimizer",
    "ignore_loss_buffers_in_ddp",
    "__version__",
]
