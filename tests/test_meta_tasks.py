"""The meta-training distribution: its tasks train and are what their modules compute, task
augmentation is a reparameterization, sampling is seeded and resumes exactly, and recipes
without a distribution run as they did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_meta_training import _assert_same_weights, _kill_when_writing_state_json, _Killed, tiny
from torch import nn

from flatl2o.meta import data
from flatl2o.meta.recipe import RecipeError, load_recipe, recipe_from_dict
from flatl2o.meta.tasks import TASKS, TaskDistribution, make_task
from flatl2o.meta.trainer import MetaTrainer

REPO = Path(__file__).parents[1]
NEW_TASKS = [
    "mnist-mlp-gelu-32",
    "mnist-mlp-tanh-32x32",
    "digits-mlp-relu-32x32x32",
    "digits-mlp-gelu-128",
    "digits-mlp-tanh-64x64",
    "digits-mlp-sigmoid-32x32",
    "digits-cnn-bn",
    "digits-lstm",
    "text-transformer-32",
    "text-transformer-16x2",
    "friedman-mlp",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the tasks ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW_TASKS)
def test_every_new_task_trains_under_adam_in_100_steps(name):
    task = make_task(name)
    theta = task.init_params(torch.Generator().manual_seed(3)).requires_grad_(True)
    before = task.evaluate(theta, "val")["loss"]
    opt = torch.optim.Adam([theta], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        task.loss(theta, x, y).backward()
        opt.step()
    after = task.evaluate(theta, "val")["loss"]
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", NEW_TASKS)
def test_functional_loss_and_gradient_equal_the_modules(name):
    task = make_task(name, batch_size=8)
    theta = task.init_params(torch.Generator().manual_seed(1)).requires_grad_(True)
    x, y = task.sample_batch(torch.Generator().manual_seed(2))
    loss = task.loss(theta, x, y)
    (grad,) = torch.autograd.grad(loss, theta)

    task.load_params(theta)
    task.module.zero_grad(set_to_none=True)
    ref = task.loss_fn(task.module(x), y)
    ref.backward()
    ref_grad = torch.cat([p.grad.reshape(-1) for p in task.module.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_segment_sizes_cut_theta_into_the_trainable_tensors(name):
    task = make_task(name)
    sizes = [p.numel() for p in task.module.parameters() if p.requires_grad]
    assert task.segment_sizes == sizes and sum(task.segment_sizes) == task.num_params
    pieces = task.unflatten(torch.arange(task.num_params, dtype=torch.float32))
    assert [v.numel() for v in pieces.values()] == task.segment_sizes


def test_the_batchnorm_task_holds_no_state_outside_theta():
    """BatchNorm uses batch statistics and keeps no running buffers, so the loss is a pure
    function of (theta, batch) and evaluation does not depend on what ran before."""
    task = make_task("digits-cnn-bn")
    assert any(isinstance(m, nn.BatchNorm2d) for m in task.module.modules())
    assert list(task.module.buffers()) == []
    theta = task.init_params(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    first = task.evaluate(theta, "val")
    for _ in range(3):
        task.loss(theta, *task.sample_batch(torch.Generator().manual_seed(5)))
    assert task.loss(theta, x, y) == task.loss(theta, x, y)
    assert task.evaluate(theta, "val") == first


def test_embeddings_and_recurrent_weights_are_drawn_from_the_generator():
    for name, key in (
        ("text-transformer-32", "tok.weight"),
        ("digits-lstm", "1.lstm.weight_ih_l0"),
    ):
        task = make_task(name)
        a = task.unflatten(task.init_params(torch.Generator().manual_seed(0)))
        b = task.unflatten(task.init_params(torch.Generator().manual_seed(1)))
        assert not torch.equal(a[key], b[key])
    lstm = make_task("digits-lstm")
    named = lstm.unflatten(lstm.init_params(torch.Generator().manual_seed(0)))
    assert float(named["1.lstm.weight_hh_l0"].std()) == pytest.approx(1 / math.sqrt(32), rel=0.1)
    assert torch.count_nonzero(named["1.lstm.bias_ih_l0"]) == 0


# ---- task augmentation ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits-cnn-bn", "text-transformer-16x2", "friedman-mlp"])
def test_augmentation_is_a_reparameterization(name):
    """phi with theta_T = s_T * phi_T: same loss of theta, gradient times s, init divided by s."""
    task = make_task(name, batch_size=8)
    n = len(task.segment_sizes)
    s = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-3, 3))
    aug = task.variant(scales=s)
    per_coord = torch.repeat_interleave(s.float(), torch.tensor(task.segment_sizes))

    phi = aug.init_params(torch.Generator().manual_seed(4))
    theta = task.init_params(torch.Generator().manual_seed(4))
    torch.testing.assert_close(phi * per_coord, theta, rtol=1e-6, atol=1e-7)

    phi = phi.requires_grad_(True)
    theta = (phi * per_coord).detach().requires_grad_(True)
    x, y = task.sample_batch(torch.Generator().manual_seed(9))
    loss_phi, loss_theta = aug.loss(phi, x, y), task.loss(theta, x, y)
    torch.testing.assert_close(loss_phi, loss_theta, rtol=1e-6, atol=0)
    (g_phi,) = torch.autograd.grad(loss_phi, phi)
    (g_theta,) = torch.autograd.grad(loss_theta, theta)
    torch.testing.assert_close(g_phi, per_coord * g_theta, rtol=1e-4, atol=1e-7)

    assert aug.evaluate(phi, "val") == pytest.approx(task.evaluate(theta, "val"), rel=1e-5)
    aug.load_params(phi)
    module_theta = torch.cat([p.detach().reshape(-1) for p in task.module.parameters()])
    torch.testing.assert_close(module_theta, theta.detach())
    torch.testing.assert_close(aug.flatten(dict(task.module.named_parameters())), phi.detach())
    # scales compose; the original task is untouched
    twice = task.variant(scales=s.sqrt()).variant(scales=s.sqrt())
    assert twice.tensor_scales == pytest.approx(aug.tensor_scales)
    assert task.tensor_scales is None and task.batch_size == 8


def test_variant_checks_its_arguments():
    task = make_task("digits-mlp")
    with pytest.raises(ValueError, match="one number per trainable tensor"):
        task.variant(scales=[1.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        task.variant(scales=[1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive int"):
        task.variant(batch_size=0)
    assert task.variant(batch_size=7).batch_size == 7


# ---- the sampled distribution ----------------------------------------------------------------
def _draws(dist: TaskDistribution, seed: int, count: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (t.name, t.batch_size, t.tensor_scales) for t in (dist.sample(gen) for _ in range(count))
    ]


def test_distribution_sampling_is_seeded_and_varies_task_batch_and_scales():
    tasks = [make_task(n) for n in ("digits-mlp", "digits-lstm", "friedman-mlp")]
    dist = TaskDistribution(
        tasks, [1.0, 2.0, 1.0], batch_scales=[0.5, 1.0], scale_range=[0.01, 100.0]
    )
    draws = _draws(dist, 0, 30)
    assert draws == _draws(dist, 0, 30) and draws != _draws(dist, 1, 30)
    assert {d[0] for d in draws} == {t.name for t in tasks}
    assert {d[1] for d in draws} == {64, 128}
    scales = [s for d in draws for s in d[2]]
    assert all(0.01 <= s <= 100.0 for s in scales) and min(scales) < 0.1 and max(scales) > 10


def test_one_task_with_nothing_to_vary_draws_nothing():
    task = make_task("digits-mlp")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert TaskDistribution([task]).sample(gen) is task
    assert torch.equal(gen.get_state(), state)


DISTRIBUTION = {
    "task": {
        "name": "digits-mlp",
        "families": ["digits-mlp", "digits-cnn-bn", "friedman-mlp", "text-transformer-16x2"],
        "weights": [2, 1, 1, 1],
        "batch_scales": [0.25, 0.5],
        "scale_range": [0.1, 10.0],
    },
    "train": {"iterations": 4, "checkpoint_every": 2, "meta_loss": "log"},
}


def test_sampled_distribution_resumes_to_the_same_weights(tmp_path):
    recipe = recipe_from_dict(tiny(**DISTRIBUTION))
    MetaTrainer(recipe, tmp_path / "full", progress=False).run()
    log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    drawn = [json.loads(line)["task"] for line in log]
    assert len(drawn) == 4 and len(set(drawn)) > 1, drawn  # trajectories trained different tasks

    cut = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as m:  # killed right after the checkpoint of iteration 2
        _kill_when_writing_state_json(m, iteration=2)
        with pytest.raises(_Killed):
            MetaTrainer(recipe, cut, progress=False).run()
    MetaTrainer(recipe, cut, resume=True, progress=False).run()
    _assert_same_weights(tmp_path / "full", cut)


# ---- recipes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"families": ["digits-mlp", "nope"]}, r"\[task\]\.families: unknown task 'nope'"),
        ({"families": ["digits-mlp", "digits-mlp"]}, "lists a task twice"),
        ({"families": ["digits-mlp"], "weights": [1, 2]}, "has 2 entries but"),
        ({"families": ["digits-mlp"], "weights": [0]}, r"weights must hold finite numbers > 0"),
        ({"batch_scales": [1, -1]}, r"batch_scales must hold finite numbers > 0"),
        ({"scale_range": [10, 1]}, r"scale_range must be \[low, high\]"),
        ({"scale_range": [1, 2, 3]}, r"scale_range must be \[low, high\]"),
        ({"families": "digits-mlp"}, r"\[task\]\.families must be list"),
        ({"families": [1]}, r"must be a list of strings"),
        ({"scale_range": ["a", "b"]}, r"must be a list of numbers"),
    ],
)
def test_bad_distribution_keys_are_recipe_errors(task, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tiny(task=task))


def test_families_with_a_user_task_is_refused(tmp_path):
    recipe = recipe_from_dict(tiny(task={"families": ["digits-mlp"]}))
    with pytest.raises(RecipeError, match="families"):
        MetaTrainer(recipe, tmp_path, task=make_task("digits-mlp"), progress=False)


@pytest.mark.parametrize("path", sorted(REPO.glob("pretrained/*/recipe.toml")), ids=str)
def test_shipped_recipes_train_on_their_one_task_and_draw_nothing_more(path, tmp_path):
    recipe = load_recipe(path)
    assert (recipe.task.families, recipe.task.weights) == ([], [])
    assert (recipe.task.batch_scales, recipe.task.scale_range) == ([], [])
    trainer = MetaTrainer(recipe, tmp_path, progress=False)
    state = trainer.generator.get_state()
    assert trainer.distribution.sample(trainer.generator) is trainer.task
    assert torch.equal(trainer.generator.get_state(), state)


def test_the_documented_distribution_recipe_loads(tmp_path):
    """The [task] table docs/meta-training.md gives for the distribution is a valid recipe."""
    page = (REPO / "docs" / "meta-training.md").read_text()
    section = page.split("## The meta-training distribution", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "r.toml").write_text(block)
    recipe = load_recipe(tmp_path / "r.toml")
    assert len(recipe.task.families) >= 10 and recipe.task.scale_range
    assert recipe.train.meta_loss == "log"


# ---- data ----------------------------------------------------------------------------------
def test_text_windows_are_next_byte_pairs_split_by_position():
    ds = data.load_text()
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.int64 and split.x.shape[1] == 32
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])
    assert int(ds.train.index.max()) < int(ds.val.index.min()) < int(ds.test.index.min())
    text, info = data.read_text_corpus()
    assert info["bytes"] == len(text) and "optim" not in info["source"]
    first = torch.tensor(list(text[:33]))
    assert torch.equal(ds.train.x[0], first[:32]) and torch.equal(ds.train.y[0], first[1:])


def test_regression_data_is_standardized_with_train_statistics_only():
    ds = data.load_friedman()
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1400, 200, 400)
    assert abs(float(ds.train.y.mean())) < 1e-5 and float(ds.train.y.std()) == pytest.approx(
        1, rel=1e-3
    )
    assert torch.allclose(ds.train.x.mean(0), torch.zeros(10), atol=1e-5)
    assert abs(float(ds.test.y.mean())) > 1e-4  # held-out statistics were not used
    assert data.load_friedman(1).train.index.tolist() != ds.train.index.tolist()
    assert ds.train.y.dtype == torch.float32 and data.load_friedman() is ds


def test_a_distribution_recipe_round_trips_through_its_toml(tmp_path):
    recipe = recipe_from_dict(tiny(**DISTRIBUTION))
    (tmp_path / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
    assert load_recipe(tmp_path / "recipe.toml").to_dict() == recipe.to_dict()
