"""The integration examples in examples/ run for a few steps on CPU with tiny, randomly
initialized models (nothing is downloaded): Hugging Face ``transformers.Trainer`` including a
checkpoint save and resume, PyTorch Lightning, and a plain loop with ``torch.amp`` autocast,
``GradScaler`` and gradient accumulation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import flatl2o

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ------------------------------------------------------------------ Hugging Face Trainer
def test_hf_trainer_trains_saves_and_resumes_exactly(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = load_example("hf_trainer")
    steps, save = 6, 3

    full = hf.make_trainer(str(tmp_path / "full"), steps, save_steps=save, batch_size=8)
    full.train()
    losses = [r["loss"] for r in full.state.log_history if "loss" in r]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    trained = params_of(full.model)
    embedding = "transformer.wte.weight"
    assert not torch.equal(trained[embedding], params_of(hf.make_model())[embedding])

    # Trainer's own checkpoint file loads with weights_only=True and holds the L2O state
    saved = torch.load(tmp_path / "full" / f"checkpoint-{save}" / "optimizer.pt", weights_only=True)
    l2o = getattr(full.optimizer, "optimizer", full.optimizer)  # under accelerate's wrapper
    assert isinstance(l2o, flatl2o.L2O)
    assert saved["rule"]["fingerprint"] == l2o.rule.fingerprint()
    assert all(float(s["step"]) == save for s in saved["state"].values())

    # a fresh Trainer resumed from checkpoint-3 ends where the uninterrupted run ended
    resumed = hf.make_trainer(str(tmp_path / "resumed"), steps, save_steps=save, batch_size=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{save}"))
    for name, value in params_of(resumed.model).items():
        assert torch.equal(value, trained[name]), name


# ------------------------------------------------------------------------- Lightning
def test_lightning_configure_optimizers_trains_and_resumes_exactly(tmp_path):
    pytest.importorskip("lightning")
    lt = load_example("lightning_module")

    def fit(out, epochs, ckpt_path=None):
        lt.L.seed_everything(0, verbose=False)
        model = lt.Regressor()
        lt.make_trainer(str(out), epochs).fit(model, lt.loader(), ckpt_path=ckpt_path)
        return model

    x, y = lt.make_data().tensors

    def loss(model):
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x), y))

    start = loss(lt.Regressor())
    full = fit(tmp_path / "full", 2)
    assert isinstance(full.trainer.optimizers[0], flatl2o.L2O)
    assert loss(full) < start
    ckpt = tmp_path / "full" / "epoch=0-step=8.ckpt"
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]
    assert all(float(s["step"]) == 8 for s in saved["state"].values()) and "rule" in saved
    resumed = fit(tmp_path / "resumed", 2, ckpt_path=str(ckpt))
    for name, value in params_of(resumed).items():
        assert torch.equal(value, params_of(full)[name]), name


# ---------------------------------------------------------- torch.amp + accumulation
def test_gradient_accumulation_equals_one_large_batch():
    amp = load_example("amp_accumulation")
    results = []
    for accum, micro in ((4, 8), (1, 32)):
        model = amp.make_model()
        opt = flatl2o.L2O(model.parameters())
        amp.train(model, opt, amp.batches(micro), steps=3, accum=accum, amp_dtype=None)
        results.append(params_of(model))
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_scaler_hands_l2o_unscaled_gradients_and_skips_overflow():
    amp = load_example("amp_accumulation")

    def run(scaler, data=None):
        model = amp.make_model()
        opt = flatl2o.L2O(model.parameters())
        data = data or amp.batches(16)
        amp.train(model, opt, data, steps=3, accum=2, amp_dtype=None, scaler=scaler)
        return model, opt

    plain, _ = run(None)
    # a power-of-two loss scale is undone exactly before L2O sees the gradients
    scaled, _ = run(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    for name, value in params_of(scaled).items():
        assert torch.equal(value, params_of(plain)[name]), name
    # inf/NaN gradients (an inf in every batch): the scaler skips every step, so L2O never
    # steps and its recurrent state never starts
    poisoned = ((x.index_fill(1, torch.tensor([0]), float("inf")), y) for x, y in amp.batches(16))
    overflow, opt = run(torch.amp.GradScaler("cpu"), poisoned)
    assert not opt.state
    for name, value in params_of(overflow).items():
        assert torch.equal(value, params_of(amp.make_model())[name]), name


def test_bf16_autocast_training_keeps_fp32_state_and_learns():
    amp = load_example("amp_accumulation")
    model = amp.make_model()
    opt = flatl2o.L2O(model.parameters())
    losses = amp.train(model, opt, amp.batches(16), steps=40, accum=2, amp_dtype=torch.bfloat16)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    for p in model.parameters():
        assert p.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())
