"""lightning_moshpit: decentralized, fault-tolerant training for PyTorch Lightning.

Importing this package registers the strategy names ``"moshpit"`` and ``"moshpit_dpu"``, so
``Trainer(strategy="moshpit")`` works after ``import lightning_moshpit``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_moshpit import matchmaking, p2p_streams
from lightning_moshpit.callbacks import EditableTraining, IndependentSubnet, ResIST
from lightning_moshpit.optimizer import AveragingRound, SwarmOptimizer
from lightning_moshpit.strategy import MoshpitStrategy

__version__ = "0.1.0"
__all__ = [
    "AveragingRound",
    "EditableTraining",
    "IndependentSubnet",
    "MoshpitStrategy",
    "ResIST",
    "SwarmOptimizer",
    "__version__",
]

# before anything builds a P2P or forks an averager: streaming RPCs that keep their last message (see the module)
p2p_streams.install()
matchmaking.install()  # likewise: a control-pipe handler the averager processes inherit
MoshpitStrategy.register_strategies(StrategyRegistry)
