"""``EditableTraining``: train a model so that a single mistake can later be patched by a few gradient steps.

Editable Training (Sinitsin et al., "Editable Neural Networks", ICLR 2020) adds to every training step the cost of
one simulated edit, and backpropagates *through* the edit. See :mod:`lightning_moshpit.callbacks.editing` for the
editor, the edit losses, and the :func:`edit` / :func:`evaluate_edits` functions that use a trained model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_moshpit.callbacks.editing import (
    IGNORE_INDEX,
    BatchToInputs,
    EditLoss,
    ForwardFn,
    FunctionalModel,
    InGraphEditor,
    Selector,
    at_least_float32,
    check_max_steps,
    check_selector,
    default_batch_to_inputs,
    eval_mode,
    make_editor,
    resolve_edit_loss,
    run_editor,
    select_editable,
)

#: Attribute under which learnable editor settings are attached to the LightningModule (see ``EditableTraining``).
EDITOR_ATTRIBUTE = "editable_editor"


class EditableTraining(L.Callback):
    """Make a model *editable*: after training, one wrong prediction can be fixed in a few steps without side effects.

    **The idea.** Fixing a single mistake of a trained network by fine-tuning on it usually takes many steps and
    damages other predictions. Editable Training simulates such an edit on every training step and trains for it:

    1. pick an edit: one random training sample of the batch with a uniformly random *wrong* label (or the next
       ``(x, y_target)`` from ``edit_samples``);
    2. run the editor on the editable parameters θ_e only (``k <= max_steps`` differentiable steps
       ``θ_e ← θ_e − lr·u(∇ l_e)``, stopping once the edit loss ``l_e`` is 0, i.e. the target wins);
    3. add to the task loss, on the training batch,

           c_edit · l_e(edited model) + c_loc · KL(p_original ‖ p_edited)

       and backpropagate through the editor's steps (second order). The first term makes edits succeed within
       ``max_steps``; the second makes them *local*: the edited model should answer everything else as before.

    The edit runs in eval mode (dropout off, BatchNorm on running statistics), like a later real edit.

    **How the term reaches the loss.** A Callback cannot change the loss Lightning backpropagates from its hooks, so
    in ``setup`` this callback wraps the module's ``training_step`` (an instance attribute that shadows the method)
    and adds the edit term to the loss it returns; ``teardown`` (or an exception) restores it. This works with any
    strategy that calls ``training_step`` (single device, DDP, ``"moshpit"``) and with automatic optimization. For
    manual optimization pass ``wrap_training_step=False`` and add ``callback.edit_term(self, batch)`` to your loss
    yourself before ``self.manual_backward``.

    **Learnable editor settings** (``learnable_lr``, ``learnable_beta``) are ``nn.Parameter``\\ s of the editor,
    attached in ``setup`` to the LightningModule as the submodule ``editable_editor``. ``setup`` runs before
    ``configure_optimizers``, so an optimizer over ``self.parameters()`` trains them (a warning says when no optimizer
    holds them). They stay attached after fit, so checkpoints carry them and ``edit(model, ...,
    editor=model.editable_editor)`` uses the learned values; to load such a checkpoint, attach the callback again or
    load with ``strict=False``. By default nothing is learnable and the module is left unchanged.

    Logged every edit (running means over the epoch, via torchmetrics): ``edit/success_rate``, ``edit/steps``,
    ``edit/loss`` (the edit loss after the edit, 0 on success) and ``edit/locality`` (the KL term).

    Example::

        trainer = L.Trainer(callbacks=[EditableTraining(editable="classifier.*", editor="rmsprop")])
        trainer.fit(model, data)
        result = edit(model, x[None], torch.tensor([wanted]), editable="classifier.*", editor="rmsprop")

    Args:
        editable: Which parameters an edit may change: fnmatch globs or module names matched against
            ``named_parameters()`` names, e.g. ``"classifier.*"`` or ``["layer3.*", "fc.*"]``. The paper edits one
            layer or block near the output; fewer parameters make edits cheaper and more local.
        editor: ``"gd"``, ``"momentum"``, ``"rmsprop"`` or an :class:`InGraphEditor`. RMSProp is scale-free and
            the safest choice when you do not know the gradient scale.
        lr: Editor step size (default per kind, see :class:`InGraphEditor`). Use the same editor for real edits later.
        momentum: Momentum for ``editor="momentum"`` (default 0.9).
        beta: RMSProp decay for ``editor="rmsprop"`` (default 0.9).
        learnable_lr: Train the editor's step size together with the model (see above).
        learnable_beta: Train RMSProp's decay together with the model.
        max_steps: Editor steps before an edit counts as failed (about 10). Training cost grows with it.
        c_edit: Weight of the edit loss of the edited model (paper: 0.01).
        c_loc: Weight of the locality term KL(p_original ‖ p_edited) on the batch (paper: 0.01). Raise it if edits
            disturb other predictions (drawdown), lower it if the task loss suffers.
        edit_loss: ``"classification"``, ``"tokens"`` (logits ``[B, T, V]``, per-token margin) or a callable
            ``(logits, y_target) -> loss`` that is >= 0 and exactly 0 once the edit succeeded.
        edit_samples: Where edits come from. ``None``: a random sample of each training batch with a random wrong
            label (for tokens: one random kept position gets a random wrong token). Else a re-iterable (list,
            DataLoader) of ``(x, y_target)`` pairs with a leading batch dimension, cycled; unbatched pairs (a 0-d
            target) get one.
        every_n_steps: Add the edit term on every n-th training batch only (1: always). Larger is cheaper.
        batch_to_inputs: ``batch -> (inputs, labels)``. Default: ``(x, y, ...)`` tuples, or dicts with
            ``"labels"`` (Hugging Face). ``labels`` may be ``None``: then "wrong" is relative to the prediction.
        forward_fn: ``(module, inputs) -> output``; default ``module(inputs)`` (``module(**inputs)`` for dicts). The
            output may be logits, or have ``.logits``. For causal LMs, return shifted logits and shift labels in
            ``batch_to_inputs`` so position t of both refers to the same token.
        ignore_index: Label value that token-level losses, sampling and errors skip.
        seed: Seed of the callback's own random generator that picks edits (training randomness is untouched).
        wrap_training_step: Wrap ``training_step`` to add the term (see above); ``False`` to call :meth:`edit_term`
            yourself.
    """

    def __init__(self, editable: Selector = "*", editor: Union[str, InGraphEditor] = "gd", *,
                 lr: Optional[float] = None, momentum: Optional[float] = None, beta: Optional[float] = None,
                 learnable_lr: bool = False, learnable_beta: bool = False, max_steps: int = 10,
                 c_edit: float = 0.01, c_loc: float = 0.01, edit_loss: Union[str, EditLoss] = "classification",
                 edit_samples: Optional[Iterable[tuple[Any, Any]]] = None, every_n_steps: int = 1,
                 batch_to_inputs: Optional[BatchToInputs] = None, forward_fn: Optional[ForwardFn] = None,
                 ignore_index: int = IGNORE_INDEX, seed: int = 0, wrap_training_step: bool = True) -> None:  # fmt: skip
        check_selector(editable)
        self.editable = editable
        self.editor = make_editor(editor, lr=lr, momentum=momentum, beta=beta, learnable_lr=learnable_lr,
                                  learnable_beta=learnable_beta)  # fmt: skip
        self.max_steps = check_max_steps(max_steps)
        self.c_edit = _non_negative(c_edit, "c_edit")
        self.c_loc = _non_negative(c_loc, "c_loc")
        self.edit_loss = resolve_edit_loss(edit_loss)
        iterable = isinstance(edit_samples, Iterable) or hasattr(edit_samples, "__getitem__")  # map-style Dataset
        if edit_samples is not None and not iterable:
            raise ValueError(f"`edit_samples` must be None or an iterable of (x, y_target) pairs, got {edit_samples!r}")
        if isinstance(edit_samples, Iterator):
            raise ValueError(
                "`edit_samples` must be re-iterable (a list, Dataset or DataLoader), not a one-shot iterator or "
                "generator: it is cycled for the whole run"
            )
        self.edit_samples = edit_samples
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an integer >= 1 (1: every batch), got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.batch_to_inputs = batch_to_inputs or default_batch_to_inputs
        self.forward_fn = forward_fn
        self.ignore_index = ignore_index
        self.seed = seed
        self.wrap_training_step = bool(wrap_training_step)

        self.metrics = {name: MeanMetric(sync_on_compute=False) for name in ("success_rate", "steps", "loss",
                                                                               "locality")}  # fmt: skip
        self._generator = torch.Generator().manual_seed(seed)
        self._batches_seen = 0
        self._names: list[str] = []
        self._functional: Optional[FunctionalModel] = None
        self._edit_iterator: Optional[Iterator[Any]] = None
        self._wrapped: Optional[tuple[L.LightningModule, Any, Any]] = None

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.wrap_training_step and not pl_module.automatic_optimization:
            raise ValueError(
                f"EditableTraining adds its term to the loss that `training_step` returns, but "
                f"{type(pl_module).__name__}.automatic_optimization is False (manual optimization ignores that loss). "
                f"Pass EditableTraining(wrap_training_step=False) and add `callback.edit_term(self, batch)` to your "
                f"loss before `self.manual_backward(loss)`."
            )
        self._names = select_editable(pl_module, self.editable)
        if self.editor.learnable and all(m is not self.editor for m in pl_module.modules()):
            pl_module.add_module(EDITOR_ATTRIBUTE, self.editor)
        self.editor.to(pl_module.device)
        self._functional = FunctionalModel(pl_module, self.forward_fn)
        for metric in self.metrics.values():
            metric.to(pl_module.device)
        if self.wrap_training_step:
            self._wrap(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.editor.learnable:
            return
        optimized = {id(p) for optimizer in trainer.optimizers for p in _optimized_parameters(optimizer)}
        missing = [name for name, p in self.editor.named_parameters() if id(p) not in optimized]
        if missing:
            rank_zero_warn(
                f"EditableTraining: learnable editor settings {missing} (attached as `{EDITOR_ATTRIBUTE}`) are in no "
                f"optimizer, so they keep their initial values. Optimize `self.parameters()` or add "
                f"`self.{EDITOR_ATTRIBUTE}.parameters()` to an optimizer."
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unwrap()
        self._functional = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self._batches_seen, "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches_seen = int(state_dict.get("batches_seen", 0))
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"])

    # ------------------------------------------------------------------------------------------ the edit term
    def edit_term(self, pl_module: L.LightningModule, batch: Any) -> Tensor:
        """``c_edit · l_e(edited) + c_loc · KL(p_original ‖ p_edited)`` for one edit, differentiable; logs metrics.

        Called for you when ``wrap_training_step=True``; call it from ``training_step`` otherwise.
        """
        if self._functional is None:
            raise RuntimeError("EditableTraining.edit_term is only available during trainer.fit (after setup)")
        inputs, labels = self.batch_to_inputs(batch)
        own = dict(pl_module.named_parameters())
        params = {n: own[n] if own[n].requires_grad else own[n].detach().requires_grad_(True) for n in self._names}
        with eval_mode(pl_module):
            with torch.no_grad():
                base_logits = self._functional({}, inputs)
            x_edit, y_edit = self._next_edit(pl_module, inputs, labels, base_logits)
            run = run_editor(self._functional, params, x_edit, y_edit, self.edit_loss, self.editor, self.max_steps,
                             create_graph=True)  # fmt: skip
            term = self.c_edit * run.loss
            locality = torch.zeros((), device=base_logits.device)
            if run.steps > 0 and self.c_loc > 0:
                locality = _kl(base_logits, self._functional(run.params, inputs))
                term = term + self.c_loc * locality
        values = {"success_rate": float(run.success), "steps": float(run.steps), "loss": float(run.loss.detach()),
                  "locality": float(locality.detach())}  # fmt: skip
        # edit_term also works outside a Trainer's loop (tests, notebooks): log only where Lightning allows it
        logging = getattr(pl_module, "_trainer", None) is not None and pl_module._current_fx_name is not None
        for name, value in values.items():
            self.metrics[name].update(value)
            if logging:
                pl_module.log(f"edit/{name}", self.metrics[name].compute(), on_step=True, on_epoch=False, batch_size=1)
        return term

    def _next_edit(self, pl_module: L.LightningModule, inputs: Any, labels: Optional[Tensor],
                   base_logits: Tensor) -> tuple[Any, Tensor]:  # fmt: skip
        """The next ``(x, y_target)``: from ``edit_samples``, or a random batch sample with a random wrong label."""
        if self.edit_samples is not None:
            return move_data_to_device(self._next_user_edit(), pl_module.device)
        size, num_classes = base_logits.shape[0], base_logits.shape[-1]
        index = int(torch.randint(size, (1,), generator=self._generator))
        x_edit = apply_to_collection(
            inputs, Tensor, lambda t: t[index : index + 1] if t.dim() and len(t) == size else t
        )
        truth = (labels if labels is not None else base_logits.argmax(dim=-1))[index : index + 1]
        target = truth.clone()
        if target.dim() >= 2:  # tokens: one random kept position gets a random wrong token
            positions = (target[0] != self.ignore_index).nonzero().flatten()
            if len(positions) == 0:
                raise ValueError(
                    f"sample {index} of the batch has no label other than ignore_index={self.ignore_index}"
                )
            position = int(positions[int(torch.randint(len(positions), (1,), generator=self._generator))])
            shift = int(torch.randint(1, num_classes, (1,), generator=self._generator))
            target[0, position] = (target[0, position] + shift) % num_classes
        else:
            shift = torch.randint(1, num_classes, target.shape, generator=self._generator).to(target.device)
            target = (target + shift) % num_classes
        return x_edit, target

    def _next_user_edit(self) -> tuple[Any, Any]:
        assert self.edit_samples is not None
        for _ in range(2):
            if self._edit_iterator is None:
                self._edit_iterator = iter(self.edit_samples)
            try:
                x, y = next(self._edit_iterator)
                break
            except StopIteration:
                self._edit_iterator = None
        else:
            raise ValueError("`edit_samples` yielded no (x, y_target) pair")
        y = torch.as_tensor(y)
        if y.dim() == 0:  # an unbatched pair, e.g. from a TensorDataset: add the batch dimension
            x, y = apply_to_collection(x, Tensor, lambda t: t.unsqueeze(0)), y.unsqueeze(0)
        return x, y

    # ------------------------------------------------------------------------------------------ wrapping
    def _wrap(self, pl_module: L.LightningModule) -> None:
        self._unwrap()
        previous = pl_module.__dict__.get("training_step")
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            batch = args[0] if args else kwargs["batch"]
            return self._add_edit_term(pl_module, batch, output)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = (pl_module, previous, training_step)

    def _unwrap(self) -> None:
        if self._wrapped is None:
            return
        pl_module, previous, ours = self._wrapped
        if pl_module.__dict__.get("training_step") is ours:
            if previous is None:
                del pl_module.training_step
            else:
                pl_module.training_step = previous  # type: ignore[method-assign]
        self._wrapped = None

    def _add_edit_term(self, pl_module: L.LightningModule, batch: Any, output: Any) -> Any:
        due = self._batches_seen % self.every_n_steps == 0
        self._batches_seen += 1
        if not due or output is None:  # None: the user skips this batch
            return output
        loss = output["loss"] if isinstance(output, Mapping) else output
        total = loss + self.edit_term(pl_module, batch)
        return {**output, "loss": total} if isinstance(output, Mapping) else total


def _kl(base_logits: Tensor, edited_logits: Tensor) -> Tensor:
    """KL(p_base ‖ p_edited) per row (sample, or token), averaged; ``base_logits`` carries no gradient."""
    classes = base_logits.shape[-1]
    base = F.log_softmax(at_least_float32(base_logits.detach()).reshape(-1, classes), dim=-1)
    edited = F.log_softmax(at_least_float32(edited_logits).reshape(-1, classes), dim=-1)
    return F.kl_div(edited, base, log_target=True, reduction="batchmean")


def _optimized_parameters(optimizer: Any) -> list[Tensor]:
    """Parameters an optimizer updates; for hivemind's optimizer, the model's own tensors (not offloaded copies)."""
    state_averager = getattr(optimizer, "state_averager", None)
    if state_averager is not None and hasattr(state_averager, "main_parameters"):
        return list(state_averager.main_parameters)
    return [p for group in optimizer.param_groups for p in group["params"]]


def _non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (0 switches the term off), got {value!r}")
    return float(value)
