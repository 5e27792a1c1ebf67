"""layoutc inside a real DeepSpeed training job (layoutc.deepspeed): saves that hold what
DeepSpeed's own engine saves, are committed atomically, survive failures, and resume at
another topology — against real DeepSpeed 0.19.8 on CPU (ds_train.py, ds_load.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import corpus
import numpy as np
import pytest

from layoutc.runtime.commit import verify

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "ds_train.py"
TAG = "global_step2"
TIED = {"head.weight": "embed.weight"}  # ds_make's TinyLM: the head is the embedding
SAVED = [f"z{z}_w{w}_{d}" for z in (1, 2, 3) for w in (2, 3) for d in ("bf16", "fp32")]


def _launch(tmp: Path, cases: list[str], world: int, ds_python: str, *extra: str) -> None:
    corpus.torchrun(
        TRAIN,
        ["--case", ",".join(cases), "--out", str(tmp), *extra],
        world,
        python=ds_python,
        ext_dir=corpus_root() / "torch_extensions",
        log=corpus_root() / "logs" / f"train-w{world}-{tmp.name}.log",
    )


def corpus_root() -> Path:
    from conftest import cache_root

    return cache_root()


def _load(case: str, ckpt: Path, ds_python: str, scratch: Path | None = None) -> corpus.Loaded:
    """Real DeepSpeed at ``case``'s topology loads ``ckpt`` through
    ``layoutc.deepspeed.load_checkpoint`` (ds_load.py --layoutc), a reshard made in
    ``scratch`` if given."""
    via = scratch or True
    return corpus.load(case, ckpt, root=corpus_root(), python=ds_python, via_layoutc=via)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ds_python: str) -> dict[str, Path]:
    """{case: folder} of ds_train.py's saves (torch/, sync/, async/, truth), every case
    of SAVED; one launch per world size. Not cached across sessions: what they prove is
    layoutc's code of this session."""
    out = tmp_path_factory.mktemp("trained")
    for world in (2, 3):
        _launch(out, [c for c in SAVED if corpus.CASES[c]["world"] == world], world, ds_python)
    return {c: out / c for c in SAVED}


def _truth(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return corpus.read_truth(folder / "truth.safetensors")


@pytest.mark.parametrize("case", SAVED)
def test_a_save_through_layoutc_holds_exactly_what_deepspeed_saves(
    trained: dict[str, Path], case: str
) -> None:
    _, meta = _truth(trained[case])
    files = sorted(p.name for p in (trained[case] / "torch" / TAG).glob("*.pt"))
    assert meta["differences"] == []
    assert sorted(meta["compared"]) == sorted(f"{k}/{f}" for k in ("sync", "async") for f in files)
    assert meta["zero_to_fp32"] is True  # DeepSpeed's zero_to_fp32 reads the async save
    for kind in ("sync", "async"):
        root = trained[case] / kind
        assert (root / "latest").read_text() == TAG
        assert verify(root / TAG) == []  # the manifest: every file, its size and CRC-32
        assert not list(root.glob(".*layoutc*"))  # nothing partial left behind


@pytest.mark.parametrize("case", ["z2_w2_bf16", "z3_w3_fp32"])
def test_layoutc_converts_a_checkpoint_saved_through_layoutc(
    trained: dict[str, Path], case: str, tmp_path: Path
) -> None:
    truth, _ = _truth(trained[case])
    assert corpus.universal_exact(trained[case] / "async", tmp_path / "u", truth) > 0


@pytest.mark.parametrize("case", ["z1_w2_bf16", "z2_w3_fp32", "z3_w2_bf16"])
def test_a_run_resumed_through_layoutc_goes_on_bit_for_bit(
    trained: dict[str, Path], ds_python: str, case: str
) -> None:
    """Same topology: DeepSpeed's own load of the async save restores everything, and the
    next step's loss is the uninterrupted run's, to the bit."""
    truth, meta = _truth(trained[case])
    loaded = _load(case, trained[case] / "async", ds_python)
    corpus.assert_resumed(loaded, truth, meta)
    assert loaded.meta["next_loss"] == meta["next_loss"]
    assert Path(loaded.meta["load_path"]).parent == trained[case] / "async" / TAG


# (saved case, loading case): another data-parallel size, ZeRO stage or dtype
RESHARDS = [
    ("z1_w2_bf16", "z1_w3_bf16"),
    ("z1_w3_fp32", "z1_w2_fp32"),
    ("z2_w2_bf16", "z2_w3_bf16"),
    ("z3_w2_bf16", "z3_w3_bf16"),
    ("z2_w3_fp32", "z2_w2_fp32"),
    ("z3_w3_fp32", "z3_w2_fp32"),
    ("z2_w2_bf16", "z3_w3_bf16"),
    ("z1_w3_bf16", "z2_w2_fp32"),
]


def _assert_removed(folders: list[Path]) -> None:
    """No scratch folder of a reshard is left: renamed aside at once, and deleted while
    the job goes on."""
    left: list[Path] = []
    for _ in range(600):
        left = [p for f in folders for p in f.glob(".async*.layoutc-resume*")]
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: {left}")


@pytest.mark.parametrize(("saved", "case"), RESHARDS)
def test_load_checkpoint_resumes_at_another_topology_exactly(
    trained: dict[str, Path], ds_python: str, saved: str, case: str
) -> None:
    truth, meta = _truth(trained[saved])
    before = corpus.tree_bytes(trained[saved] / "async")
    # the scratch where it is made by default (here: /dev/shm), and one case in a folder
    scratch = trained[saved] / "scratch" if saved == RESHARDS[0][0] else None
    loaded = _load(case, trained[saved] / "async", ds_python, scratch)
    other_dtype = corpus.CASES[saved]["dtype"] != corpus.CASES[case]["dtype"]
    skip = tuple(k for k in truth if k.startswith("weight16/")) if other_dtype else ()
    corpus.assert_resumed(loaded, truth, meta, skip=skip)
    if other_dtype:  # the 16-bit weights are the masters in the job's dtype
        for k in skip:
            name = k.split("/", 1)[1]
            master = truth["fp32/" + TIED.get(name, name)]
            np.testing.assert_array_equal(loaded.tensors[k], master, err_msg=k)
    _assert_removed([trained[saved], trained[saved] / "scratch", Path("/dev/shm")])
    assert corpus.tree_bytes(trained[saved] / "async") == before  # the checkpoint was only read


def test_an_io_error_in_an_async_write_is_raised_by_the_next_save(
    tmp_path: Path, ds_python: str
) -> None:
    _launch(tmp_path, ["z2_w2_bf16"], 2, ds_python, "--fault", "io")
    root = tmp_path / "z2_w2_bf16"
    raised = json.loads((root / "fault.json").read_text())
    assert raised["B"] is None  # the async save of B returned before its writes failed
    assert raised["C"].startswith("SaveFailed: ")
    assert "B was not saved" in raised["C"] and "No space left on device" in raised["C"]
    assert raised["wait"] is None  # raised once, not again
    assert (root / "latest").read_text() == "A"
    assert not (root / "B").exists() and not list(root.glob(".*layoutc*"))
    assert verify(root / "A") == []


def test_a_rank_killed_during_an_async_save_leaves_the_last_tag_loadable(
    tmp_path: Path, ds_python: str
) -> None:
    with pytest.raises(RuntimeError, match="failed"):
        corpus.torchrun(
            TRAIN,
            ["--case", "z2_w2_bf16", "--out", str(tmp_path), "--fault", "kill"],
            2,
            python=ds_python,
            ext_dir=corpus_root() / "torch_extensions",
            log=corpus_root() / "logs" / f"train-kill-{tmp_path.name}.log",
            attempts=1,
        )
    root = tmp_path / "z2_w2_bf16"
    assert (root / "latest").read_text() == "A"
    assert not (root / "B").exists()
    assert verify(root / "A") == []
    loaded = _load("z2_w2_bf16", root, ds_python)
    assert loaded.error is None and loaded.meta["global_steps"] == 2


def test_load_checkpoint_resumes_an_autotp_job_at_another_tp(
    ds_corpus: corpus.Corpus, ds_python: str
) -> None:
    """A tensor-parallel (AutoTP) checkpoint of tp 4 resumed by a job of tp 2: resharded
    natively (DeepSpeed's own loader refuses another tp) and exact."""
    saved = "autotp4_dp1_z2_bf16"
    truth, meta = ds_corpus.truth(saved)
    loaded = _load("autotp2_dp1_z2_bf16", ds_corpus[saved], ds_python)
    assert loaded.meta["topology"]["tp"] == 2
    corpus.assert_resumed(loaded, truth, meta)


def test_a_hugging_face_trainer_resumes_at_another_gpu_count(
    tmp_path: Path, ds_python: str
) -> None:
    """The recipe of docs/training.md (hf_trainer.py): a Trainer on DeepSpeed ZeRO-2 saves
    through layoutc at 2 ranks; the same script resumes its checkpoint at 3 ranks, holding
    every fp32 master and Adam moment exactly, and trains on."""
    script = HERE / "hf_trainer.py"

    def run(world: int, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
        dump = tmp_path / f"w{world}.safetensors"
        corpus.torchrun(
            script,
            ["--dump", str(dump), *extra],
            world,
            python=ds_python,
            ext_dir=corpus_root() / "torch_extensions",
            log=corpus_root() / "logs" / f"trainer-w{world}-{tmp_path.name}.log",
        )
        return corpus.read_truth(dump)

    saved, meta = run(2, "--out", str(tmp_path / "run"), "--steps", "4")
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert (ckpt / "latest").read_text() == "global_step4" and verify(ckpt / "global_step4") == []
    loaded, resumed = run(3, "--out", str(tmp_path / "run3"), "--steps", "6", "--resume", str(ckpt))
    assert (meta["world_size"], resumed["world_size"]) == (2, 3)
    assert resumed["resumed_at"] == 4 and resumed["global_step"] == 6
    assert sorted(loaded) == sorted(saved) and len(saved) > 0
    for key, want in saved.items():
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)
    assert all(np.isfinite(resumed["losses"])) and len(resumed["losses"]) == 2
