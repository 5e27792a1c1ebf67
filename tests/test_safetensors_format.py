"""The safetensors format without torch, proven against the ``safetensors`` package and torch."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from layoutc.errors import Unsupported
from layoutc.formats import safetensors as sft
from layoutc.formats.safetensors import SafetensorsError

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {
    "fp32": (np.float32, torch.float32),
    "fp64": (np.float64, torch.float64),
    "fp16": (np.float16, torch.float16),
    "bf16": (ml_dtypes.bfloat16, torch.bfloat16),
    "int64": (np.int64, torch.int64),
    "int32": (np.int32, torch.int32),
    "int16": (np.int16, torch.int16),
    "int8": (np.int8, torch.int8),
    "uint8": (np.uint8, torch.uint8),
    "bool": (np.bool_, torch.bool),
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, torch.float8_e5m2),
}
NUMPY_NATIVE = {"fp32", "fp64", "fp16", "int64", "int32", "int16", "int8", "uint8", "bool"}
BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _values(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random bit patterns (NaNs and infinities included) of a dtype, as numpy."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(DTYPES[dtype][0])
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "bool":
        return rng.integers(0, 2, n).astype(np.bool_).reshape(shape)
    raw = rng.integers(0, 256, n * np_dtype.itemsize, dtype=np.uint8)
    return raw.view(np_dtype).reshape(shape)


def _bits(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return a
    return a.view(BITS[a.dtype.itemsize])


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bool:
        return t.numpy()
    return t.view(SIGNED[t.element_size()]).numpy().view(BITS[t.element_size()])


def _to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np.bool_:
        return torch.from_numpy(a.copy())
    signed = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    torch_dtype = DTYPES[sft._layoutc_dtype(a.dtype) or ""][1]
    return torch.from_numpy(a.view(signed).copy()).view(torch_dtype)


tensor_lists = st.lists(
    st.tuples(
        st.sampled_from(sorted(DTYPES)),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    ),
    min_size=1,
    max_size=4,
)
metadatas = st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3)


def _tensors(specs: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    # names deliberately out of sorted order, so "as given" differs from "sorted"
    return {f"t{len(specs) - i}.w": _values(d, s, seed + i) for i, (d, s) in enumerate(specs)}


# ------------------------------------------------------------------ interop


@settings(max_examples=30, deadline=None)
@given(tensor_lists, metadatas, st.integers(0, 2**32 - 1))
def test_the_safetensors_package_and_torch_load_what_layoutc_saves(
    tmp_path_factory, specs, metadata, seed
):
    values = _tensors(specs, seed)
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    n = sft.save(path, values, metadata)
    assert n == path.stat().st_size

    back = safetensors.torch.load_file(path)
    assert set(back) == set(values)
    for name, v in values.items():
        t = back[name]
        assert t.dtype == DTYPES[sft._layoutc_dtype(v.dtype) or ""][1]
        assert tuple(t.shape) == v.shape
        assert np.array_equal(_torch_bits(t), _bits(v))

    if all(sft._layoutc_dtype(v.dtype) in NUMPY_NATIVE for v in values.values()):
        nback = safetensors.numpy.load_file(path)
        for name, v in values.items():
            assert nback[name].dtype == v.dtype and nback[name].shape == v.shape
            assert np.array_equal(_bits(nback[name]), _bits(v))

    with safetensors.safe_open(path, "np") as f:
        assert (f.metadata() or {}) == (metadata or {})


@settings(max_examples=30, deadline=None)
@given(tensor_lists, metadatas, st.integers(0, 2**32 - 1), st.data())
def test_layoutc_reads_exactly_what_the_safetensors_package_writes(
    tmp_path_factory, specs, metadata, seed, data
):
    values = _tensors(specs, seed)
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    safetensors.torch.save_file({k: _to_torch(v) for k, v in values.items()}, path, metadata)

    entries, meta = sft.read_header(path)
    assert meta == (metadata or {})
    assert set(entries) == set(values)
    with sft.File(path) as f:
        for name, v in values.items():
            e = entries[name]
            assert (e.name, e.shape) == (name, v.shape)
            assert e.dtype == sft._layoutc_dtype(v.dtype)
            assert e.end - e.begin == v.nbytes
            whole = sft.read(path, name)
            assert whole.shape == (v.size,) and whole.dtype == v.dtype
            assert np.array_equal(_bits(whole), _bits(v.reshape(-1)))
            lo = data.draw(st.integers(0, v.size), label="lo")
            hi = data.draw(st.integers(lo, v.size), label="hi")
            part = f.read(name, lo, hi)
            assert np.array_equal(_bits(part), _bits(v.reshape(-1)[lo:hi]))


@settings(max_examples=30, deadline=None)
@given(tensor_lists, metadatas, st.integers(0, 2**32 - 1))
def test_writing_tensors_at_planned_offsets_in_reverse_order_gives_the_bytes_save_writes(
    tmp_path_factory, specs, metadata, seed
):
    values = _tensors(specs, seed)
    d = tmp_path_factory.mktemp("st")
    sft.save(d / "saved.safetensors", values, metadata)

    plan = [(k, sft._layoutc_dtype(v.dtype) or "", v.shape) for k, v in values.items()]
    head, offsets = sft.plan_file(plan, metadata)
    assert len(head) % 8 == 0  # the data buffer starts aligned
    total = len(head) + sum(v.nbytes for v in values.values())
    fd = os.open(d / "planned.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, total)
        for name in reversed(list(values)):
            os.pwrite(fd, values[name].tobytes(), offsets[name])
        os.pwrite(fd, head, 0)
    finally:
        os.close(fd)
    saved = (d / "saved.safetensors").read_bytes()
    assert (d / "planned.safetensors").read_bytes() == saved
    entries, _ = sft.read_header(d / "saved.safetensors")
    assert {k: e.begin for k, e in entries.items()} == offsets


def test_tensors_keep_the_order_given_and_metadata_comes_first(tmp_path):
    values = {"z": np.zeros(3, np.float32), "a": np.ones(2, np.int8), "m": np.zeros((), np.bool_)}
    path = tmp_path / "o.safetensors"
    sft.save(path, values, {"format": "pt", "b": "2"})
    entries, meta = sft.read_header(path)
    assert list(entries) == ["z", "a", "m"]
    assert entries["z"].begin < entries["a"].begin < entries["m"].begin
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    text = path.read_bytes()[8 : 8 + n].decode()
    assert text.startswith('{"__metadata__":{"b":"2","format":"pt"},"z":{"dtype":"F32"')
    assert text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
    assert meta == {"format": "pt", "b": "2"}


def test_save_writes_any_memory_layout_and_byte_order_row_major_little_endian(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    values = {"fortran": np.asfortranarray(a), "strided": a[:, ::2], "big": a.astype(">f4")}
    sft.save(tmp_path / "l.safetensors", values)
    back = safetensors.numpy.load_file(tmp_path / "l.safetensors")
    for name, v in values.items():
        assert np.array_equal(back[name], v) and back[name].dtype == np.float32


def test_save_streams_tensors_given_as_chunk_producers(tmp_path):
    v = np.arange(1000, dtype=ml_dtypes.bfloat16)
    raw = v.tobytes()

    def chunks():
        for i in range(0, len(raw), 300):
            yield raw[i : i + 300]

    sft.save(tmp_path / "a.safetensors", {"x": ("bf16", (10, 100), chunks)})
    sft.save(tmp_path / "b.safetensors", {"x": v.reshape(10, 100)})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("extra", [b"", b"\0\0\0\0"])
def test_a_stream_of_the_wrong_length_is_refused_and_leaves_no_file(tmp_path, extra):
    path = tmp_path / "short.safetensors"
    cut = b"\0" * 10 if not extra else b"\0" * 16 + extra
    with pytest.raises(SafetensorsError, match=r"short\.safetensors.*'x'.*16 bytes"):
        sft.save(path, {"x": ("fp32", (4,), lambda: iter([cut]))})
    assert not path.exists()


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"x": np.zeros(2, np.complex64)}, "complex64"),
        ({"x": np.zeros(2, np.uint16)}, "uint16"),
        ({"__metadata__": np.zeros(2, np.float32)}, "reserved"),
        ({"x": ("fp4", (2,), lambda: iter([b"\0"]))}, "fp4"),
        ({"x": ("fp32", (-1,), lambda: iter([]))}, "non-negative"),
        ({"x": [1.0, 2.0]}, "numpy array"),
    ],
)
def test_save_refuses_what_safetensors_cannot_hold(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(SafetensorsError, match=match) as e:
        sft.save(path, tensors)
    assert str(path) in str(e.value)


def test_plan_file_refuses_duplicate_names_and_non_string_metadata():
    with pytest.raises(SafetensorsError, match="twice"):
        sft.plan_file([("a", "fp32", (1,)), ("a", "fp32", (2,))], None)
    with pytest.raises(SafetensorsError, match="strings"):
        sft.plan_file([("a", "fp32", (1,))], {"k": 1})  # type: ignore[dict-item]


# ------------------------------------------------------------------ malformed files


def _file(header: dict | bytes, buffer: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + buffer


def _t(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


A = _t("F32", [2, 2], 0, 16)
DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"

# name -> (file bytes, what the error says)
ATTACKS = {
    "empty file": (b"", "too short"),
    "truncated header length": (b"\x10\0\0", "too short"),
    "header length beyond the file": (_file({"a": A}, bytes(16), length=10_000), "past the end"),
    "huge header length": (struct.pack("<Q", 2**63) + b"{}", "limit"),
    "header just over the limit": (struct.pack("<Q", 100_000_001) + b"{}", "limit"),
    "non-JSON header": (_file(b"{not json"), "not valid JSON"),
    "header not UTF-8": (_file(b'{"\xff":1}'), "UTF-8"),
    "header not an object": (_file(b"[1, 2]"), "start with"),
    "header of whitespace then JSON": (_file(b' {"a":1}'), "start with"),
    "deeply nested header": (_file(DEEP), "not valid JSON"),
    "NaN in a shape": (_file(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}'), "JSON"),
    "duplicate tensor name": (
        _file(b'{"a":' + json.dumps(A).encode() + b',"a":' + json.dumps(A).encode() + b"}"),
        "repeats",
    ),
    "overlapping offsets": (_file({"a": A, "b": _t("I32", [3], 8, 20)}, bytes(20)), "overlap"),
    "gap between tensors": (_file({"a": A, "b": _t("I32", [3], 20, 32)}, bytes(32)), "gap"),
    "gap at the start": (_file({"a": _t("F32", [2, 2], 4, 20)}, bytes(20)), "gap"),
    "trailing bytes": (_file({"a": A}, bytes(24)), "after the last tensor"),
    "offsets past the data": (_file({"a": A}, bytes(12)), "past the end of the data"),
    "wrong size for shape": (_file({"a": _t("F32", [2, 2], 0, 12)}, bytes(12)), "needs 16"),
    "end before begin": (_file({"a": _t("F32", [0], 8, 0)}, bytes(8)), "begin <= end"),
    "offsets not a pair": (
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}),
        "pair",
    ),
    "negative dimension": (_file({"a": _t("F32", [-1], 0, 0)}), "non-negative"),
    "float dimension": (_file({"a": _t("F32", [1.0], 0, 4)}, bytes(4)), "non-negative"),
    "boolean dimension": (_file({"a": _t("F32", [True], 0, 4)}, bytes(4)), "non-negative"),
    "missing shape": (_file({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4)), "shape"),
    "tensor info not an object": (_file({"a": [1, 2]}), "expected an object"),
    "unknown dtype": (_file({"a": _t("Q7", [1], 0, 1)}, bytes(1)), "Q7"),
    "unsupported dtype": (_file({"a": _t("U16", [1], 0, 2)}, bytes(2)), "does not support"),
    "non-string metadata": (_file({"__metadata__": {"k": 1}}), "strings to strings"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_malformed_files_are_refused_naming_the_file_and_the_problem(tmp_path, attack):
    content, says = ATTACKS[attack]
    path = tmp_path / "evil.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError) as e:
        sft.read_header(path)
    assert str(path) in str(e.value) and says in str(e.value)
    with pytest.raises(SafetensorsError):
        sft.read(path, "a")


def test_the_malformed_files_are_ones_the_safetensors_package_refuses_too(tmp_path):
    # The reference (Rust) reader refuses every one of them as well, except U16: a dtype it
    # knows and layoutc does not. So layoutc is no stricter than it on real files.
    for attack, (content, _) in ATTACKS.items():
        if attack == "unsupported dtype":
            continue
        path = tmp_path / "evil.safetensors"
        path.write_bytes(content)
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do
            safetensors.numpy.load_file(path)


def test_an_unsupported_dtype_is_reported_as_unsupported(tmp_path):
    path = tmp_path / "u16.safetensors"
    path.write_bytes(_file({"a": _t("U16", [1], 0, 2)}, bytes(2)))
    with pytest.raises(Unsupported):
        sft.read_header(path)


def test_reads_outside_a_tensor_or_of_a_missing_one_are_refused(tmp_path):
    path = tmp_path / "r.safetensors"
    sft.save(path, {"x": np.arange(6, dtype=np.int32)})
    assert sft.read(path, "x", 6, 6).shape == (0,)
    for lo, hi in [(-1, 2), (4, 2), (0, 7)]:
        with pytest.raises(SafetensorsError, match=r"r\.safetensors.*'x'"):
            sft.read(path, "x", lo, hi)
    with pytest.raises(SafetensorsError, match=r"r\.safetensors.*no tensor 'y'"):
        sft.read(path, "y")
    with pytest.raises(SafetensorsError, match="missing"):
        sft.read_header(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ sharded checkpoints


def test_shard_names_are_hugging_faces():
    assert sft.shard_names(1) == ["model.safetensors"]
    assert sft.shard_names(3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert sft.shard_names(12)[-1] == "model-00012-of-00012.safetensors"
    with pytest.raises(SafetensorsError):
        sft.shard_names(0)


@settings(max_examples=20, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=12), st.integers(1, 4), min_size=1, max_size=8),
    st.integers(0, 2**40),
    st.randoms(use_true_random=False),
)
def test_the_index_is_hugging_faces_and_does_not_depend_on_insertion_order(
    tmp_path_factory, shard_of, total, rnd
):
    names = sft.shard_names(4)
    weight_map = {k: names[v - 1] for k, v in shard_of.items()}
    shuffled = list(weight_map.items())
    rnd.shuffle(shuffled)
    d = tmp_path_factory.mktemp("idx")
    sft.write_index(d / "a.json", weight_map, total)
    sft.write_index(d / "b.json", dict(shuffled), total)
    text = (d / "a.json").read_text(encoding="utf-8")
    assert (d / "b.json").read_text(encoding="utf-8") == text
    # what transformers' save_pretrained writes for a sharded checkpoint
    expected = {"metadata": {"total_size": total}, "weight_map": weight_map}
    assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    loaded = json.loads(text)
    assert loaded == expected
    assert list(loaded["weight_map"]) == sorted(weight_map)


def test_an_index_and_its_shards_load_as_one_state_dict(tmp_path):
    values = {f"layers.{i}.w": np.full((2, 3), i, np.float32) for i in range(5)}
    names = sft.shard_names(2)
    groups = [list(values)[:3], list(values)[3:]]
    weight_map, total = {}, 0
    for name, group in zip(names, groups, strict=True):
        sft.save(tmp_path / name, {k: values[k] for k in group}, {"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        total += sum(values[k].nbytes for k in group)
    sft.write_index(tmp_path / "model.safetensors.index.json", weight_map, total, {"x": 1})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 120, "x": 1}
    state = {}
    for f in sorted(set(index["weight_map"].values())):
        state.update(safetensors.torch.load_file(tmp_path / f))
    assert set(state) == set(values)
    for k, v in values.items():
        assert np.array_equal(state[k].numpy(), v)


def test_the_format_module_does_not_import_torch(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code = (
        "import sys, numpy as np\n"
        "from layoutc.formats import safetensors as s\n"
        f"p = {str(tmp_path / 'x.safetensors')!r}\n"
        "s.save(p, {'a': np.arange(4, dtype=np.float32)})\n"
        "assert s.read(p, 'a', 1, 3).tolist() == [1.0, 2.0]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
