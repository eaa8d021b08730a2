"""Speed-only training options (TrainConfig.channels_last, TrainConfig.compile): the same losses
and weights as without them, to float tolerance, and checkpoints that load into a plain model."""

import pytest
import torch

from oaml.errors import ConfigError
from oaml.models.checkpoint import load_student
from oaml.outliers.images import ImageOutlierConfig, ImageOutlierSet, build_image_outliers
from oaml.training.config import TrainConfig, check_same_config
from oaml.training.methods import MethodConfig, resolve_terms
from oaml.training.trainer import Trainer

from helpers import FakeTeacher, TinyImages

pytestmark = pytest.mark.usefixtures("one_thread")


def _dynamo_ok() -> bool:
    try:
        return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
    except Exception:  # noqa: BLE001
        return False


needs_compile = pytest.mark.skipif(not _dynamo_ok(), reason=f"torch.compile is unavailable with torch {torch.__version__} here")


def _cfg(method="vanilla", **top):
    augment = {"flip": True, "crop_padding": 2} if method == "vanilla" else {"flip": False, "crop_padding": 0}
    return TrainConfig.from_dict({
        "data": {"batch_size": 16, "eval_batch_size": 32, "augment": augment},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1, "mean": [0.5], "std": [0.5]},
        # oaml: a lower lr, where 4 steps stay stable (at 0.05 its loss grows 10x and float noise is amplified 1e4x)
        "optim": {"lr": 0.05 if method == "vanilla" else 0.005, "epochs": 1},
        "method": {"name": method},
        "tensorboard": False,
        "progress": False,
        **top,
    })


def _trainer(tmp_path, cfg, name):
    data = TinyImages(64)
    if cfg.method.name == "vanilla":
        return Trainer(cfg, data, TinyImages(32, seed=1), tmp_path / name, num_classes=4, in_channels=1)
    img = tmp_path / "img"
    if not img.exists():  # outlier images that go through the student's one forward pass with the ID batch
        build_image_outliers(FakeTeacher(), data, None, img, ImageOutlierConfig(candidates=48, select=False), progress=False)
    return Trainer(cfg, data, TinyImages(32, seed=1), tmp_path / name, num_classes=4, in_channels=1,
                   teacher=FakeTeacher(), teacher_feature_dim=8, banks={"image_outliers": ImageOutlierSet(img)})


def _steps(tr, n=4):
    """``n`` training steps on fixed batches and one generator; the logs of each step."""
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(n):
        idx = list(range(16 * s, 16 * (s + 1)))
        raw, labels = tr.train.get(idx)
        out.append(tr._step(raw, labels, torch.as_tensor(idx), g))
    return out


def _assert_same(ref, other, logs_ref, logs_other, rtol, atol, before):
    assert logs_ref[0].keys() == logs_other[0].keys()
    for a, b in zip(logs_ref, logs_other):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rtol, abs=atol), (k, a[k], b[k])
    sa, sb = ref.model.state_dict(), other.model.state_dict()
    assert list(sa) == list(sb)  # same keys: no "_orig_mod." prefix
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
    # the steps moved the weights well beyond the tolerance (not two untouched models compared)
    assert (ref.model.conv1.weight.detach() - before).abs().max() > 20 * atol


def test_options_are_validated_and_default_off():
    cfg = _cfg()
    assert cfg.channels_last is False and cfg.compile is False
    assert _cfg(channels_last=True, compile=True).compile is True
    for bad in ({"channels_last": "fast"}, {"compile": 2}, {"compile_mode": "max"}):
        with pytest.raises(ConfigError):
            _cfg(**bad)


def test_a_resumed_run_may_change_the_speed_options(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(_cfg().to_yaml())
    check_same_config(out, _cfg(channels_last=True, compile=True))  # no error: speed only
    with pytest.raises(ConfigError, match="another config"):
        check_same_config(out, _cfg(seed=1))


@pytest.mark.parametrize("method", ["vanilla", "oaml"])
def test_channels_last_gives_the_same_losses_and_weights(tmp_path, method):
    ref, cl = _trainer(tmp_path, _cfg(method), "ref"), _trainer(tmp_path, _cfg(method, channels_last=True), "cl")
    seen = {}

    def spy(module, inputs, out):  # returns None: the output is left alone
        seen.setdefault("layout", out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
        seen.setdefault("batch", out.shape[0])

    cl.model.layer1.register_forward_hook(spy)
    before = ref.model.conv1.weight.detach().clone()
    logs_ref, logs_cl = _steps(ref), _steps(cl)
    assert seen["layout"] is True  # the option took effect: NHWC activations inside the student
    outliers = round(resolve_terms(MethodConfig(name="oaml"))["image_outliers"]["ratio"] * 16)  # oaml's default ratio
    assert seen["batch"] == (16 if method == "vanilla" else 16 + outliers)  # ID batch + image outliers in one pass
    assert cl.model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same(ref, cl, logs_ref, logs_cl, rtol=1e-4, atol=1e-4, before=before)
    # evaluation and extraction (NHWC inputs) agree on the same weights (copied in: the layout stays NHWC)
    cl.model.load_state_dict(ref.model.state_dict())
    assert cl.model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.evaluate() == ref.evaluate()
    torch.testing.assert_close(cl.extract("train")[1], ref.extract("train")[1], rtol=1e-5, atol=1e-5)


def _counting_backend(calls):
    """dynamo's "aot_eager" backend (graph capture + AOT autograd, eager kernels), counting graphs."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend


@needs_compile
def test_compile_wiring_with_a_tracing_backend(tmp_path, monkeypatch):
    """The trainer's compiled step (dynamo capture + AOT autograd, python kernels instead of
    inductor's, for speed): (logits, features) out, ID + outlier images in one graph, same losses
    and weights, plain state dicts; a resumed plain run loads its checkpoint."""
    torch._dynamo.reset()
    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend=_counting_backend(calls), **kw))
    ref, cc = _trainer(tmp_path, _cfg("oaml"), "ref"), _trainer(tmp_path, _cfg("oaml", compile=True), "cc")
    assert type(cc.step_net).__name__ == "OptimizedModule" and ref.step_net is ref.net
    before = ref.model.conv1.weight.detach().clone()
    logs_ref, logs_cc = _steps(ref), _steps(cc)
    assert len(calls) == 1  # one graph for the whole forward (no graph breaks), no recompiles over steps
    _assert_same(ref, cc, logs_ref, logs_cc, rtol=1e-4, atol=1e-4, before=before)
    cc.save()
    blob = torch.load(tmp_path / "cc" / "last.pt", map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in blob["model"])
    plain = _trainer(tmp_path, _cfg("oaml"), "cc")
    assert plain.try_resume() and plain.global_step == 0  # _steps() does not count global steps; the weights load
    for k, v in cc.model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[k], v), k
    torch._dynamo.reset()


@needs_compile
def test_compile_is_refused_without_a_cxx_compiler_on_cpu(tmp_path, monkeypatch):
    import oaml.training.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        _trainer(tmp_path, _cfg(compile=True), "x")


@pytest.mark.slow
@needs_compile
def test_inductor_compiled_training_matches_and_checkpoints_load_into_a_plain_model(tmp_path):
    """The real thing (inductor; about a minute of compiling on a loaded 2-core CPU): the OAML
    step with image outliers in the one forward pass, channels_last on too, through fit()."""
    torch._dynamo.reset()
    ref = _trainer(tmp_path, _cfg("oaml"), "ref")
    cc = _trainer(tmp_path, _cfg("oaml", compile=True, channels_last=True), "cc")
    before = ref.model.conv1.weight.detach().clone()
    logs_ref, logs_cc = _steps(ref), _steps(cc)
    # inductor fuses and reorders float ops: a looser tolerance than eager
    _assert_same(ref, cc, logs_ref, logs_cc, rtol=2e-3, atol=2e-4, before=before)
    summary = cc.fit()  # 4 more steps, evaluation and checkpoints on the plain module
    assert summary["epochs"] == 1
    model, _, meta = load_student(tmp_path / "cc" / "best.pt")  # a plain model, no "_orig_mod." keys
    for k, v in cc.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    torch._dynamo.reset()


def test_pipeline_passes_the_speed_options_to_every_student_run():
    from oaml.pipeline import PipelineConfig, _train_config

    cfg = PipelineConfig.from_dict({"channels_last": True, "compile": True, "amp": True})
    tc = _train_config(cfg, cfg.vanilla, None, None, {}, 0)
    assert tc.channels_last is True and tc.compile is True and tc.amp is True
    plain = _train_config(PipelineConfig(), PipelineConfig().vanilla, None, None, {}, 0)
    assert plain.channels_last is False and plain.compile is False and plain.amp == "auto"


# -- mixed precision on the CPU (TrainConfig.amp = true: bfloat16 autocast where the CPU has it) ---------------

def test_amp_on_cpu_is_opt_in_and_refused_without_native_bfloat16(monkeypatch):
    import oaml.utils.device as dev

    cpu = torch.device("cpu")
    assert dev.amp_enabled(cpu, "auto") is False  # the default leaves CPU runs in float32
    assert dev.amp_enabled(cpu, False) is False
    assert dev.amp_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_bf16_supported", lambda: True)
    assert dev.amp_enabled(cpu, True) is True
    monkeypatch.setattr(dev, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="without native bfloat16.*amp: false"):
        dev.amp_enabled(cpu, True)
    assert _cfg(amp=True).amp is True
    with pytest.raises(ConfigError):
        _cfg(amp="bf16")


def test_amp_changes_what_a_run_computes_so_a_resume_must_keep_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(_cfg().to_yaml())
    with pytest.raises(ConfigError, match="another config"):
        check_same_config(out, _cfg(amp=True))


@pytest.mark.parametrize("method", ["vanilla", "oaml"])
def test_amp_runs_the_student_in_bfloat16_on_cpu_and_keeps_float32_weights(tmp_path, method, monkeypatch):
    import oaml.utils.device as dev

    monkeypatch.setattr(dev, "cpu_bf16_supported", lambda: True)  # emulated where the CPU lacks it: slow, same numbers
    ref, amp = _trainer(tmp_path, _cfg(method), "ref"), _trainer(tmp_path, _cfg(method, amp=True), "amp")
    assert amp.use_amp and amp.amp_dtype is torch.bfloat16 and not amp.scaler.is_enabled()
    seen = {}

    def spy(module, inputs, out):  # returns None: the output is left alone
        seen.setdefault("dtype", out.dtype)

    amp.model.layer1.register_forward_hook(spy)
    start = torch.cat([p.detach().flatten() for p in ref.model.parameters()]).clone()
    logs_ref, logs_amp = _steps(ref), _steps(amp)
    assert seen["dtype"] is torch.bfloat16  # the option took effect inside the student
    assert all(p.dtype is torch.float32 for p in amp.model.parameters())  # master weights stay float32
    # bfloat16 keeps 8 bits of mantissa: close, not equal. The first step runs the same weights (only the
    # forward's rounding differs: within 1%); the toy net's later steps amplify that rounding (oaml at ratio
    # 0.25: 13% apart in CE by the third step, 3% at 0.5), so they are only checked to stay in range.
    for s, (a, b) in enumerate(zip(logs_ref, logs_amp)):
        for k in (k for k in a if k != "train_acc"):  # the losses (accuracy of 16 images moves in steps of 1/16)
            assert b[k] == pytest.approx(a[k], rel=0.01 if s == 0 else 0.25, abs=0.02), (s, k, a[k], b[k])
    flat = lambda tr: torch.cat([p.detach().flatten() for p in tr.model.parameters()])  # noqa: E731
    upd_ref, upd_amp = flat(ref) - start, flat(amp) - start
    # the same optimisation up to bfloat16 rounding: 4 steps of a 4-class toy net are noisy (cosine 0.74
    # for vanilla, 0.96 for oaml here); what bfloat16 does to a trained model is benchmarks/amp_quality.py's
    assert torch.nn.functional.cosine_similarity(upd_ref, upd_amp, dim=0) > 0.6
    assert 0.0 <= amp.evaluate() <= 1.0
