"""The training networks and deep supervision (training/networks.py), warm start into a
deep-supervised network, and its export to the ONNX model the app runs.

These need torch, which the app's venv does not have: they run in the training venv
(``make test-train``) and are skipped in ``make test``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is in the training venv only: run `make test-train`")

from training.networks import (  # noqa: E402
    DEEP_SUPERVISION_HEADS, HEADS_PREFIX, build_network, deep_supervision_loss, deployable,
)
from training.tasks import TASKS  # noqa: E402
from training.train import checkpoint_network, init_from_torchscript, softmax_marginal_loss  # noqa: E402

PATCH = (16, 32, 32)  # small, divisible by 2^4
WIDTHS = (8, 16, 32, 64, 128)


def test_deep_supervised_unet_returns_heads_in_training_and_the_plain_unet_in_eval():
    torch.manual_seed(0)
    net = build_network("unet-ds", 1, 8, WIDTHS)
    x = torch.rand(2, 1, *PATCH)
    out = net.train()(x)
    assert out.shape == (2, 1 + DEEP_SUPERVISION_HEADS, 8, *PATCH)
    assert not torch.equal(out[:, 1], out[:, 0]) and not torch.equal(out[:, 2], out[:, 1])
    out[:, 1:].sum().backward()  # the heads' losses reach the decoder
    assert net.model[1].submodule[2][0].conv.weight.grad.abs().sum() > 0
    net.eval()
    plain = deployable(net).eval()
    assert type(plain).__name__ == "UNet" and not any(k.startswith(HEADS_PREFIX) for k in plain.state_dict())
    with torch.inference_mode():
        assert torch.equal(net(x), plain(x))  # eval: the plain UNet's logits, nothing else
    with pytest.raises(ValueError, match="unknown network 'vnet'"):
        build_network("vnet", 1, 8, WIDTHS)


def test_deep_supervision_loss_weights_the_heads_by_halves():
    torch.manual_seed(0)
    labels = torch.randint(0, 8, (2, *PATCH))
    known = torch.ones(2, 7, PATCH[0], dtype=torch.bool)
    heads = torch.randn(2, 3, 8, *PATCH)
    each = [float(softmax_marginal_loss(heads[:, i], labels, known)) for i in range(3)]
    got = float(deep_supervision_loss(softmax_marginal_loss, heads, labels, known))
    assert got == pytest.approx((4 * each[0] + 2 * each[1] + each[2]) / 7, rel=1e-5)
    # an ordinary output: the loss itself
    assert float(deep_supervision_loss(softmax_marginal_loss, heads[:, 0], labels, known)) == pytest.approx(each[0])


def test_a_released_unet_warm_starts_the_deep_supervised_one(tmp_path):
    torch.manual_seed(1)
    released = build_network("unet", 1, 8, WIDTHS).eval()
    x = torch.rand(1, 1, *PATCH)
    torch.jit.trace(released, x).save(str(tmp_path / "model.ts"))
    net = build_network("unet-ds", 1, 8, WIDTHS)
    init_from_torchscript(net, tmp_path / "model.ts")
    with torch.inference_mode():
        assert torch.allclose(net.eval()(x), released(x), atol=1e-6)  # starts as the released model
    other = build_network("unet", 1, 8, (8, 16, 32))  # a different network is refused, not half-loaded
    torch.jit.trace(other.eval(), x).save(str(tmp_path / "other.ts"))
    with pytest.raises(ValueError, match="not the same network"):
        init_from_torchscript(build_network("unet-ds", 1, 8, WIDTHS), tmp_path / "other.ts")


def test_a_deep_supervised_checkpoint_exports_the_plain_unet(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import yaml

    from training.export import export

    task = TASKS["hn_target"]
    net = build_network("unet-ds", task.in_channels, task.out_channels, task.channels)
    ck = {"model": {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()},
          "iteration": 7, "holdout_mean": 0.5, "stage": {"network": "unet-ds"}}
    torch.save(ck, tmp_path / "best.pt")
    assert checkpoint_network(ck) == "unet-ds" and checkpoint_network({"stage": {"lr": 1e-3}}) == "unet"
    out = export(task, tmp_path / "best.pt", tmp_path / "model", "0.0.1", mirror=False)  # checks ONNX == torch
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert "deep supervision" in meta["network"]["architecture"]
    assert meta["training"]["stage"]["network"] == "unet-ds"
    plain = build_network("unet", task.in_channels, task.out_channels, task.channels)
    assert meta["network"]["parameters"] == sum(p.numel() for p in plain.parameters())
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not any("deep_supervision" in i.name for i in graph.initializer)
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim[1:]] == [task.out_channels, *task.patch_zyx]


def test_a_soup_is_the_weighted_mean_of_its_ingredients_without_the_heads(tmp_path):
    from training.soup import soup

    task = TASKS["hn_target"]
    torch.manual_seed(2)
    a = build_network("unet", task.in_channels, task.out_channels, task.channels).eval()
    torch.jit.trace(a, torch.rand(1, task.in_channels, *PATCH)).save(str(tmp_path / "model.ts"))
    b = build_network("unet-ds", task.in_channels, task.out_channels, task.channels)
    torch.save({"model": b.state_dict(), "iteration": 3, "stage": {"network": "unet-ds"}}, tmp_path / "best.pt")
    mixed = soup(task, [tmp_path / "model.ts", tmp_path / "best.pt"], [1.0, 3.0])
    assert not any(k.startswith(HEADS_PREFIX) for k in mixed)
    assert set(mixed) == set(a.state_dict())
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(mixed[k], 0.25 * v + 0.75 * b.state_dict()[k], atol=1e-6), k
    w = "model.0.conv.unit0.conv.weight"
    assert not torch.allclose(mixed[w], a.state_dict()[w])  # the ingredients differ: the mean is neither
    with pytest.raises(ValueError, match="at least two"):
        soup(task, [tmp_path / "model.ts"])
    with pytest.raises(ValueError, match="one non-negative weight per checkpoint"):
        soup(task, [tmp_path / "model.ts", tmp_path / "best.pt"], [1.0])
    other = build_network("unet", task.in_channels, task.out_channels, (8, 16, 32)).eval()
    torch.jit.trace(other, torch.rand(1, task.in_channels, *PATCH)).save(str(tmp_path / "other.ts"))
    with pytest.raises(ValueError, match="not the same network"):
        soup(task, [tmp_path / "model.ts", tmp_path / "other.ts"])


def test_the_int8_speed_candidate_is_a_quantised_graph_of_the_same_network(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from training.network_speed import int8

    net = build_network("unet", 1, 8, WIDTHS).eval()
    path = str(tmp_path / "net.onnx")
    torch.onnx.export(net, torch.zeros(1, 1, *PATCH), path, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    quantised = int8(path, PATCH)
    ops = {n.op_type for n in onnx.load(quantised).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = np.random.default_rng(0).random((2, 1, *PATCH), dtype=np.float32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = ort.InferenceSession(quantised, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert got.shape == ref.shape == (2, 8, *PATCH)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # the same network, at int8 precision


def _cases(*names):
    from training.data import Case

    return [Case(n, np.zeros((1, 1, 1), np.int16), np.zeros((10, 1, 1, 1), bool), np.ones(10, bool), (3.0, 4.0, 4.0))
            for n in names]


def test_extra_data_is_trained_on_and_the_held_out_patients_stay_the_main_folders():
    from training.train import split_cases

    train, held = split_cases(_cases("pt_1", "pt_2", "pt_3"), 1, {"validation": _cases("pt_201", "pt_202")})
    assert [c.name for c in held] == ["pt_3"]
    assert [c.name for c in train] == ["pt_1", "pt_2", "pt_201", "pt_202"]
    assert [c.name for c in split_cases(_cases("pt_1", "pt_2"), 1)[0]] == ["pt_1"]


def test_extra_data_that_repeats_a_patient_is_refused():
    from training.train import split_cases

    with pytest.raises(SystemExit, match="pt_3"):
        split_cases(_cases("pt_1", "pt_2", "pt_3"), 1, {"train-again": _cases("pt_3")})


def test_the_model_yaml_says_when_the_weights_were_also_trained_on_validation():
    from training.export import data_description

    assert data_description({}).endswith("OpenKBP validation never used in training")
    text = data_description({"extra_data": ["../shared/data/openkbp/validation"]})
    assert "also trained on every patient of ../shared/data/openkbp/validation" in text
    assert "never used in training" not in text


LEVEL2 = "model.1.submodule.1.submodule.0.conv.unit0.conv.weight"  # the convolution producing level 2's features


def _copied_from(w, n_old: int) -> dict[int, list[int]]:
    """For each new output channel of ``w``, the old channels whose incoming weights it equals."""
    return {j: [k for k in range(n_old) if torch.equal(w[j], w[k])] for j in range(n_old, w.shape[0])}


def test_a_widened_unet_starts_as_the_narrow_one_and_its_copies_then_learn_apart():
    from training.networks import unet_channels, widen

    torch.manual_seed(2)
    narrow = build_network("unet", 1, 8, WIDTHS).eval()
    for m in narrow.modules():  # slopes away from MONAI's default, so the test sees them copied
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
    wide_widths = (12, 16, 48, 96, 192)  # wider at the top and at the bottom, one level as it was
    wide = build_network("unet", 1, 8, wide_widths)
    wide.load_state_dict(widen(narrow.state_dict(), wide, torch.Generator().manual_seed(3)))
    assert unet_channels(wide.state_dict()) == wide_widths and unet_channels(narrow.state_dict()) == WIDTHS
    x = torch.rand(2, 1, *PATCH)
    with torch.no_grad():
        before = narrow(x)
        assert before.abs().max() > 0.1
        assert torch.allclose(wide.eval()(x), before, atol=1e-5)  # the same function

    # the copies of one old channel do not stay copies: their gradients differ
    wide.train()
    wide(x).square().mean().backward()
    grad = dict(wide.named_parameters())[LEVEL2].grad
    copied = _copied_from(wide.state_dict()[LEVEL2], 32)  # level 2: 32 -> 48
    assert all(len(k) == 1 for k in copied.values())  # each new channel copies one old channel
    j, src = 32, copied[32][0]
    assert not torch.allclose(grad[j], grad[src])


def test_widening_refuses_a_narrower_network_and_a_different_depth(tmp_path):
    from training.networks import widen

    narrow = build_network("unet", 1, 8, WIDTHS)
    with pytest.raises(ValueError, match="narrower"):
        widen(narrow.state_dict(), build_network("unet", 1, 8, (8, 16, 16, 64, 128)), torch.Generator())
    with pytest.raises(ValueError, match="levels"):
        widen(narrow.state_dict(), build_network("unet", 1, 8, (8, 16, 32, 64)), torch.Generator())


def test_a_widened_stage_warm_starts_from_the_released_model_and_exports_its_widths(tmp_path):
    pytest.importorskip("onnxruntime")
    import yaml

    from training.export import export
    from training.train import build_network as task_network
    from training.train import checkpoint_channels

    task = TASKS["hn_target"]
    torch.manual_seed(4)
    released = task_network(task).eval()
    x = torch.rand(1, task.in_channels, *task.patch_zyx)
    torch.jit.trace(released, x).save(str(tmp_path / "model.ts"))
    widths = (*task.channels[:2], *(c * 3 // 2 for c in task.channels[2:]))
    net = task_network(task, "unet", widths)
    init_from_torchscript(net, tmp_path / "model.ts", seed=5)
    with torch.inference_mode():
        assert torch.allclose(net.eval()(x), released(x), atol=1e-4)
    ck = {"model": {k: v.half() for k, v in net.state_dict().items()}, "iteration": 3, "holdout_mean": 0.5,
          "stage": {"network": "unet", "channels": list(widths)}}
    torch.save(ck, tmp_path / "best.pt")
    assert checkpoint_channels(ck, task) == widths and checkpoint_channels({"stage": {}}, task) == task.channels
    out = export(task, tmp_path / "best.pt", tmp_path / "model", "0.0.1", mirror=False)  # checks ONNX == torch
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert meta["network"]["channels"] == list(widths)
    assert meta["network"]["parameters"] == sum(p.numel() for p in net.parameters())


def test_widening_noise_perturbs_only_the_new_channels():
    from training.networks import widen

    torch.manual_seed(6)
    narrow = build_network("unet", 1, 8, WIDTHS).eval()
    wide_widths = (8, 16, 48, 96, 192)
    exact = widen(narrow.state_dict(), build_network("unet", 1, 8, wide_widths), torch.Generator().manual_seed(7))
    noisy = widen(narrow.state_dict(), build_network("unet", 1, 8, wide_widths), torch.Generator().manual_seed(7),
                  noise=0.3)
    assert all(len(k) == 1 for k in _copied_from(exact[LEVEL2], 32).values())  # level 2: 32 -> 48
    assert not any(_copied_from(noisy[LEVEL2], 32).values())  # no new channel is an exact copy any more
    net = build_network("unet", 1, 8, wide_widths).eval()
    net.load_state_dict(noisy)
    x = torch.rand(1, 1, *PATCH)
    with torch.no_grad():
        diff = (net(x) - narrow(x)).abs().max()
    assert 0 < diff < narrow(x).abs().max()  # close to the old function, no longer equal


def _synthetic_case(name: str, seed: int):
    """A small patient at the model grid: soft tissue with a brainstem-like and a cord-like block."""
    from training.data import OPENKBP_ROIS, Case

    rng = np.random.default_rng(seed)
    shape = (48, 64, 64)
    ct = (40 + 20 * rng.standard_normal(shape)).astype(np.int16)
    masks = np.zeros((len(OPENKBP_ROIS), *shape), bool)
    masks[OPENKBP_ROIS.index("Brainstem"), 30:40, 28:36, 28:36] = True
    masks[OPENKBP_ROIS.index("SpinalCord"), 5:30, 36:40, 30:34] = True
    ct[masks[OPENKBP_ROIS.index("Brainstem")]] += 60
    present = np.array([n in ("Brainstem", "SpinalCord") for n in OPENKBP_ROIS])
    return Case(name, ct, masks, present, (3.0, 4.0, 4.0))


def test_a_stage_resumes_from_its_committed_state_without_the_optimizer_moments(tmp_path, monkeypatch):
    """``state.pt`` holds the weights, iteration, stage and curve, not AdamW's moments (two thirds
    of its size); running the command again continues the stage from there."""
    from training import train

    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))
    common = ["train", "--task", "hn_oar", "--data", str(tmp_path), "--checkpoints", str(tmp_path / "ck"),
              "--holdout", "1", "--ckpt-every", "1"]
    monkeypatch.setattr("sys.argv", common + ["--iterations", "3", "--stop-at", "2", "--warmup", "1", "--lr", "1e-4"])
    train.main()
    state_path = tmp_path / "ck/hn_oar/state.pt"
    first = torch.load(state_path, weights_only=False)
    assert first["iteration"] == 2 and "opt" not in first
    assert set(first) == {"model", "iteration", "best", "history", "stage"}
    monkeypatch.setattr("sys.argv", common)  # the stage's own settings, whatever is given
    train.main()
    resumed = torch.load(state_path, weights_only=False)
    assert resumed["iteration"] == 3 and [h["iteration"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["stage"] == first["stage"]
    moved = [not torch.equal(first["model"][k], resumed["model"][k]) for k in first["model"]]
    assert any(moved)  # the resumed iteration trained the weights it started from


def test_the_forward_pass_precision_follows_the_machine(tmp_path, monkeypatch):
    from training import train

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\nprocessor\t: 1\n")
    assert not train.cpu_has_native_bf16(flags)  # AVX2 / AVX-512 without BF16: emulated, slower
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert train.cpu_has_native_bf16(flags)
    assert not train.cpu_has_native_bf16(tmp_path / "missing")  # unreadable: the safe fp32

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert train.training_precision(cuda) == "bf16"  # A100 / H100 / H200: bfloat16 in hardware
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert train.training_precision(cuda) == "fp16"  # older GPUs: float16, with the gradients scaled
    assert train.training_precision(cpu, "fp32") == "fp32" and train.training_precision(cuda, "bf16") == "bf16"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.training_precision(cpu) == "bf16"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.training_precision(cpu) == "fp32"


def test_a_new_stage_from_a_widened_release_keeps_its_widths_without_channels(tmp_path, monkeypatch):
    """``--new-stage --init`` of a widened model (hn_oar 1.4.0) needs no ``--channels``: the stage
    takes the source's widths, and starts as exactly its function."""
    from training import train

    task = TASKS["hn_oar"]
    widths = (16, 32, 96, 192, 384)
    torch.manual_seed(7)
    wide = train.build_network(task, "unet", widths)
    torch.save({"model": {k: v.half() for k, v in wide.state_dict().items()}, "stage": {"channels": list(widths)}},
               tmp_path / "best.pt")
    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_oar", "--data", str(tmp_path), "--new-stage",
                                     "--init", str(tmp_path / "best.pt"), "--checkpoints", str(tmp_path / "ck"),
                                     "--holdout", "1", "--iterations", "1", "--lr", "0"])
    train.main()
    state = torch.load(tmp_path / "ck/hn_oar/state.pt", weights_only=False)
    assert state["stage"]["channels"] == list(widths)
    assert train.checkpoint_channels(state, task) == widths
    for k, v in wide.state_dict().items():  # lr 0: the source's weights, unchanged
        if v.is_floating_point():
            assert torch.equal(state["model"][k], v.half()), k


def test_the_whole_crop_experiment_runs_the_released_weights_on_one_window_of_any_multiple_of_16(tmp_path):
    """training.whole_crop (docs/benchmark.md: tried, not kept): its ONNX takes the whole crop, and
    each window equals the network on that window (the experiment's only change is the window)."""
    import onnxruntime as ort

    from training.train import ROOT
    from training.whole_crop import CROP, export_dynamic, multiple_of

    patch = TASKS["hn_oar"].patch_zyx
    assert multiple_of(CROP, patch, 16) == (144, 80, 144)
    assert multiple_of((40, 70, 81), patch, 16) == tuple(patch[:2]) + (96,)  # never below the training patch
    onnx = tmp_path / "dyn.onnx"
    assert export_dynamic("hn_oar", onnx) == 16  # five levels: four halvings
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 1, 80, 80, 96), np.float32)
    released = ort.InferenceSession(str(ROOT / "models/hn_oar/model.onnx"), providers=["CPUExecutionProvider"])
    channels = released.get_outputs()[0].shape[1]
    assert session.run(None, {"image": x})[0].shape == (1, channels, 80, 80, 96)
    window = x[:, :, : patch[0], : patch[1], : patch[2]]
    np.testing.assert_allclose(session.run(None, {"image": window})[0], released.run(None, {"image": window})[0],
                               atol=1e-3)


def test_a_stage_trains_on_its_own_patch_and_exports_it_as_the_apps_window(tmp_path, monkeypatch):
    """``--patch`` is part of the stage: the sampler cuts patches of that size, a resumed run keeps
    it, and the export writes it into model.yaml (the app's sliding window) and the ONNX input."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    import yaml

    from training import train
    from training.export import export

    task = TASKS["hn_oar"]
    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))
    cut = []
    real_cut = train.cut_patch
    monkeypatch.setattr(train, "cut_patch", lambda *a, **k: cut.append(a[4]) or real_cut(*a, **k))
    common = ["train", "--task", "hn_oar", "--data", str(tmp_path), "--checkpoints", str(tmp_path / "ck"),
              "--holdout", "1", "--ckpt-every", "1", "--batch", "1", "--channels", *map(str, WIDTHS)]
    monkeypatch.setattr("sys.argv", common + ["--new-stage", "--patch", "32", "48", "80", "--iterations", "2",
                                              "--stop-at", "1", "--warmup", "1", "--lr", "1e-4"])
    train.main()
    monkeypatch.setattr("sys.argv", common)  # resumed: the stage's patch, not the task's default
    train.main()
    assert cut == [(32, 48, 80), (32, 48, 80)]
    state = torch.load(tmp_path / "ck/hn_oar/state.pt", weights_only=False)
    assert state["iteration"] == 2 and state["stage"]["patch"] == [32, 48, 80]
    assert train.checkpoint_task(state, task).patch_zyx == (32, 48, 80)
    assert train.checkpoint_task({"stage": {"patch": None}}, task) is task  # stages before --patch

    out = export(task, tmp_path / "ck/hn_oar/state.pt", tmp_path / "model", "0.0.1", mirror=False)
    meta = yaml.safe_load((out / "model.yaml").read_text())
    assert meta["input"]["patch_zyx"] == [32, 48, 80]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[2:] == [32, 48, 80]

    monkeypatch.setattr("sys.argv", common + ["--new-stage", "--patch", "32", "48", "72", "--checkpoints",
                                              str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="multiple of 16"):
        train.main()


def test_a_teacher_stage_fills_missing_organs_of_the_training_patients_only(tmp_path, monkeypatch):
    """``--teacher``: the stage records the teacher's path and hash; its label maps are asked for
    the training patients only (the held-out ones keep their references); the sampler's weights
    stay the clinicians'; a resumed stage refuses a teacher file that changed."""
    from training import train

    task = TASKS["hn_oar"]
    names = [n for n, _ in task.outputs]
    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    teacher_maps = []
    for c in cases:
        lab = np.zeros(c.ct.shape, np.uint8)
        lab[10:20, 20:26, 20:26] = names.index("Larynx") + 1  # every synthetic patient lacks a larynx
        teacher_maps.append(lab)
    asked = []

    def fake_label_maps(cs, source, model_ts, cache_dir):
        asked.append(([c.name for c in cs], source.name, Path(model_ts).resolve()))
        return [teacher_maps[int(c.name.split("_")[1])] for c in cs]

    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))
    monkeypatch.setattr(train, "model_label_maps", fake_label_maps)
    teacher = tmp_path / "teacher.ts"
    teacher.write_bytes(b"a released model")
    common = ["train", "--task", "hn_oar", "--data", str(tmp_path), "--checkpoints", str(tmp_path / "ck"),
              "--holdout", "1", "--ckpt-every", "1", "--batch", "1", "--channels", *map(str, WIDTHS)]
    monkeypatch.setattr("sys.argv", common + ["--new-stage", "--teacher", str(teacher), "--iterations", "2",
                                              "--stop-at", "1", "--warmup", "1", "--lr", "1e-4"])
    train.main()
    assert asked == [(["pt_0", "pt_1"], "hn_oar", teacher.resolve())]  # pt_2 is held out
    stage = torch.load(tmp_path / "ck/hn_oar/state.pt", weights_only=False)["stage"]
    assert Path(train.ROOT / stage["teacher"]).resolve() == teacher.resolve()
    assert stage["teacher_sha256"] == hashlib.sha256(b"a released model").hexdigest()

    rng = np.random.default_rng(0)
    plain = train.Sampler(cases[:2], task, rng, train.NO_AUGMENTATION)
    taught = train.Sampler(cases[:2], task, rng, train.NO_AUGMENTATION, teachers=teacher_maps[:2])
    assert np.array_equal(plain.class_weight, taught.class_weight)
    larynx = names.index("Larynx")
    assert not plain.items[0][2][larynx] and taught.items[0][2][larynx]
    assert (taught.items[0][1][10:20, 20:26, 20:26] == larynx + 1).all()

    teacher.write_bytes(b"another model")
    monkeypatch.setattr("sys.argv", common)
    with pytest.raises(SystemExit, match="not the teacher"):
        train.main()
    monkeypatch.setattr("sys.argv", common + ["--new-stage", "--teacher", str(tmp_path / "missing.ts")])
    with pytest.raises(SystemExit, match="no such file"):
        train.main()
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_target", "--new-stage", "--teacher", str(teacher)])
    with pytest.raises(SystemExit, match="not a softmax task"):
        train.main()


def test_the_stage_chooses_its_optimizer_and_elastic_deformation(tmp_path, monkeypatch):
    """``--optimizer sgd`` is nnU-Net's SGD (Nesterov, momentum 0.99); ``--elastic P`` reaches the
    sampler's augmentation; both are recorded in the stage, and stages before them stay AdamW
    without elastic deformation."""
    from training import train

    net = torch.nn.Conv3d(1, 1, 1)
    sgd = train.make_optimizer(net, {"lr": 1e-2, "optimizer": "sgd"})
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.99 and sgd.defaults["nesterov"]
    assert isinstance(train.make_optimizer(net, {"lr": 1e-3}), torch.optim.AdamW)  # a stage saved before

    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))
    seen = []
    real_cut = train.cut_patch
    monkeypatch.setattr(train, "cut_patch", lambda *a, **k: seen.append(a[6].p_elastic) or real_cut(*a, **k))
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_oar", "--data", str(tmp_path), "--checkpoints",
                                     str(tmp_path / "ck"), "--holdout", "1", "--batch", "1", "--channels",
                                     *map(str, WIDTHS), "--new-stage", "--iterations", "1", "--warmup", "1",
                                     "--lr", "1e-2", "--optimizer", "sgd", "--elastic", "0.2"])
    train.main()
    stage = torch.load(tmp_path / "ck/hn_oar/state.pt", weights_only=False)["stage"]
    assert stage["optimizer"] == "sgd" and stage["elastic"] == 0.2 and seen == [0.2]
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_oar", "--new-stage", "--elastic", "0.2", "--no-augment"])
    with pytest.raises(SystemExit, match="--no-augment"):
        train.main()


def _sampler(seed: int = 0):
    from training.augment import AugmentConfig
    from training.train import Sampler

    cases = [_synthetic_case(f"pt_{i}", i) for i in range(2)]
    return Sampler(cases, TASKS["hn_oar"], np.random.default_rng([seed, 0]), AugmentConfig())


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b))


def test_the_patch_stream_is_the_same_with_any_number_of_workers_and_after_a_resume(caplog):
    """Batch i of a per-iteration stream comes from (seed, i): worker processes draw the same
    batches in the same order, and a stage resumed at iteration 2 continues the same stream.
    A sequential stream (the stages before it) stays the sampler's own, in the training process."""
    from training.loader import batches

    stage = {"batch": 2, "seed": 7, "stream": "per-iteration"}
    sampler = _sampler()
    alone = list(batches(sampler, stage, 0, 4, workers=0))
    assert [tuple(t.shape) for t in alone[0]] == [(2, 1, 64, 80, 80), (2, 64, 80, 80), (2, 7, 64)]  # 7 organs
    assert not torch.equal(alone[0][0], alone[1][0])  # each batch its own patches
    assert _same_batches(list(batches(sampler, stage, 0, 4, workers=2)), alone)
    assert _same_batches(list(batches(sampler, stage, 2, 4, workers=0)), alone[2:])
    assert not _same_batches(list(batches(sampler, {**stage, "seed": 8}, 0, 4)), alone)

    old = {"batch": 2, "seed": 7}  # saved before the key: the sampler's sequential stream
    expected = [tuple(torch.from_numpy(np.stack(a)) for a in zip(*[s_.sample() for _ in range(2)]))
                for s_ in [_sampler(1)] for _ in range(3)]
    with caplog.at_level("INFO", logger="training.loader"):
        assert _same_batches(list(batches(_sampler(1), old, 0, 3, workers=2)), expected)
    assert "not used" in caplog.text
    with pytest.raises(ValueError, match="stream 'shuffled'"):
        next(batches(sampler, {**stage, "stream": "shuffled"}, 0, 1))


def test_a_stage_trains_the_same_weights_with_and_without_worker_processes(tmp_path, monkeypatch):
    """--workers changes who draws the patches, not which: two new stages alike but for it end
    with the same weights; the stage records its stream, and fp16 (scaled gradients) trains too."""
    from training import train

    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))

    def run(name, *extra):
        monkeypatch.setattr("sys.argv", ["train", "--task", "hn_oar", "--data", str(tmp_path), "--checkpoints",
                                         str(tmp_path / name), "--holdout", "1", "--batch", "1", "--channels",
                                         *map(str, WIDTHS), "--new-stage", "--iterations", "2", "--warmup", "1",
                                         "--lr", "1e-3", "--patch", *map(str, PATCH), *extra])
        train.main()
        return torch.load(tmp_path / name / "hn_oar/state.pt", weights_only=False)

    alone, workers = run("alone", "--workers", "0"), run("workers", "--workers", "2")
    assert alone["stage"]["stream"] == "per-iteration" and alone["iteration"] == 2
    assert all(torch.equal(alone["model"][k], workers["model"][k]) for k in alone["model"])
    half = run("fp16", "--workers", "0", "--precision", "fp16")
    assert all(torch.isfinite(v.float()).all() for v in half["model"].values())
    assert any(not torch.equal(alone["model"][k], half["model"][k]) for k in alone["model"])
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_oar", "--workers", "-1"])
    with pytest.raises(SystemExit, match="--workers -1"):
        train.main()


def test_batch_dice_scores_each_structure_over_the_batch_and_counts_false_positives_of_patches_without_it(
    tmp_path, monkeypatch
):
    """--batch-dice: with one patch it is the per-patch loss; with a second patch that lacks the
    structure but where it is known, that patch's false positives now cost Dice.  The stage
    records it; a sigmoid task refuses it."""
    from training import train

    cases = [_synthetic_case(f"pt_{i}", i) for i in range(3)]
    monkeypatch.setattr(train, "cached_cases", lambda *a, **k: list(cases))
    seen = []
    real_loss = train.softmax_marginal_loss
    monkeypatch.setattr(train, "softmax_marginal_loss", lambda *a: seen.append(a[4]) or real_loss(*a))
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_oar", "--data", str(tmp_path), "--checkpoints",
                                     str(tmp_path / "ck"), "--holdout", "1", "--channels", *map(str, WIDTHS),
                                     "--new-stage", "--iterations", "1", "--patch", *map(str, PATCH), "--batch-dice"])
    train.main()
    assert torch.load(tmp_path / "ck/hn_oar/state.pt", weights_only=False)["stage"]["batch_dice"] is True
    assert seen == [True]
    monkeypatch.setattr("sys.argv", ["train", "--task", "hn_target", "--new-stage", "--batch-dice"])
    with pytest.raises(SystemExit, match="--batch-dice: hn_target is not a softmax task"):
        train.main()

    torch.manual_seed(0)
    labels = torch.zeros(2, 4, 6, 6, dtype=torch.long)
    labels[0, 1:3, 2:4, 2:4] = 1  # structure 1 in the first patch only
    known = torch.ones(2, 2, 4, dtype=torch.bool)
    logits = torch.zeros(2, 3, 4, 6, 6)
    logits[:, 1, 1:3, 2:4, 2:4] = 4.0  # both patches predict it in the same place
    one = softmax_marginal_loss(logits[:1], labels[:1], known[:1])
    assert torch.isclose(softmax_marginal_loss(logits[:1], labels[:1], known[:1], batch_dice=True), one)
    per_patch = softmax_marginal_loss(logits, labels, known)
    batch = softmax_marginal_loss(logits, labels, known, batch_dice=True)
    assert batch > per_patch + 0.1  # the second patch's false positives enter the Dice term
    known[1, 0] = False  # ... unless the structure is unknown there (a patient without it)
    assert torch.isclose(softmax_marginal_loss(logits, labels, known, batch_dice=True),
                         softmax_marginal_loss(logits, labels, known))
