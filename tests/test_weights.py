"""Full weights as a conversion source: reading safetensors, torch state dicts and HF
folders, checking them against a model layout, and laying them out as a DeepSpeed
checkpoint with fresh optimizer state."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import layoutc
from layoutc.cli import main
from layoutc.conversion import SourceFiles, verify
from layoutc.errors import LayoutError, Unsupported
from layoutc.formats import pt
from layoutc.formats import safetensors as st
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.weights import check_weights, open_weights
from layoutc.place import place

EXAMPLE = "examples/deepspeed-zero2"
GROUPS = [{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": wd} for wd in (0.1, 0)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """The example model's weights exported to safetensors, and its layout as a spec."""
    tmp = tmp_path_factory.mktemp("weights")
    layoutc.convert(EXAMPLE, tmp / "st", "safetensors")
    spec = tmp / "model.layout"
    spec.write_text(infer(open_checkpoint(EXAMPLE)))
    return tmp / "st", spec, st.load_state_dict(tmp / "st")


def test_safetensors_torch_and_hf_folders_list_every_tensor(model, tmp_path):
    folder, _, values = model
    w = open_weights(folder)
    assert w.format == "safetensors" and w.files == ["model.safetensors"]
    assert w.ties == {"head.weight": "embed.weight"}
    assert w.entries["head.weight"] == w.entries["embed.weight"]  # a tie stored once
    assert set(w.entries) == set(values)
    sd = OrderedDict(
        (k, torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16))
        for k, v in values.items()
    )
    sd["head.weight"] = sd["embed.weight"]  # shared storage, as a tied module saves it
    torch.save(sd, tmp_path / "pytorch_model.bin")
    w = open_weights(tmp_path)
    assert w.format == "torch" and w.entries["fc1.weight"].dtype == "bf16"
    assert w.ties == {"head.weight": "embed.weight"}
    assert open_weights(tmp_path / "pytorch_model.bin").entries == w.entries


def test_sharded_safetensors_are_read_through_their_index(model, tmp_path):
    layoutc.convert(EXAMPLE, tmp_path / "sharded", "safetensors", max_shard_size=600)
    w = open_weights(tmp_path / "sharded")
    assert len(w.files) > 1 and set(w.entries) == set(model[2])


def test_a_spec_that_disagrees_with_the_weights_names_file_tensor_and_shapes(model, tmp_path):
    folder, spec, _ = model
    text = spec.read_text()
    bad = tmp_path / "bad.layout"
    bad.write_text(
        text.replace("tensor fc1.weight [6, 10]", "tensor fc1.weight [6, 11]")
        + "tensor extra.weight [3]\n"
    )
    with pytest.raises(LayoutError) as e:
        check_weights(layoutc.load_layout(bad), open_weights(folder))
    out = e.value.render()
    assert "error[E303]:" in out and "model.safetensors: fc1.weight has shape [6, 10]" in out
    assert "the layout says [6, 11]" in out
    assert "error[E302]:" in out and "no tensor extra.weight" in out


def test_weights_become_a_deepspeed_checkpoint_with_fresh_optimizer_state(model, tmp_path):
    folder, spec, values = model
    out = tmp_path / "ds"
    report = layoutc.convert(
        folder, out, "deepspeed", spec=spec, overrides={"dp": 3}, param_groups=GROUPS
    )
    assert verify(out) == []
    assert any("fresh exp_avg" in w for w in report.warnings)
    assert any("load_lr_scheduler_states=False" in w for w in report.warnings)
    ckpt = open_checkpoint(out)
    assert ckpt.tag == "global_step2" and len(ckpt.optim_files) == 3
    layout = layoutc.load_text(infer(ckpt))
    p = place(layout)
    files = SourceFiles(ckpt.folder)
    from layoutc import zero

    try:
        back = zero.reassemble(
            layout, {(b.file, b.key): files[(b.file, b.key)][:] for b in p.buffers()}
        )
    finally:
        files.close()
    for t in p.trainable:
        assert np.array_equal(back[t.name]["master"], np.asarray(values[t.name], np.float32)), (
            t.name
        )
        assert not back[t.name]["exp_avg"].any() and not back[t.name]["exp_avg_sq"].any()
        assert float(back[t.name]["step"]) == 0.0
    inner = pt.load(ckpt.optim_files[0])["optimizer_state_dict"]
    groups = inner["base_optimizer_state"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0] and [g["params"] for g in groups] == [
        [0],
        [1],
    ]
    states = pt.load(ckpt.model_files[0])
    assert states["global_steps"] == 0 and states["lr_scheduler"] is None
    assert states["dp_world_size"] == 3


def test_fresh_optimizer_state_needs_param_groups(model, tmp_path):
    folder, spec, _ = model
    with pytest.raises(Unsupported, match=r"--param-groups FILE\.json"):
        layoutc.convert(folder, tmp_path / "a", "deepspeed", spec=spec)
    with pytest.raises(Unsupported, match="gives 1 param groups; the target's optimizer has 2"):
        layoutc.convert(folder, tmp_path / "b", "deepspeed", spec=spec, param_groups=GROUPS[:1])
    assert not any(tmp_path.iterdir())  # nothing committed, nothing left behind
    # no spec: the inferred layout has one param group, written with AdamW's defaults
    report = layoutc.convert(folder, tmp_path / "c", "deepspeed")
    assert any("no --param-groups: one param group" in w for w in report.warnings)
    optim = pt.load(next((tmp_path / "c").glob("*/*optim_states.pt")))
    groups = optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert groups == [{**layoutc.conversion.DEFAULT_PARAM_GROUP, "params": [0]}]


def test_the_cli_converts_weights_with_a_spec_and_param_groups(model, tmp_path, capsys):
    folder, spec, _ = model
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps(GROUPS))
    argv = ["convert", folder, "--spec", spec, "--to", "deepspeed", "--set", "dp=3"]
    code = main([str(a) for a in [*argv, "--param-groups", groups, "-o", tmp_path / "ds", "-q"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning: the weights carry no run state" in err and "in 4 files (and latest," in out
    groups.write_text('{"lr": 1}')
    code = main([str(a) for a in [*argv, "--param-groups", groups, "-o", tmp_path / "x", "-q"]])
    assert code == 2 and "expected a JSON list of objects" in capsys.readouterr().err


def _without_zero(spec: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``spec`` with no ZeRO stage, and a --param-groups file for it."""
    plain = tmp_path / "plain.layout"
    plain.write_text(
        "".join(x for x in spec.read_text().splitlines(True) if not x.startswith("zero"))
    )
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps(GROUPS))
    return plain, groups


def test_a_spec_without_zero_gives_a_zero_2_deepspeed_target_and_says_so(model, tmp_path, capsys):
    folder, spec, _ = model
    plain, groups = _without_zero(spec, tmp_path)
    for extra, stage in (([], 2), (["--zero", "0"], 0)):
        out = tmp_path / f"z{stage}"
        argv = [folder, "--spec", plain, "--to", "deepspeed", "--param-groups", groups]
        code = main([str(a) for a in ["convert", *argv, *extra, "-o", out, "-q"]])
        _, err = capsys.readouterr()
        assert code == 0, err
        assert ("the target is ZeRO-2 over dp" in err) == (stage == 2)
        assert f"zero {stage} over dp" in infer(open_checkpoint(out))


def test_a_spec_without_zero_gives_a_universal_target_of_a_zero_2_run(model, tmp_path, capsys):
    """A universal checkpoint holds DeepSpeed's model files of a ZeRO-1/2/3 run: the same
    default as a DeepSpeed target, and ZeRO-0 refused with the flag that chooses."""
    folder, spec, values = model
    plain, groups = _without_zero(spec, tmp_path)
    argv = [folder, "--spec", plain, "--to", "universal", "--param-groups", groups]
    code = main([str(a) for a in ["convert", *argv, "-o", tmp_path / "u", "-q"]])
    _, err = capsys.readouterr()
    assert code == 0 and "the target is ZeRO-2 over dp" in err, err
    layoutc.convert(tmp_path / "u", tmp_path / "back", "safetensors", dtype="fp32")
    back = st.load_state_dict(tmp_path / "back")
    for name, v in values.items():  # the fp32 masters are the weights, exactly
        np.testing.assert_array_equal(np.asarray(back[name], np.float32), np.asarray(v, np.float32))
    code = main([str(a) for a in ["convert", *argv, "--zero", "0", "-o", tmp_path / "z", "-q"]])
    _, err = capsys.readouterr()
    assert code == 1 and "this layout declares no ZeRO stage: give --zero 1, 2 or 3" in err


def test_weights_are_inspected_and_inferred_and_convert_without_a_spec(model, tmp_path, capsys):
    folder, _, values = model
    assert main(["inspect", str(folder)]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"{folder}: full weights (safetensors)") and "1 ties" in out
    assert main(["infer", str(folder), "-o", str(tmp_path / "w.layout")]) == 0
    capsys.readouterr()
    layout = layoutc.load_layout(tmp_path / "w.layout")  # a layout that checks
    stored = {n: e for n, e in open_weights(folder).entries.items() if n != "head.weight"}
    assert {t.name: t.shape for t in layout.tensors} == {n: e.shape for n, e in stored.items()}
    assert dict(layout.ties) == {"head.weight": "embed.weight"} and layout.zero.stage == 2
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps(GROUPS[:1]))
    argv = ["convert", folder, "--to", "deepspeed", "--set", "dp=2", "--param-groups", groups]
    assert main([str(a) for a in [*argv, "-o", tmp_path / "ds", "-q"]]) == 0
    _, err = capsys.readouterr()
    assert "warning: no --spec: the layout is inferred from the weights" in err
    ckpt = open_checkpoint(tmp_path / "ds")
    assert ckpt.dp == 2 and verify(tmp_path / "ds") == []
    layoutc.convert(tmp_path / "ds", tmp_path / "back", "safetensors", dtype="fp32")
    back = st.load_state_dict(tmp_path / "back")
    for name, v in values.items():  # the fp32 masters are the weights, exactly
        np.testing.assert_array_equal(np.asarray(back[name], np.float32), np.asarray(v, np.float32))


def test_a_hugging_face_folder_goes_to_deepspeed_with_no_spec_and_back_whole(tmp_path, capsys):
    """save_pretrained leaves a tied head out of the files; config.json says it is tied."""
    import transformers  # the test extra

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["infer", str(tmp_path / "hf")]) == 0
    assert "tie lm_head.weight = transformer.wte.weight" in capsys.readouterr().out
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps(GROUPS[:1]))
    argv = ["convert", tmp_path / "hf", "--to", "deepspeed", "--set", "dp=2"]
    assert (
        main([str(a) for a in [*argv, "--param-groups", groups, "-o", tmp_path / "ds", "-q"]]) == 0
    )
    layoutc.convert(tmp_path / "ds", tmp_path / "back", "safetensors")
    again = transformers.GPT2LMHeadModel(config)
    back = {
        k: torch.from_numpy(np.asarray(v)) for k, v in st.load_state_dict(tmp_path / "back").items()
    }
    again.load_state_dict(back, strict=False)
    for name, value in hf.state_dict().items():  # every tensor, the tied head included
        assert torch.equal(again.state_dict()[name], value), name
