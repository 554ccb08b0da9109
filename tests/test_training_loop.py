"""The training loop's options do what they claim, measured on real data (load_digits) with the real loop."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin (shared CI box)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from training.data import hold_out, load  # noqa: E402
from training.loop import fit  # noqa: E402
from training.nets import build  # noqa: E402
from training.spec import resolve  # noqa: E402
from training.tasks import make_task, predict  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load(resolve("digits_cnn"))


def train(data, sets: list[str], epochs: int = 3, job: str = "digits_cnn"):
    """(net, fit result, spec) after `epochs` epochs of the real loop with the given overrides."""
    spec = resolve(job, sets=sets, flags={"train.epochs": epochs})
    if spec["task"] == "autoencode":
        data = hold_out(data, spec["data"]["anomaly_class"])
    torch.manual_seed(spec["train"]["seed"])
    net = build(spec, torch.as_tensor(data.train.x[:2]), data.num_classes)
    result = fit(net, make_task(spec, data.num_classes), data, spec, quiet=True)
    return net, result, spec


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in net.parameters() if p.ndim > 1]


@pytest.mark.parametrize(("n", "world"), [(1293, 2), (1294, 2), (10, 3), (7, 4)])
def test_distributed_shards_are_disjoint_and_cover_the_data_once(n: int, world: int) -> None:
    """Every rank gets as many steps as the others (DistributedSampler pads), and apart from the padding repeats
    the shards are disjoint and together hold every training row exactly once, in a new order each epoch."""
    from training.distributed import Dist
    from training.loop import _order

    orders = []
    for epoch in (0, 1):
        shards = [_order(n, 0, epoch, Dist(rank=r, world=world)) for r in range(world)]
        assert len({len(order) for order, _ in shards}) == 1
        real = [i for order, repeats in shards for i in order if i not in repeats]
        assert sorted(real) == list(range(n))
        assert sum(len(repeats) for _, repeats in shards) == -n % world
        assert all(set(order) >= repeats for order, repeats in shards)
        orders.append([order for order, _ in shards])
    assert orders[0] != orders[1]


def test_l1_penalty_shrinks_weights(digits) -> None:
    plain, _, _ = train(digits, ["train.weight_decay=0.0"])
    sparse, _, _ = train(digits, ["train.weight_decay=0.0", "train.l1=0.005"])
    l1 = [sum(float(w.abs().sum()) for w in weights(n)) for n in (plain, sparse)]
    assert l1[1] < 0.5 * l1[0], l1
    tiny = [sum(int((w.abs() < 1e-3).sum()) for w in weights(n)) for n in (plain, sparse)]
    assert tiny[1] > 2 * tiny[0], tiny  # L1 drives weights towards exactly zero


def test_l2_penalty_shrinks_weights(digits) -> None:
    plain, _, _ = train(digits, ["train.weight_decay=0.0"])
    small, _, _ = train(digits, ["train.weight_decay=0.0", "train.l2=0.1"])
    l2 = [sum(float(w.pow(2).sum()) for w in weights(n)) for n in (plain, small)]
    assert l2[1] < 0.5 * l2[0], l2


def test_dropout_is_off_in_eval_and_on_in_training(digits) -> None:
    net, _, _ = train(digits, ["model.dropout=0.5"], epochs=1)
    x = torch.as_tensor(digits.test.x[:64])
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
        for m in net.modules():  # dropout alone in training mode (batch norm would update its statistics)
            if isinstance(m, nn.Dropout):
                m.train()
        c, d = net(x), net(x)
        assert not torch.allclose(c, d)  # a live dropout mask differs call to call
        net.eval()
        assert torch.equal(net(x), a)
    assert torch.equal(a, b)


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.05), ("adam", 0.003), ("adamw", 0.003), ("rmsprop", 0.001)])
def test_each_optimizer_trains(digits, optimizer: str, lr: float) -> None:
    _, result, _ = train(digits, [f"train.optimizer={optimizer}", f"train.lr={lr}"])
    h = result.history
    assert h[-1]["train_loss"] < 0.6 * h[0]["train_loss"], h
    assert max(r["val_accuracy"] for r in h) > 0.8  # chance is 0.1


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_each_loss_trains_a_classifier(digits, loss: str) -> None:
    _, result, _ = train(digits, [f"train.loss={loss}", "train.label_smoothing=0.0"], epochs=4)
    h = result.history
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"], h
    assert max(r["val_accuracy"] for r in h) > 0.8


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_each_loss_trains_an_autoencoder(loss: str) -> None:
    data = load(resolve("digits_autoencoder"))
    net, result, spec = train(data, [f"train.loss={loss}", "evaluate.sweep=false"], epochs=8,
                              job="digits_autoencoder")
    h = result.history
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"], h
    assert h[-1]["val_auroc"] > 0.8


def test_variational_autoencoder_trains_and_is_deterministic_in_eval() -> None:
    data = load(resolve("digits_autoencoder"))
    net, result, _ = train(data, ["model.variational=true", "evaluate.sweep=false"], epochs=8,
                           job="digits_autoencoder")
    assert result.history[-1]["val_auroc"] > 0.75
    x = torch.as_tensor(data.test.x[:32])
    assert torch.equal(predict(net, x, 16), predict(net, x, 32))


def test_activation_and_batch_norm_options_shape_the_net(digits) -> None:
    net, result, _ = train(digits, ["model.activation=tanh", "model.batch_norm=false"], epochs=2)
    kinds = {type(m) for m in net.modules()}
    assert nn.Tanh in kinds and nn.ReLU not in kinds and nn.BatchNorm2d not in kinds
    net, _, _ = train(digits, ["model.activation=gelu"], epochs=1)
    kinds = {type(m) for m in net.modules()}
    assert nn.GELU in kinds and nn.BatchNorm2d in kinds
    assert result.history[-1]["val_accuracy"] > 0.5


def test_same_seed_same_model_other_seed_other_model(digits) -> None:
    a, ra, _ = train(digits, [], epochs=2)
    b, rb, _ = train(digits, [], epochs=2)
    c, _, _ = train(digits, ["train.seed=1"], epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert ra.history[-1]["val_loss"] == rb.history[-1]["val_loss"]
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_step_and_cosine_schedules(digits) -> None:
    _, result, spec = train(digits, ["train.schedule=step", "train.step_epochs=2", "train.gamma=0.1"], epochs=4)
    lrs = [r["lr"] for r in result.history]  # the lr after each epoch's last step
    base = spec["train"]["lr"]
    assert lrs[0] == pytest.approx(base) and lrs[1] == pytest.approx(base * 0.1) and lrs[3] == pytest.approx(
        base * 0.01)
    _, result, _ = train(digits, ["train.schedule=cosine"], epochs=3)
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] > lrs[1] > lrs[2] and lrs[2] < 1e-6


def test_early_stopping_stops_and_restores_the_best_epoch(digits) -> None:
    # A tiny lr-free plateau: with lr 0 nothing improves after epoch 1, so patience 2 stops at epoch 3.
    net, result, _ = train(digits, ["train.schedule=none", "train.lr=1e-12", "train.patience=2",
                                    "model.dropout=0.0"], epochs=20)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    # With real learning it keeps the epoch with the lowest validation loss, not the last one.
    net, result, spec = train(digits, ["train.patience=3", "train.schedule=none", "train.lr=0.03"], epochs=15)
    losses = [r["val_loss"] for r in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    task = make_task(spec, digits.num_classes)
    restored = task.evaluate(net, torch.as_tensor(digits.val.x), torch.as_tensor(digits.val.y), 512)["loss"]
    assert math.isclose(restored, min(losses), rel_tol=1e-5)


@pytest.mark.parametrize(("cell", "layers", "conv"), [("gru", 1, 16), ("lstm", 2, 8), ("gru", 2, 0)])
def test_stream_cell_steps_to_the_whole_sequence_answer(cell: str, layers: int, conv: int) -> None:
    from training.nets_seq import RecurrentConfig, RecurrentNet, StreamCell

    torch.manual_seed(0)
    net = RecurrentNet(RecurrentConfig(classes=10, conv_channels=conv, kernel_size=3, dilations=[1, 2], cell=cell,
                                       hidden=12, layers=layers, bidirectional=False, activation="gelu", dropout=0.0,
                                       batch_norm=True)).eval()
    for m in net.modules():  # non-trivial batch-norm statistics, so eval-mode normalisation is exercised
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    step = StreamCell(net)
    x = torch.randn(5, 23, 1)
    h = torch.zeros(5, step.state_size)
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, h = step(x[:, t], h)
        whole = net(x)
    assert torch.allclose(y, whole, atol=1e-5), float((y - whole).abs().max())
    with pytest.raises(ValueError, match="bidirectional"):
        StreamCell(RecurrentNet(RecurrentConfig(conv_channels=0, dilations=[1], hidden=8, bidirectional=True)))
