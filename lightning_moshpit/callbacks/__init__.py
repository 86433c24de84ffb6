"""Lightning callbacks that reuse a model (and a swarm) for more than plain training.

- :class:`EditableTraining` trains a model so that a single wrong prediction can later be fixed with a few gradient
  steps on a few parameters (Sinitsin et al., ICLR 2020); :func:`edit` applies such a fix and
  :func:`evaluate_edits` measures how well edits work (success rate, steps, drawdown).
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

__all__ = [
    "EditEvaluation",
    "EditResult",
    "EditableTraining",
    "InGraphEditor",
    "classification_edit_loss",
    "edit",
    "evaluate_edits",
    "random_label_edits",
    "token_edit_loss",
]
