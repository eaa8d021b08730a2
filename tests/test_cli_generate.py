import json

import numpy as np
import pytest
import torch

from oaml.cli.main import main
from oaml.outliers.bank import Bank, write_bank
from oaml.outliers.generators import FeatureDiffusionTrainConfig, train_feature_diffusion


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def banks(tmp_path):
    rng = np.random.default_rng(0)
    d = 6
    centers = rng.normal(size=(3, d))
    lab = rng.integers(0, 3, 300)
    idf = centers[lab] + 0.2 * rng.normal(size=(300, d))
    write_bank(tmp_path / "id", idf, lab, kind="id_features", meta={"teacher": "t", "dataset": "toy"})
    cood = centers[np.arange(30) % 3] + 0.8 * rng.normal(size=(30, d))
    write_bank(tmp_path / "cood", cood, np.arange(30) % 3, kind="cood", meta={"teacher": "t", "dataset": "toy"})
    return tmp_path


def test_generate_flags_then_analyze(banks, capsys):
    t = banks
    cfg = FeatureDiffusionTrainConfig(width=32, depth=1, train_steps=40, device="cpu")
    model = train_feature_diffusion(Bank.open(t / "id"), cfg, progress=False)
    model.save(t / "fd.safetensors")
    small = ["--steps", "8", "--batch-size", "8", "--no-progress", "--device", "cpu", "--model", str(t / "fd.safetensors")]
    rc = main(["generate", "--cood", str(t / "cood"), "--out", str(t / "dood"), "--id-bank", str(t / "id"), *small])
    assert rc == 0
    bank = Bank.open(t / "dood")
    assert bank.kind == "dood" and len(bank) == 30 and bank.dim == 6
    bank.require(teacher="t", dataset="toy")
    assert bank.meta["generator_settings"]["model"]["train_config"]["width"] == 32
    first = bank.to_numpy()[0]
    # rerun: already complete with the same settings -> same bank, the saved model is reused
    assert main(["generate", "--cood", str(t / "cood"), "--out", str(t / "dood"), *small]) == 0
    np.testing.assert_array_equal(Bank.open(t / "dood").to_numpy()[0], first)
    # other settings into the same folder are refused with a readable error
    assert main(["generate", "--cood", str(t / "cood"), "--out", str(t / "dood"), "--strength", "0.9", *small]) == 1
    assert "--overwrite" in capsys.readouterr().err

    rc = main(["analyze-outliers", "--id-bank", str(t / "id"), "--cood", str(t / "cood"), "--dood", str(t / "dood"),
               "--ood-features", f"copy={t / 'cood'}", "--out", str(t / "an"), "--k", "5"])
    assert rc == 0
    res = json.loads((t / "an" / "analysis.json").read_text())
    assert set(res["sets"]) == {"id_heldout", "cood", "dood", "copy"}
    assert res["sets"]["copy"]["rows_used"] == res["sets"]["cood"]["rows_used"] == 30
    assert (t / "an" / "pca.png").is_file()


def test_generate_from_yaml_and_errors(banks, tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(
        f"cood: {banks / 'cood'}\nout: {banks / 'dy'}\nid_bank: {banks / 'id'}\nbatch_size: 16\nnum_samples: 40\n"
        "train: {train_steps: 40, width: 32, depth: 1, device: cpu}\n"
        "feature_diffusion: {strength: 0.3, steps: 5, device: cpu}\n"
    )
    assert main(["generate", "--config", str(cfg), "--no-progress"]) == 0
    b = Bank.open(banks / "dy")
    assert len(b) == 40 and b.meta["num_samples"] == 40 and b.meta["generator_settings"]["config"]["strength"] == 0.3
    assert (banks / "dy.fdiff.safetensors").is_file()
    # the default model file next to --out is reused only with the same training settings
    assert main(["generate", "--config", str(cfg), "--train-steps", "41", "--no-progress"]) == 1
    assert "train_steps" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"cood: {banks / 'cood'}\nout: {banks / 'dz'}\nstrenght: 0.3\n")
    assert main(["generate", "--config", str(bad)]) == 1
    assert "strenght" in capsys.readouterr().err
    # feature diffusion without a model or an ID bank
    assert main(["generate", "--cood", str(banks / "cood"), "--out", str(banks / "dq"), "--no-progress"]) == 1
    assert "--id-bank" in capsys.readouterr().err
    # stable diffusion without weights: clear error, nothing downloaded
    assert main(["generate", "--cood", str(banks / "cood"), "--out", str(banks / "ds"), "--generator",
                 "stable_diffusion", "--sd-model", str(tmp_path / "none"), "--device", "cpu"]) == 1
    assert "local folder" in capsys.readouterr().err


def test_under_torchrun_rank_0_trains_the_model_and_the_others_wait_for_it(banks, monkeypatch):
    """Ranks other than 0 do not train (and race on) the feature diffusion model: they load rank 0's."""
    import threading

    from oaml.outliers.generators import run as run_mod

    monkeypatch.setattr(run_mod, "POLL_SECONDS", 0.01)
    cfg = run_mod.GenerateConfig.from_dict({
        "cood": str(banks / "cood"), "out": str(banks / "dp"), "id_bank": str(banks / "id"),
        "train": {"train_steps": 30, "width": 16, "depth": 1, "device": "cpu"},
    })
    trained = []
    real = run_mod.train_feature_diffusion
    monkeypatch.setattr(run_mod, "train_feature_diffusion", lambda *a, **k: trained.append(1) or real(*a, **k))
    cood = Bank.open(banks / "cood")
    got = {}
    waiter = threading.Thread(target=lambda: got.update(r1=run_mod._feature_diffusion_model(cfg, cood, False, 1, 2)))
    waiter.start()
    got["r0"] = run_mod._feature_diffusion_model(cfg, cood, False, 0, 2)
    waiter.join(timeout=60)
    assert trained == [1] and not waiter.is_alive()
    for k, v in got["r0"].state_dict().items():
        assert torch.equal(v, got["r1"].state_dict()[k])
    with pytest.raises(Exception, match="--overwrite under torchrun"):
        run_mod._feature_diffusion_model(cfg.model_copy(update={"overwrite": True}), cood, False, 0, 2)
