"""Lightning callbacks that reuse a model (and a swarm) for more than plain training.

- :class:`EditableTraining` trains a model so that a single wrong prediction can later be fixed with a few gradient
  steps on a few parameters (Sinitsin et al., ICLR 2020); :func:`edit` applies such a fix and
  :func:`evaluate_edits` measures how well edits work (success rate, steps, drawdown).
- :class:`ResIST` trains a ResNet as S random shallow sub-ResNets (one per peer and round), and
  :class:`IndependentSubnet` (IST) an MLP as S disjoint groups of hidden neurons; in a swarm each part is averaged
  only among the peers that trained it (Dun et al.; Yuan et al.).
"""

from lightning_moshpit.callbacks.editable import EditableTraining
from lightning_moshpit.callbacks.editing import (
    EditEvaluation,
    EditResult,
    InGraphEditor,
    classification_edit_loss,
    edit,
    evaluate_edits,
    random_label_edits,
    token_edit_loss,
)
from lightning_moshpit.callbacks.ist import IndependentSubnet
from lightning_moshpit.callbacks.resist import ResIST

__all__ = [
    "EditEvaluation",
    "EditResult",
    "EditableTraining",
    "InGraphEditor",
    "IndependentSubnet",
    "ResIST",
    "classification_edit_loss",
    "edit",
    "evaluate_edits",
    "random_label_edits",
    "token_edit_loss",
]
