"""The PyTorch Lightning callback: a white-box mark embedded by ``Trainer.fit`` on a
module that wraps the network, extracted and verified the same as from nnmark's loop."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F

from nnmark.data import load_splits
from nnmark.errors import SchemeError
from nnmark.integrations.lightning import WatermarkCallback
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes import TriggerSetWatermark
from nnmark.schemes.uchida import Uchida
from nnmark.schemes.wang import WangAuto
from nnmark.train import accuracy, seeded_model

BITS = 256


class Classifier(L.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(module: Classifier, data, callbacks, epochs: int = 10) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=32,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)


@pytest.fixture(scope="module")
def digits28():
    torch.set_num_threads(1)
    return load_splits("digits28")


@pytest.mark.parametrize("cls", [Uchida, WangAuto])
def test_callback_embeds_a_verifiable_mark(digits28, cls):
    spec = model_spec("mlp", digits28.train.image_shape, 10)
    net = seeded_model(spec, 3)
    scheme = cls.create(Key.from_seed(f"pl-{cls.name}"), net, layer="head", bits=BITS)
    module = Classifier(net)
    fit(module, digits28.train, [WatermarkCallback(scheme, attr="net")])
    assert "training_step" not in vars(module)  # the wrapper is gone after fit
    v = scheme.verify(net)
    assert v.owned and v.details["ber"] == 0.0 and v.p_value < 1e-30
    assert accuracy(net, digits28.test) > 0.85
    clean = seeded_model(spec, 4)
    fit(Classifier(clean), digits28.train, [])
    assert not scheme.verify(clean).owned


def test_callback_refuses_batch_schemes_and_missing_attr(digits28):
    spec = model_spec("mlp", digits28.train.image_shape, 10)
    net = seeded_model(spec, 0)
    trig = TriggerSetWatermark.create(Key.from_seed("pl"), net, digits28, generator="noise", n=10)
    with pytest.raises(SchemeError, match="augment_batch"):
        WatermarkCallback(trig)
    scheme = Uchida.create(Key.from_seed("pl"), net, layer="head", bits=16)
    with pytest.raises(SchemeError, match="no sub-module 'model'"):
        fit(Classifier(net), digits28.train, [WatermarkCallback(scheme, attr="model")], epochs=1)
