"""A Hugging Face Trainer on DeepSpeed (through accelerate) that saves and resumes through
layoutc (torchrun script; the recipe of docs/training.md).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node W tests/interop/hf_trainer.py --out DIR \\
        --steps N [--resume DIR/checkpoint-K] --dump OUT.safetensors

A tiny Llama (ds_make.LLAMA_MODEL, built from its config) trained by ``Trainer`` with a
DeepSpeed ZeRO-2 fp32 config and a checkpoint every 2 steps into ``DIR``; the script's one
layoutc line is ``layoutc.deepspeed.attach_all()`` before the Trainer makes its engine. With
``--resume`` the Trainer resumes from that checkpoint, at whatever W this launch has. After
training, every rank waits for the last save, and rank 0 writes ``OUT.safetensors``
(``fp32/<name>``, ``exp_avg/<name>``, ``exp_avg_sq/<name>`` of every parameter, gathered
with DeepSpeed's safe_get_full_* helpers: at the end of training, or with ``--resume`` as
loaded, before the first step) and ``OUT.json`` (``global_step`` of the
Trainer, ``global_steps`` of the engine, ``world_size``, ``resumed_at``: the Trainer's step
right after loading, ``losses``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_make  # after the sys.path insert above

SAMPLES, SEQ = 48, 8


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", required=True, type=int)
    ap.add_argument("--resume", type=Path)
    ap.add_argument("--dump", required=True, type=Path)
    args = ap.parse_args(argv)

    def work() -> None:
        import torch
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from transformers import (
            LlamaConfig,
            LlamaForCausalLM,
            Trainer,
            TrainerCallback,
            TrainingArguments,
        )

        import layoutc.deepspeed

        layoutc.deepspeed.attach_all()  # the recipe's one line

        torch.manual_seed(ds_make.SEED)
        model = LlamaForCausalLM(LlamaConfig(**ds_make.LLAMA_MODEL))
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, ds_make.LLAMA_MODEL["vocab_size"], (SAMPLES, SEQ), generator=g)
        data = [{"input_ids": t, "labels": t} for t in tokens]
        config = {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 2},
            "zero_force_ds_cpu_optimizer": False,
        }
        targs = TrainingArguments(
            output_dir=str(args.out),
            per_device_train_batch_size=2,
            max_steps=args.steps,
            save_steps=2,
            save_strategy="steps",
            logging_steps=1,
            learning_rate=1e-3,
            report_to=[],
            deepspeed=config,
            seed=ds_make.SEED,
            use_cpu=True,
        )
        losses: list[float] = []
        resumed_at: list[int] = []
        captured: dict[str, torch.Tensor] = {}

        def capture(engine) -> None:  # type: ignore[no-untyped-def]
            opt = engine.optimizer
            if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # see ds_make.capture
                opt._hp_optimizer_states_linked = False
                opt._lazy_init_hp_params_optimizer_state()
            for name, p in engine.module.named_parameters():
                captured[f"fp32/{name}"] = safe_get_full_fp32_param(p).detach().clone()
                for state in ("exp_avg", "exp_avg_sq"):
                    captured[f"{state}/{name}"] = safe_get_full_optimizer_state(p, state).clone()

        class Record(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, a, state, control, **kw):  # type: ignore[no-untyped-def]
                resumed_at.append(state.global_step)
                if args.resume:  # what the resumed job holds before its first step
                    capture(trainer.model_wrapped)

            def on_log(self, a, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Record()])
        trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
        engine = trainer.model_wrapped
        engine.checkpoint_engine.wait()
        if not args.resume:
            capture(engine)
        tensors = captured
        if dist.get_rank() == 0:
            meta = {
                "global_step": trainer.state.global_step,
                "global_steps": engine.global_steps,
                "world_size": dist.get_world_size(),
                "resumed_at": resumed_at[0] if resumed_at else None,
                "losses": losses,
            }
            ds_make.write_truth(tensors, meta, args.dump)
        dist.barrier()

    ds_make.exit_process(work)


if __name__ == "__main__":
    main()
