"""The scripts in examples/ run as written, at a tiny size (each is a recipe of the README)."""
import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.exists(), reason="examples/ not beside tests/")


def load(name, source=None):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source or path.read_text(), str(path), "exec"), module.__dict__)
    return module


def test_opacus_script_runs_with_the_import_swapped(capsys):
    out = load("opacus_mnist").main(["--epochs", "4", "--sigma", "0.7"])
    assert 0 < out["epsilon"] < 30 and out["accuracy"] > 0.3   # chance is 0.1
    assert "epsilon =" in capsys.readouterr().out


def test_the_same_script_is_opacus_code(capsys):
    """Only the two imports differ from an Opacus script: swapped back, it runs under Opacus itself."""
    pytest.importorskip("opacus")
    text = (EXAMPLES / "opacus_mnist.py").read_text()
    text, n = re.subn(r"^from dpfast import PrivacyEngine.*$", "from opacus import PrivacyEngine", text, flags=re.M)
    text, m = re.subn(r"^from dpfast\.utils\.batch_memory_manager import BatchMemoryManager.*$",
                      "from opacus.utils.batch_memory_manager import BatchMemoryManager", text, flags=re.M)
    assert n == m == 1 and "dpfast" not in text.split('"""', 2)[2]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = load("opacus_mnist_original", text).main(["--epochs", "1"])
    assert out["epsilon"] > 0


@pytest.mark.parametrize("K", [1, 4])
def test_diffusers_accelerate_loop_resumes_as_if_never_stopped(tmp_path, K):
    """The diffusers + accelerate recipe, with noise multiplicity K: a run stopped at step 3 and resumed
    from accelerate's checkpoint (and the engine's, loaded before make_private) ends with the weights
    and epsilon of the uninterrupted run, and its saved UNet loads with diffusers."""
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    import torch
    from diffusers import UNet2DModel

    ex = load("diffusers_accelerate")
    common = ["--max-train-steps", "6", "--checkpointing-steps", "3", "--multiplicity", str(K),
              "--train-batch-size", "48", "--max-physical-batch-size", "16", "--noise-seed", "7"]
    a = ex.main(["--out", str(tmp_path / "a"), *common])
    ex.main(["--out", str(tmp_path / "b"), *common, "--stop-at-step", "3"])
    b = ex.main(["--out", str(tmp_path / "b"), *common, "--resume", "latest", "--deterministic-resume"])
    assert a["global_step"] == b["global_step"] == 6 and a["steps_released"] == b["steps_released"] == 6
    assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-12)
    ua = UNet2DModel.from_pretrained(str(tmp_path / "a" / "unet"))
    ub = UNet2DModel.from_pretrained(str(tmp_path / "b" / "unet"))
    for (n, x), (_, y) in zip(ua.state_dict().items(), ub.state_dict().items()):
        assert torch.equal(x, y), n
    import os
    import stat

    assert stat.S_IMODE(os.stat(tmp_path / "b" / "checkpoint-3" / "privacy_engine.pt").st_mode) == 0o600


def test_lightning_automatic_optimisation_takes_one_dp_step_per_lightning_step():
    """Lightning's closure calls zero_grad between forward and backward (it used to fail with a tape
    error); each of its steps is now one DP-SGD release, accounted."""
    pytest.importorskip("lightning")
    from dpfast.accounting import compute_epsilon

    out = load("lightning_dp").main(["--max-steps", "6", "--noise-seed", "3"])
    assert out["steps"] == out["global_step"] == 6
    # PRV is numerical: the engine reuses its discretisation as the history grows (within 1e-3)
    assert out["epsilon"] == pytest.approx(compute_epsilon(1.0, 128 / 1797, 6, 1e-5, "prv"), rel=1e-3)


def test_lightning_gradient_accumulation_is_refused():
    """accumulate_grad_batches=2 used to drop half the batches silently: the second backward before a
    step is refused, with the dpfast way in the message."""
    pytest.importorskip("lightning")
    import lightning as L

    from dpfast.errors import DPError

    ex = load("lightning_dp")
    args = ex.argparse.Namespace(lr=0.5, sigma=1.0, delta=1e-5, noise_seed=3, batch_size=128)
    model = ex.build(args)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        accumulate_grad_batches=2)
    with pytest.raises(DPError, match="max_physical_batch_size"):
        trainer.fit(model)
    assert model.engine.steps == 0
