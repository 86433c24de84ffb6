"""Editing a trained network: the in-graph editor, edit losses, :func:`edit` and :func:`evaluate_edits`.

An **edit** (Sinitsin et al., "Editable Neural Networks", ICLR 2020) fixes one mistake of a trained model: the
model should answer ``y_target`` on input ``x``. The editor takes a few gradient steps on a small set of *editable*
parameters θ_e only,

    θ_e ← θ_e − lr · u(∇ l_e(θ)),

where ``u`` is the plain gradient (``"gd"``), a momentum sum (``"momentum"``) or an RMSProp-scaled gradient
(``"rmsprop"``). It stops as soon as the *edit loss* ``l_e`` reaches 0 (success) or after ``max_steps`` steps
(failure). The edit loss is zero exactly when the target wins:

    l_e = relu(max_{y ≠ y*} log p_y − log p_{y*})

so "success" means the edited model predicts ``y_target``. For sequence models (logits ``[B, T, V]``, targets
``[B, T]``) the same margin is taken per token and averaged over tokens that are not ``ignore_index``; it is zero
exactly when every target token wins (greedy, teacher-forced).

Everything here is *functional*: parameters are a ``{name: tensor}`` dict substituted into the model with
:func:`torch.func.functional_call`, so an edit never touches the model unless asked to (``edit(..., inplace=True)``),
:func:`evaluate_edits` applies a thousand independent edits to the same unedited model without copying it, and
:class:`~lightning_moshpit.callbacks.EditableTraining` can differentiate through the editor's steps
(``create_graph=True``) to train a model that is easy to edit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

#: A function ``(logits, y_target) -> scalar loss`` that is >= 0 and exactly 0 when the edit has succeeded.
EditLoss = Callable[[Tensor, Tensor], Tensor]
#: ``forward_fn(model, inputs) -> output``: how to call the model on a batch's inputs (output may have ``.logits``).
ForwardFn = Callable[[nn.Module, Any], Any]
#: ``batch_to_inputs(batch) -> (inputs, labels)``: how to split a batch; ``labels`` may be ``None``.
BatchToInputs = Callable[[Any], tuple[Any, Optional[Tensor]]]
#: Which parameters are editable: a glob or module name, or several (see :func:`select_editable`).
Selector = Union[str, Sequence[str]]

EDITOR_KINDS = ("gd", "momentum", "rmsprop")
EDIT_LOSSES = ("classification", "tokens")
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------- edit losses
def classification_edit_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``relu(max_{y≠y*} log p_y − log p_{y*})``, averaged over the edited samples (logits ``[B, C]``, target ``[B]``).

    Exactly zero when the target class has the highest probability for every sample, so the editor stops there.
    Also accepts any leading shape (``[B, T, V]`` with ``[B, T]``); entries equal to ``ignore_index`` are skipped.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"edit loss: logits of shape {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(target.shape)}"
        )
    log_probs = F.log_softmax(at_least_float32(logits), dim=-1)
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target)).long()
    target_log_prob = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    is_target = F.one_hot(safe_target, num_classes=log_probs.shape[-1]).bool()
    best_other = log_probs.masked_fill(is_target, float("-inf")).amax(dim=-1)
    margins = F.relu(best_other - target_log_prob) * keep
    return margins.sum() / keep.sum().clamp_min(1)


def at_least_float32(tensor: Tensor) -> Tensor:
    """Half-precision logits are upcast for the log-softmax; float32 and float64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def token_edit_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean-token margin for sequence models: logits ``[B, T, V]``, target tokens ``[B, T]``.

    The per-token margin ``relu(max_{v≠y*_t} log p_{t,v} − log p_{t,y*_t})`` is averaged over the tokens that are not
    ``ignore_index`` (padding, prompt). It is zero exactly when the target wins at every kept position.
    """
    if logits.dim() != 3:
        raise ValueError(f"token edit loss needs logits of shape [B, T, V], got {tuple(logits.shape)}")
    return classification_edit_loss(logits, target, ignore_index)


def resolve_edit_loss(edit_loss: Union[str, EditLoss]) -> EditLoss:
    """``"classification"``, ``"tokens"`` or a callable ``(logits, y_target) -> loss`` (>= 0, 0 on success)."""
    if callable(edit_loss):
        return edit_loss
    if edit_loss == "classification":
        return classification_edit_loss
    if edit_loss == "tokens":
        return token_edit_loss
    raise ValueError(
        f"`edit_loss` must be one of {EDIT_LOSSES} or a callable (logits, y_target) -> loss, got {edit_loss!r}"
    )


# ---------------------------------------------------------------------------------------------------- the editor
class InGraphEditor(nn.Module):
    """The optimizer that performs an edit: a few differentiable steps ``θ_e ← θ_e − lr · u(g)`` on a param dict.

    Unlike a ``torch.optim`` optimizer it never writes into parameters: :meth:`step` returns *new* tensors, so the
    whole edit stays in the autograd graph and training can backpropagate through it (second order).

    Args:
        kind: The update ``u(g)``. ``"gd"``: the gradient itself. ``"momentum"``: ``v ← momentum·v + g``.
            ``"rmsprop"``: ``g / sqrt(s + eps)`` with ``s ← beta·s + (1 − beta)·g²`` (``s`` starts at ``g²``, so the
            first step is sign-like and scale-free; a good default when you do not know the gradient scale).
        lr: Step size. Default: 0.1 for ``"gd"`` and ``"momentum"``, 0.01 for ``"rmsprop"``. Too small and edits
            fail within ``max_steps``; too large and they overshoot and disturb other predictions.
        momentum: Momentum coefficient in [0, 1) for ``kind="momentum"``.
        beta: RMSProp decay in (0, 1) for ``kind="rmsprop"``.
        eps: RMSProp denominator guard. Larger is smoother for second-order training.
        learnable_lr: Make ``lr`` an ``nn.Parameter`` (stored as ``log_lr``) trained together with the model.
        learnable_beta: Make ``beta`` an ``nn.Parameter`` (stored as a logit); only for ``"rmsprop"``.
    """

    def __init__(self, kind: str = "gd", lr: Optional[float] = None, momentum: float = 0.9, beta: float = 0.9,
                 eps: float = 1e-6, learnable_lr: bool = False, learnable_beta: bool = False) -> None:  # fmt: skip
        super().__init__()
        if kind not in EDITOR_KINDS:
            raise ValueError(f"`editor` must be one of {EDITOR_KINDS} or an InGraphEditor, got {kind!r}")
        lr = (0.01 if kind == "rmsprop" else 0.1) if lr is None else lr
        _check_number("lr", lr, low=0.0, low_inclusive=False, accepted="a positive number")
        _check_number("momentum", momentum, low=0.0, high=1.0, accepted="a number in [0, 1)")
        _check_number("beta", beta, low=0.0, high=1.0, low_inclusive=False, accepted="a number in (0, 1)")
        _check_number("eps", eps, low=0.0, low_inclusive=False, accepted="a positive number")
        if learnable_beta and kind != "rmsprop":
            raise ValueError(f"`learnable_beta=True` needs `editor='rmsprop'`, got editor={kind!r}")
        self.kind, self.momentum, self.eps = kind, float(momentum), float(eps)
        self._lr, self._beta = float(lr), float(beta)
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr))) if learnable_lr else None
        self.beta_logit = nn.Parameter(torch.logit(torch.tensor(float(beta)))) if learnable_beta else None

    @property
    def learnable(self) -> bool:
        """Whether this editor has parameters that training should update."""
        return any(True for _ in self.parameters())

    def lr(self, like: Tensor) -> Tensor:
        """The current step size as a tensor on ``like``'s device (differentiable when learnable)."""
        if self.log_lr is not None:
            return self.log_lr.exp().to(like.device)
        return torch.tensor(self._lr, device=like.device, dtype=like.dtype)

    def beta(self, like: Tensor) -> Tensor:
        """The current RMSProp decay as a tensor on ``like``'s device (differentiable when learnable)."""
        if self.beta_logit is not None:
            return torch.sigmoid(self.beta_logit).to(like.device)
        return torch.tensor(self._beta, device=like.device, dtype=like.dtype)

    def step(self, params: dict[str, Tensor], grads: Sequence[Optional[Tensor]],
             state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
        """One update: returns new ``(params, state)``; ``state`` starts as ``{}``. ``None`` gradients are skipped."""
        new_params, new_state = dict(params), dict(state)
        for (name, param), grad in zip(params.items(), grads):
            if grad is None:
                continue
            update = grad
            if self.kind == "momentum":
                update = grad if name not in state else self.momentum * state[name] + grad
                new_state[name] = update
            elif self.kind == "rmsprop":
                square = grad * grad
                if name in state:
                    beta = self.beta(grad)
                    square = beta * state[name] + (1 - beta) * square
                new_state[name] = square
                update = grad / torch.sqrt(square + self.eps)
            new_params[name] = param - self.lr(param) * update
        return new_params, new_state

    def extra_repr(self) -> str:
        lr = "learnable" if self.log_lr is not None else self._lr
        return f"kind={self.kind!r}, lr={lr}, momentum={self.momentum}, beta={self._beta}"


def make_editor(editor: Union[str, InGraphEditor] = "gd", *, lr: Optional[float] = None,
                momentum: Optional[float] = None, beta: Optional[float] = None, learnable_lr: bool = False,
                learnable_beta: bool = False) -> InGraphEditor:  # fmt: skip
    """An :class:`InGraphEditor` from a kind name and settings, or the given editor (then settings must be unset)."""
    if isinstance(editor, InGraphEditor):
        given = {"lr": lr, "momentum": momentum, "beta": beta, "learnable_lr": learnable_lr or None,
                 "learnable_beta": learnable_beta or None}  # fmt: skip
        clashing = sorted(name for name, value in given.items() if value is not None)
        if clashing:
            raise ValueError(
                f"{clashing} cannot be combined with an InGraphEditor instance: pass them to InGraphEditor"
            )
        return editor
    if not isinstance(editor, str):
        raise ValueError(f"`editor` must be one of {EDITOR_KINDS} or an InGraphEditor, got {editor!r}")
    options: dict[str, Any] = {"lr": lr, "learnable_lr": learnable_lr, "learnable_beta": learnable_beta}
    if momentum is not None:
        options["momentum"] = momentum
    if beta is not None:
        options["beta"] = beta
    return InGraphEditor(editor, **options)


# ---------------------------------------------------------------------------------------------------- selection
def select_editable(model: nn.Module, editable: Selector) -> list[str]:
    """Names of ``model``'s parameters that ``editable`` selects, in ``named_parameters`` order.

    Each pattern is matched with :func:`fnmatch.fnmatch` against parameter names (``"classifier.*"``,
    ``"layer3.*"``, ``"*.bias"``); a plain module name also selects everything under it (``"classifier"``).
    Parameters of an :class:`InGraphEditor` attached to the model (learnable editor settings) are never editable.
    """
    patterns = check_selector(editable)
    excluded = {id(p) for module in model.modules() if isinstance(module, InGraphEditor) for p in module.parameters()}
    names = [name for name, param in model.named_parameters() if id(param) not in excluded]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) or n.startswith(p.rstrip(".") + ".") for p in patterns)]
    if not chosen:
        sample = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(
            f"`editable`={editable!r} matched no parameter of {type(model).__name__}; patterns are fnmatch globs or "
            f"module names matched against named_parameters() names, which are: {sample or '(none)'}"
        )
    return chosen


# ---------------------------------------------------------------------------------------------------- forward
def default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict (Hugging Face style), ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def default_batch_to_inputs(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """``(x, y, ...)`` → ``(x, y)``; a dict → (every key but ``"labels"``, ``batch["labels"]`` or ``None``)."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, labels); the default expects an "
        f"(x, y) tuple or a dict with 'labels'. Pass `batch_to_inputs=lambda batch: (inputs, labels)`"
    )


def logits_of(output: Any) -> Tensor:
    """The logits in a model output: a tensor, ``output.logits`` (Hugging Face), ``output["logits"]`` or ``output[0]``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; pass a `forward_fn` that returns them"
    )


class _Call(nn.Module):
    """``forward_fn(model, inputs)`` as a module, so ``functional_call`` can substitute ``model``'s parameters."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model, self.forward_fn = model, forward_fn

    def forward(self, inputs: Any) -> Tensor:
        try:
            output = self.forward_fn(self.model, inputs)
        except NotImplementedError as error:
            if 'required "forward"' not in str(error):
                raise
            raise NotImplementedError(
                f"{type(self.model).__name__} defines no forward(), which edits call by default; define one or pass "
                f"`forward_fn=lambda module, inputs: ...` (e.g. `lambda module, x: module.net(x)`)"
            ) from None
        return logits_of(output)


class FunctionalModel:
    """Calls ``forward_fn(model, inputs)`` with some of ``model``'s parameters replaced by given tensors.

    ``FunctionalModel(model)(params, inputs)`` runs the model with ``params`` (a ``{name: tensor}`` dict, names as in
    ``model.named_parameters()``) substituted through :func:`torch.func.functional_call` and returns the logits.
    Every other parameter and buffer is the model's own, so gradients flow both into ``params`` and into the rest
    of the model.
    """

    def __init__(self, model: nn.Module, forward_fn: Optional[ForwardFn] = None) -> None:
        self.module = _Call(model, forward_fn or default_forward)

    def __call__(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        return functional_call(self.module, {f"model.{name}": t for name, t in params.items()}, (inputs,))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run edits like inference: dropout off, BatchNorm on running statistics; every module's mode is restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------------- the edit loop
@dataclasses.dataclass
class EditRun:
    """What one run of the editor produced (tensors keep their graph when run with ``create_graph=True``)."""

    params: dict[str, Tensor]  #: the edited values of the editable parameters
    success: bool  #: the edit loss reached 0 within ``max_steps``
    steps: int  #: editor steps taken (0 when the model already predicted the target)
    loss: Tensor  #: the edit loss of the edited model (0 on success)


def run_editor(model: FunctionalModel, params: dict[str, Tensor], x: Any, y_target: Tensor, loss_fn: EditLoss,
               editor: InGraphEditor, max_steps: int, create_graph: bool) -> EditRun:  # fmt: skip
    """Step ``params`` until ``loss_fn(model(params, x), y_target) <= 0`` or ``max_steps`` steps were taken.

    With ``create_graph=True`` every step stays differentiable, so the returned params and loss carry gradients back
    to the original parameters, to the non-editable ones upstream and to learnable editor settings (second order).
    With ``False`` each step is detached: a cheap first-order edit for patching a trained model.
    """
    if not create_graph:
        params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    state: dict[str, Tensor] = {}
    step = 0
    while True:
        with torch.enable_grad():
            loss = loss_fn(model(params, x), y_target)
        if loss.item() <= 0:
            return EditRun(params, True, step, loss)
        if step >= max_steps:
            return EditRun(params, False, step, loss)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph, allow_unused=True)
            params, state = editor.step(params, grads, state)
        if not create_graph:
            params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
            state = {name: s.detach() for name, s in state.items()}
        step += 1


@dataclasses.dataclass
class EditResult:
    """The outcome of :func:`edit`."""

    model: nn.Module  #: the edited model (a copy unless ``inplace=True``)
    success: bool  #: the edited model predicts ``y_target`` (edit loss 0) within ``max_steps``
    steps: int  #: editor steps taken
    loss: float  #: the edit loss after the last step (0.0 on success)


def edit(model: nn.Module, x: Any, y_target: Tensor, *, editable: Selector = "*",
         editor: Union[str, InGraphEditor] = "gd", lr: Optional[float] = None, max_steps: int = 10,
         edit_loss: Union[str, EditLoss] = "classification", forward_fn: Optional[ForwardFn] = None,
         inplace: bool = False) -> EditResult:  # fmt: skip
    """Patch a trained model so that it answers ``y_target`` on ``x``, changing only the ``editable`` parameters.

    Example::

        result = edit(model, x[None], torch.tensor([3]), editable="classifier.*", editor="rmsprop")
        if result.success:
            model = result.model          # predicts class 3 on x; everything but classifier.* is unchanged

    Args:
        model: Any ``nn.Module`` (a LightningModule, a Hugging Face classifier whose output has ``.logits``, ...).
        x: The inputs to fix, with a leading batch dimension (a tensor, a tuple of tensors or a dict of them).
        y_target: The wanted answer: class indices ``[B]`` (or tokens ``[B, T]`` with ``edit_loss="tokens"``).
        editable: Which parameters may change (see :func:`select_editable`); default all.
        editor: ``"gd"``, ``"momentum"``, ``"rmsprop"`` or an :class:`InGraphEditor` (e.g. the one a model was
            trained with, ``model.editable_editor``, which carries learned settings).
        lr: Editor step size when ``editor`` is a name (default: the kind's default, see :class:`InGraphEditor`).
        max_steps: Give up after this many editor steps.
        edit_loss: ``"classification"``, ``"tokens"`` or a callable ``(logits, y_target) -> loss``.
        forward_fn: ``forward_fn(model, x) -> output`` when ``model(x)`` is not how to call it.
        inplace: Write the edit into ``model`` itself instead of a copy.

    The edit runs in eval mode (dropout off, BatchNorm statistics frozen) and is first order; only the selected
    parameters are written.
    """
    max_steps = check_max_steps(max_steps)
    loss_fn = resolve_edit_loss(edit_loss)
    the_editor = make_editor(editor, lr=lr)
    names = select_editable(model, editable)
    own = dict(model.named_parameters())
    functional = FunctionalModel(model, forward_fn)
    with eval_mode(model):
        run = run_editor(functional, {n: own[n] for n in names}, x, y_target, loss_fn, the_editor, max_steps, False)
    target = model if inplace else copy.deepcopy(model)
    targets = dict(target.named_parameters())
    with torch.no_grad():
        for name, value in run.params.items():
            targets[name].copy_(value)
    return EditResult(target, run.success, run.steps, float(run.loss.detach()))


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class EditEvaluation:
    """How editable a model is (the paper's metrics), from :func:`evaluate_edits`."""

    base_error: float  #: error rate of the unedited model on the evaluation data
    success_rate: float  #: share of edits whose loss reached 0 within ``max_steps``
    mean_steps: float  #: mean editor steps per edit
    drawdown: float  #: mean (error after one edit − base error), each edit applied to the unedited model
    num_edits: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def random_label_edits(inputs: Tensor, labels: Tensor, num_edits: int, num_classes: int,
                       seed: int = 0) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
    """``num_edits`` edits ``(x[i:i+1], wrong label)``: random samples, each with a uniformly random wrong class."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(inputs), (num_edits,), generator=generator)
    shift = torch.randint(1, num_classes, (num_edits,), generator=generator)
    wrong = (labels[index].cpu() + shift) % num_classes
    return [(inputs[i : i + 1], wrong[k : k + 1].to(labels.device)) for k, i in enumerate(index.tolist())]


def evaluate_edits(model: nn.Module, dataloader: Iterable[Any], edits: Iterable[tuple[Any, Tensor]], *,
                   editable: Selector = "*", editor: Union[str, InGraphEditor] = "gd", lr: Optional[float] = None,
                   max_steps: int = 10, edit_loss: Union[str, EditLoss] = "classification",
                   forward_fn: Optional[ForwardFn] = None, batch_to_inputs: Optional[BatchToInputs] = None,
                   ignore_index: int = IGNORE_INDEX) -> EditEvaluation:  # fmt: skip
    """Apply each edit to the *unedited* model and measure success rate, mean steps and drawdown on ``dataloader``.

    ``edits`` yields ``(x, y_target)`` pairs with a leading batch dimension (see :func:`random_label_edits`).
    Drawdown is the paper's: the error on ``dataloader`` after one edit minus the base error, averaged over edits.
    The model is never copied: each edit's parameters are substituted with ``functional_call``. The evaluation
    batches are read once and kept in memory, so pass a held-out set of a sensible size. Errors count
    ``argmax != label`` over every label that is not ``ignore_index`` (per token for sequence models).
    """
    max_steps = check_max_steps(max_steps)
    loss_fn = resolve_edit_loss(edit_loss)
    the_editor = make_editor(editor, lr=lr)
    split = batch_to_inputs or default_batch_to_inputs
    names = select_editable(model, editable)
    own = dict(model.named_parameters())
    originals = {n: own[n].detach() for n in names}
    functional = FunctionalModel(model, forward_fn)
    batches = [split(batch) for batch in dataloader]
    if not batches or any(labels is None for _, labels in batches):
        raise ValueError("`dataloader` must yield batches with labels to measure errors (got none or no labels)")

    def error(params: dict[str, Tensor]) -> float:
        wrong = counted = 0
        with torch.no_grad():
            for inputs, labels in batches:
                predictions = functional(params, inputs).argmax(dim=-1)
                keep = labels != ignore_index
                wrong += int(((predictions != labels) & keep).sum())
                counted += int(keep.sum())
        return wrong / max(counted, 1)

    successes, steps, errors = [], [], []
    with eval_mode(model):
        base_error = error(originals)
        for x, y_target in edits:
            run = run_editor(functional, originals, x, y_target, loss_fn, the_editor, max_steps, False)
            successes.append(run.success)
            steps.append(run.steps)
            errors.append(error({n: p.detach() for n, p in run.params.items()}))
    if not successes:
        raise ValueError("`edits` is empty: pass (x, y_target) pairs, e.g. from random_label_edits(...)")
    return EditEvaluation(
        base_error=base_error,
        success_rate=sum(successes) / len(successes),
        mean_steps=sum(steps) / len(steps),
        drawdown=sum(errors) / len(errors) - base_error,
        num_edits=len(successes),
    )


# ---------------------------------------------------------------------------------------------------- validation
def check_selector(editable: Any) -> list[str]:
    """The patterns of an ``editable`` selector, or a ``ValueError`` naming what is accepted."""
    patterns = [editable] if isinstance(editable, str) else list(editable) if isinstance(editable, Sequence) else None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"`editable` must be a parameter-name glob or module name (e.g. 'classifier.*'), or a non-empty list of "
            f"them, got {editable!r}"
        )
    return patterns


def check_max_steps(max_steps: Any) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an integer >= 1 (editor steps before an edit fails), got {max_steps!r}")
    return max_steps


def _check_number(name: str, value: Any, low: float, high: float = math.inf, low_inclusive: bool = True,
                  accepted: str = "a number") -> None:  # fmt: skip
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
