"""A PyTorch Lightning callback that embeds a white-box mark while ``Trainer.fit`` runs.

The callback drives a scheme's :class:`~nnmark.train.TrainingHook` at the points of
Lightning's loop where nnmark's own loop calls it: the scheme's loss term is added
to what ``training_step`` returns (the callback wraps the module's ``training_step``
for the duration of ``fit``), ``after_step`` runs after every optimizer step,
``on_epoch_end`` after every training epoch and, for Wang's schemes, ``finalize``
when training ends. Nothing else of the module or the trainer is touched::

    from nnmark.integrations.lightning import WatermarkCallback

    scheme = Uchida.create(key, module.net, layer="conv4", bits=512)
    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[WatermarkCallback(scheme, attr="net")])
    trainer.fit(module, loader)
    scheme.save("owner.key")

``attr`` names the sub-module the scheme was created for (its layer names are
relative to it); ``None`` (default) means the LightningModule itself. Schemes that
add samples to each batch (trigger sets) need the batch itself, which a callback
does not own: call ``hook.augment_batch`` in your ``training_step`` instead.

Lightning is optional: ``pip install lightning``. Automatic optimisation only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnmark.errors import SchemeError
from nnmark.train import TrainingHook

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("nnmark.integrations.lightning needs PyTorch Lightning: pip install lightning") from exc


class WatermarkCallback(Callback):
    """Embed ``scheme``'s mark during ``Trainer.fit`` (see the module docs).

    Parameters
    ----------
    scheme: a white-box scheme (``Uchida``, ``ProjectionRegularizer``, ``WangAuto``,
        ``WangManu``) created for the network that carries the mark.
    attr: attribute of the LightningModule holding that network (``None``: the module).
    finalize: run the hook's lifecycle step :meth:`~nnmark.train.TrainingHook.finalize` when ``fit`` ends
        (Wang: the secret network alone on the final weights; weight marks: the unit signature for
        alignment; default True).
    """

    def __init__(self, scheme: Any, attr: str | None = None, finalize: bool = True) -> None:
        super().__init__()
        self.scheme = scheme
        self.attr = attr
        self.do_finalize = bool(finalize)
        self.hook: TrainingHook = scheme.training_hook()
        if type(self.hook).augment_batch is not TrainingHook.augment_batch:
            raise SchemeError(f"{scheme.name} adds samples to each batch, which a Lightning callback cannot do: "
                              "call hook.augment_batch(x, y, step) in your training_step instead")
        self._step = 0
        self._original: Any = None

    def network(self, pl_module: nn.Module) -> nn.Module:
        """The network that carries the mark."""
        if self.attr is None:
            return pl_module
        net = getattr(pl_module, self.attr, None)
        if not isinstance(net, nn.Module):
            raise SchemeError(f"the LightningModule has no sub-module {self.attr!r}")
        return net

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise SchemeError("WatermarkCallback supports automatic optimisation only; with manual optimisation "
                              "add hook.loss(model) to your loss and call hook.after_step yourself")
        self.scheme.check_model(self.network(pl_module))
        self.scheme.remember_model(self.network(pl_module))
        original = pl_module.training_step
        self._original = original

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            extra = self.hook.loss(self.network(pl_module))
            if extra is None or out is None:
                return out
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + extra}
            return out + extra

        pl_module.training_step = training_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.hook.after_step(self.network(pl_module), self._step)
        self._step += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.hook.on_epoch_end(self.network(pl_module), trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._original is not None:
            del pl_module.training_step  # the instance attribute: back to the class's method
            self._original = None
        if self.do_finalize:
            self.hook.finalize(self.network(pl_module))
