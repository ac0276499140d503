import torch

from nnmark.models import model_spec
from nnmark.train import TrainConfig, TrainingHook, accuracy, seeded_model, train, weighted_cross_entropy


def test_training_is_reproducible_and_leaves_global_rng_alone(digits):
    spec = model_spec("cnn", digits.image_shape, 10)  # has dropout: uses the global generator
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = seeded_model(spec, 0)
    train(a, digits.train, TrainConfig(epochs=1, seed=3, progress=False))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(5)  # disturb the global state: must not matter
    b = seeded_model(spec, 0)
    train(b, digits.train, TrainConfig(epochs=1, seed=3, progress=False))
    assert torch.equal(a.head.weight, b.head.weight)
    c = seeded_model(spec, 0)
    train(c, digits.train, TrainConfig(epochs=1, seed=4, progress=False))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_early_stopping_restores_best(digits):
    spec = model_spec("mlp", digits.image_shape, 10)
    m = seeded_model(spec, 0)
    rec = train(m, digits.train, TrainConfig(epochs=60, lr=0.05, optimizer="sgd", patience=2, seed=0, progress=False),
                val=digits.val)
    assert rec.epochs_run < 60
    assert rec.best_epoch is not None and rec.epochs_run - rec.best_epoch == 2
    assert accuracy(m, digits.val) == max(rec.val_accuracy)


def test_max_steps_budget(digits):
    m = seeded_model(model_spec("mlp", digits.image_shape, 10), 0)
    rec = train(m, digits.train, TrainConfig(epochs=5, max_steps=7, progress=False))
    assert rec.steps == 7


def test_weighted_cross_entropy():
    logits = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    assert torch.allclose(weighted_cross_entropy(logits, y, torch.ones(6)), weighted_cross_entropy(logits, y))
    w = torch.tensor([1, 1, 1, 1, 3, 3.0])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(weighted_cross_entropy(logits, y, w), (ce * w).sum() / 6)


def test_hooks_are_called(digits):
    calls = {"loss": 0, "after": 0, "epoch": 0}

    class Count(TrainingHook):
        def loss(self, model):
            calls["loss"] += 1
            return None

        def after_step(self, model, step):
            calls["after"] += 1

        def on_epoch_end(self, model, epoch):
            calls["epoch"] += 1

    m = seeded_model(model_spec("mlp", digits.image_shape, 10), 0)
    rec = train(m, digits.train, TrainConfig(epochs=2, progress=False), hooks=[Count()])
    assert calls == {"loss": rec.steps, "after": rec.steps, "epoch": 2}
