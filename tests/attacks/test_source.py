"""Hostile and damaged checkpoints: every one is refused by name, nothing is written.

Each case damages a private copy of the shipped real DeepSpeed checkpoint (ZeRO-2, bf16,
two ranks) the way a crafted or corrupted file would be, runs the real command line on it in
a bounded child process and checks the refusal (see ``bounded.py``): exit 1, the file and
what is wrong named, no traceback, no output, the source unchanged.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import craft
import numpy as np
import pytest
from bounded import EXAMPLE, ROOT, assert_no_output, assert_refused, cli, tree
from hypothesis import given, settings
from hypothesis import strategies as st

from layoutc.formats import pt

TAG = "global_step2"
MODEL = f"{TAG}/mp_rank_00_model_states.pt"
OPTIM = f"{TAG}/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
TARGETS = ("universal", "safetensors", "deepspeed")


def refused_everywhere(ckpt: Path, tmp_path: Path, *needles: str, read_only: bool = False) -> None:
    """``inspect`` refuses ``ckpt`` (unless the damage is in tensor data only, which
    ``inspect`` never reads), every conversion refuses it and writes nothing, and the
    source is unchanged."""
    before = tree(ckpt)
    if not read_only:
        assert_refused(cli("inspect", ckpt), *needles)
    for to in TARGETS:
        out = tmp_path / f"out-{to}"
        extra = ("--set", "dp=3") if to == "deepspeed" else ()
        assert_refused(cli("convert", ckpt, "--to", to, "-o", out, "-q", *extra), *needles)
        assert_no_output(out)
    assert tree(ckpt) == before


def edit_model(ckpt: Path, edit: Any) -> None:
    craft.rewrite(ckpt / MODEL, edit)


# ---------------------------------------------------------------- tensor views


def _set_view(key: str, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> Any:
    def edit(obj: Any) -> None:
        v = obj["module"][key]
        v.offset, v.shape, v.stride = offset, shape, stride

    return edit


@pytest.mark.parametrize(
    ("offset", "shape", "stride", "what"),
    [
        (0, (20_000,), (1,), "reaches past its storage"),  # would copy process memory
        (0, (37, 10**9), (10, 1), "reaches past its storage"),  # SIGSEGV before
        (0, (37, 10), (10**9, 1), "reaches past its storage"),
        (0, (37, 10), (-1_000_000, 1), "negative"),
        (400, (37, 10), (10, 1), "reaches past its storage"),  # offset past the storage
        (0, (30_000, 30_000), (0, 0), "more than once"),  # a 1.8 GB output from 6 KB
        (0, (10**6, 10**6), (1, 1), "reaches past its storage"),  # MemoryError before
    ],
)
def test_a_tensor_view_outside_or_repeating_its_storage_is_refused(
    example: Path, tmp_path: Path, offset: int, shape: Any, stride: Any, what: str
) -> None:
    edit_model(example, _set_view("embed.weight", offset, shape, stride))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "module/embed.weight", what)


def test_a_shifted_view_of_an_fp32_master_is_refused(example: Path, tmp_path: Path) -> None:
    """Offset 10 into a flat fp32 partition would shift every weight by 10 elements."""

    def edit(obj: Any) -> None:
        v = obj["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
        v.offset = 10

    craft.rewrite(example / OPTIM, edit)
    refused_everywhere(example, tmp_path, "optim_states.pt", "single_partition_of_fp32_groups/0")


def test_a_storage_argument_that_is_a_string_is_refused(example: Path, tmp_path: Path) -> None:
    edit_model(example, lambda obj: setattr(obj["module"]["embed.weight"], "storage_arg", "x"))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "not a storage")


def test_a_storage_named_with_two_sizes_is_refused(example: Path, tmp_path: Path) -> None:
    def edit(obj: Any) -> None:
        s = obj["module"]["embed.weight"].storage
        alias = pt.Tensor(s.dtype, (5,), s.data, key=s.key)
        obj["module"]["extra"] = craft.View(alias, 0, (5,), (1,))

    edit_model(example, edit)
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "is named as")


@settings(max_examples=150, deadline=None)
@given(
    numel=st.integers(0, 24),
    offset=st.integers(-2, 26),
    dims=st.lists(st.tuples(st.integers(-1, 5), st.integers(-2, 7)), max_size=3),
)
def test_a_view_is_read_exactly_when_valid_and_refused_otherwise(
    tmp_path_factory: pytest.TempPathFactory, numel: int, offset: int, dims: list[Any]
) -> None:
    """Against a brute-force model: the storage elements a view names, in order."""
    shape = tuple(n for n, _ in dims)
    stride = tuple(s for _, s in dims)
    storage = np.arange(numel, dtype=np.float32)
    whole = pt.Tensor("fp32", (numel,), storage, key="0")
    path = tmp_path_factory.mktemp("view") / "v.pt"
    craft.write(path, {"t": craft.View(whole, offset, shape, stride)})

    valid = offset >= 0 and all(n >= 0 for n in shape) and all(s >= 0 for s in stride)
    expected = None
    if valid:
        idx = np.full(shape, offset, dtype=np.int64)
        for d, (n, s) in enumerate(dims):
            idx = idx + (np.arange(n) * s).reshape([-1 if i == d else 1 for i in range(len(dims))])
        flat = idx.reshape(-1)
        if flat.size == 0:
            valid = offset <= numel
        else:
            valid = bool(flat.max() < numel) and len(set(flat.tolist())) == flat.size
        expected = storage[flat].reshape(shape) if valid and flat.size else None
    if not valid:
        with pytest.raises(pt.BadContainer, match=r"v\.pt: the tensor t "):
            pt.load(path)
        return
    ref = pt.load(path)["t"]
    got = ref.numpy(pt.Opener())
    assert got.shape == shape
    if expected is not None:
        assert np.array_equal(got, expected)
        assert np.array_equal(ref.read_flat(0, ref.numel, pt.Opener()), expected.reshape(-1))


# ---------------------------------------------------------------- integrity


def test_a_flipped_byte_in_an_fp32_master_is_refused(example: Path, tmp_path: Path) -> None:
    """-0.499 would become -1.7e38 and the output would verify."""
    master = "optimizer_state_dict/single_partition_of_fp32_groups/0"
    _, data_at, size = craft.storage_of(example / OPTIM, master)
    craft.flip(example / OPTIM, data_at + size // 2 + 3)
    refused_everywhere(
        example, tmp_path, "optim_states.pt", "fails its CRC-32 check", read_only=True
    )


def test_a_flipped_byte_in_a_module_weight_is_refused(example: Path, tmp_path: Path) -> None:
    _, data_at, _ = craft.member(example / MODEL, "/data/1")
    craft.flip(example / MODEL, data_at + 5)
    for to in TARGETS:
        out = tmp_path / f"out-{to}"
        run = cli("convert", example, "--to", to, "-o", out, "-q")
        if run.code == 0:  # this target does not need the byte: the output must be exact
            assert cli("verify", out).code == 0
            continue
        assert_refused(run, "mp_rank_00_model_states.pt", "CRC-32")
        assert_no_output(out)


def test_a_flipped_byte_in_a_local_header_is_refused(example: Path, tmp_path: Path) -> None:
    """The extra-field length: all of embed.weight would shift by 16 bytes."""
    header, _, _ = craft.member(example / MODEL, "/data/1")
    craft.flip(example / MODEL, header + 28, 0x10)
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "data/1")


def test_a_bad_crc_of_the_pickle_is_refused(example: Path, tmp_path: Path) -> None:
    _, data_at, _ = craft.member(example / MODEL, "data.pkl")
    raw = bytearray((example / MODEL).read_bytes())
    at = raw.index(b"embed.weight", data_at)
    raw[at] = ord("E")  # still a valid pickle, other bytes
    (example / MODEL).write_bytes(bytes(raw))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "data.pkl", "CRC-32")


def _append_member(path: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr(zipfile.ZipInfo(name), data)


@pytest.mark.parametrize("member", ["data/1", "data.pkl"])
def test_a_duplicate_member_is_refused(example: Path, tmp_path: Path, member: str) -> None:
    """torch reads the first copy; a reader taking the second would read other bytes."""
    archive = "mp_rank_00_model_states"
    with zipfile.ZipFile(example / MODEL) as z:
        original = z.read(f"{archive}/{member}")
    _append_member(example / MODEL, f"{archive}/{member}", bytes(len(original)))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "appears twice")


def test_a_truncated_file_is_refused(example: Path, tmp_path: Path) -> None:
    raw = (example / OPTIM).read_bytes()
    (example / OPTIM).write_bytes(raw[: len(raw) // 2])
    refused_everywhere(example, tmp_path, "optim_states.pt")


def test_a_pickle_declared_larger_than_the_file_is_refused(example: Path, tmp_path: Path) -> None:
    """A central directory claiming 4 GB for data.pkl (an EOFError before)."""
    raw = bytearray((example / MODEL).read_bytes())
    with zipfile.ZipFile(example / MODEL) as z:
        cd = z.start_dir
    at = raw.index(b"PK\x01\x02", cd)
    raw[at + 20 : at + 28] = b"\xf0\xff\xff\xff" * 2  # compressed and uncompressed sizes
    (example / MODEL).write_bytes(bytes(raw))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt")


def test_a_compressed_pickle_is_refused_before_it_is_inflated(
    example: Path, tmp_path: Path
) -> None:
    """A deflated data.pkl that inflates 1000-fold (19 s and 3.5 GB RSS before)."""
    path = example / MODEL
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                data = data[:-1] + b"0" * 50_000_000 + data[-1:]  # never parsed that far
                z.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                z.writestr(info, data)
    assert path.stat().st_size < 1_000_000
    run = cli("inspect", example, memory=1 << 30)
    assert_refused(run, "mp_rank_00_model_states.pt", "compressed")
    assert run.seconds < 10


# ---------------------------------------------------------------- bombs and nesting


@pytest.mark.parametrize("where", ["client_state", "lr_scheduler", "ds_config"])
def test_a_billion_laughs_pickle_is_refused_in_bounded_time(
    example: Path, tmp_path: Path, where: str
) -> None:
    def edit(obj: Any) -> None:
        obj[where] = craft.laughs(40)

    edit_model(example, edit)
    assert (example / MODEL).stat().st_size < 20_000
    for argv in (
        ("inspect", example),
        ("convert", example, "--to", "deepspeed", "-o", tmp_path / "o"),
    ):
        run = cli(*argv, timeout=30, memory=1 << 30)
        assert_refused(run, "mp_rank_00_model_states.pt", "expands to more than")
        assert run.seconds < 10
    assert_no_output(tmp_path / "o")


def test_lists_nested_thousands_deep_are_refused(example: Path, tmp_path: Path) -> None:
    edit_model(example, lambda obj: obj.__setitem__("client_state", craft.nest(5_000)))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", "nested more than")


def test_what_a_checkpoint_legitimately_shares_still_loads(tmp_path: Path) -> None:
    """The visit budget counts a pickle's own bytes: a flat state of 100,000 entries, one
    string shared by all of them, is far under it."""
    shared = craft.Raw(b"X\x01\x00\x00\x00sq\x00")
    entries = OrderedDict((f"k{i}", i) for i in range(100_000))
    entries["s"] = shared
    craft.write(tmp_path / "big.pt", {"state": entries})
    assert len(pt.load(tmp_path / "big.pt")["state"]) == 100_001


# ---------------------------------------------------------------- metadata of the wrong type


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("optimizer_state_dict",), [1]),
        (("optimizer_state_dict", "zero_stage"), None),
        (("optimizer_state_dict", "single_partition_of_fp32_groups"), "x"),
        (("optimizer_state_dict", "param_alignment_paddings"), 7),
        (("optimizer_state_dict", "base_optimizer_state", "state"), None),
        (("optimizer_state_dict", "base_optimizer_state", "param_groups"), [7]),
        (("ds_config", "zero_optimization"), None),
    ],
)
def test_optimizer_metadata_of_the_wrong_type_is_refused_by_name(
    example: Path, tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    def edit(obj: Any) -> None:
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    craft.rewrite(example / OPTIM, edit)
    key = "/".join(map(str, path))
    refused_everywhere(example, tmp_path, "optim_states.pt", f"`{key}` holds")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("param_shapes", [1, 2, 3]),
        ("param_shapes", [{"embed.weight": "big"}]),
        ("module", [1, 2]),
        ("buffer_names", 7),
        ("frozen_param_shapes", [1]),
        ("checkpoint_parallel_dimensions", "tp=2"),
        ("shared_params", ["head.weight"]),
        ("mp_world_size", "two"),
        ("dp_world_size", -3),
    ],
)
def test_metadata_of_the_wrong_type_is_refused_by_name(
    example: Path, tmp_path: Path, key: str, value: Any
) -> None:
    edit_model(example, lambda obj: obj.__setitem__(key, value))
    refused_everywhere(example, tmp_path, "mp_rank_00_model_states.pt", f"`{key}` holds")


# ---------------------------------------------------------------- latest


@pytest.mark.parametrize(
    "latest",
    [b"\xff\xfeglobal", b"../global_step2", b"/etc", b"..", b"g" * 5000, b"a/b"],
)
def test_a_latest_that_is_not_one_folder_name_is_refused(
    example: Path, tmp_path: Path, latest: bytes
) -> None:
    (example / "latest").write_bytes(latest)
    refused_everywhere(example, tmp_path, str(example / "latest"))


def test_a_tag_a_layout_cannot_write_is_refused_naming_it(example: Path, tmp_path: Path) -> None:
    """A tag folder named with a `"` is a folder, but no layout can hold its name."""
    (example / "global_step2").rename(example / 'global"step2')
    (example / "latest").write_text('global"step2')
    refused_everywhere(example, tmp_path, str(example / "latest"), "which a layout cannot write")


def test_a_latest_climbing_out_of_a_nested_root_writes_nothing_outside(tmp_path: Path) -> None:
    """``D/sub/latest`` holding ``..`` made ``convert D/sub -o P/out`` write into ``P/``."""
    import shutil

    d = tmp_path / "D"
    shutil.copytree(EXAMPLE, d)
    (d / "sub").mkdir()
    (d / "sub" / "latest").write_text("..")
    (tmp_path / "P").mkdir()
    run = cli("convert", d / "sub", "--to", "deepspeed", "-o", tmp_path / "P" / "out", "-q")
    assert_refused(run, "latest", "'..'")
    assert list((tmp_path / "P").iterdir()) == []


def test_a_tag_option_that_is_a_path_is_refused(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    run = cli("convert", example, "--tag", "../ckpt/global_step2", "--to", "universal", "-o", out)
    assert_refused(run, "--tag", "one folder")
    assert_no_output(out)


def test_two_equal_sized_parameters_swapped_in_param_shapes_are_refused(
    example: Path, tmp_path: Path
) -> None:
    """The masters would be converted onto each other's names; the module's own bf16 copy
    of each weight shows the truth."""

    def edit(obj: Any) -> None:
        group = obj["param_shapes"][0]
        assert group["fc1.weight"] != group["fc2.weight"] and len(group) == 3
        obj["param_shapes"][0] = OrderedDict(
            [(k, group[k]) for k in ("embed.weight", "fc2.weight", "fc1.weight")]
        )

    edit_model(example, edit)
    for to in TARGETS:
        out = tmp_path / f"out-{to}"
        run = cli("convert", example, "--to", to, "-o", out, "-q")
        assert_refused(run, "E307", "fc2.weight", "not the rounding of their masters")
        assert_no_output(out)


# ---------------------------------------------------------------- weights folders


@pytest.mark.parametrize(
    ("index", "needle"),
    [
        ('{"weight_map": {"w": "../outside.safetensors"}}', "shards are files beside the index"),
        ('{"weight_map": {"w": "/etc/outside.safetensors"}}', "shards are files beside the index"),
        ('{"weight_map": ["w"]}', "no `weight_map` object"),
        ("{not json", "not a JSON index"),
        ('"\\ud800"', "no `weight_map` object"),
    ],
)
def test_a_hostile_weights_index_is_refused(tmp_path: Path, index: str, needle: str) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(index)
    out = tmp_path / "out"
    spec = ROOT / "specs" / "gpt2-small.layout"
    run = cli("convert", hf, "--spec", spec, "--to", "safetensors", "-o", out, "-q")
    assert_refused(run, "model.safetensors.index.json", needle)
    assert_no_output(out)
