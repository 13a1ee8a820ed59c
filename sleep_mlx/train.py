"""Training (SPEC section 3): Algorithm 1 on any common task or text, with MLX.

MLX mirror of sleep_torch/train.py: same functions, arguments, files and numbers.

    from common.tasks import make
    from common.config import TRAIN_PRESETS
    from sleep_mlx.train import train
    task = make("rule110", width=8, states=2, steps=0)
    summary = train(task, "debug", TRAIN_PRESETS["debug"], "runs/r110")

    python -m sleep_mlx.train --task rule110 --task-arg steps=0 --preset debug --out runs/r110

One optimizer step: the global batch of step s is task.sample(batch_size, data_seed(seed, s)), split
into grad_accum micro-batches. nn.value_and_grad runs every window and every sleep pass (model(tokens))
and differentiates through all of them; each micro-batch's summed float32 cross-entropy is weighted
by 1 / (counted targets of the global batch) and the gradient trees are added up, so the result is
the gradient of the mean over the global batch. Then: global grad-norm clipping, the lr schedule
(common.training.lr_at), Muon on the block matrices and AdamW on the rest (mlx.optimizers, with the
torch trainer's decoupled weight decay). Files under out_dir: metrics.jsonl, checkpoint/ (resumable,
exact) and model/, in the torch trainer's layout. One device, no distributed training (mx.distributed
is out of scope: use sleep_torch.train under torchrun). docs/TRAINING.md explains all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from tqdm import tqdm

from common import checkpoint as ckpt
from common import training as tr
from common.config import ModelConfig, TrainConfig
from common.tasks import Batch
from common.training import lr_at  # noqa: F401  (the schedule both backends share; public here too)
from sleep_mlx.io import read_tensors, save
from sleep_mlx.model import HybridLM

BACKEND = "mlx"
OPTIMIZER_SCALARS = ("step", "learning_rate")  # optimizer-wide MLX state: kept in optimizer.json


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message is one line."""


# --- optimizers ---------------------------------------------------------------------------------------

class Muon(optim.Muon):
    """mlx.optimizers.Muon with decoupled weight decay, the update of sleep_torch.train.Muon:

        v <- momentum * v + (1 - momentum) * g
        u <- (1 - momentum) * g + momentum * v            (nesterov; else u = v)
        W <- W * (1 - lr * weight_decay)                   (decoupled)
        W <- W - lr * sqrt(max(1, rows / cols)) * NS5(u)

    MLX's own weight_decay is coupled (added to the gradient before the momentum, so it gets
    orthogonalized); it stays 0 here and the decay is applied to the weight first, as AdamW does.
    """

    def __init__(self, learning_rate, momentum: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 ns_steps: int = 5):
        super().__init__(learning_rate, momentum=momentum, weight_decay=0.0, nesterov=nesterov, ns_steps=ns_steps)
        self.decoupled_weight_decay = weight_decay

    def apply_single(self, gradient, parameter, state):
        if gradient.ndim != 2:
            raise ValueError(f"Muon trains 2-D weights only, got a parameter of shape {list(gradient.shape)}")
        if self.decoupled_weight_decay:
            parameter = parameter * (1 - self.learning_rate.astype(gradient.dtype) * self.decoupled_weight_decay)
        return super().apply_single(gradient, parameter, state)


def build_optimizers(model: HybridLM, tc: TrainConfig) -> dict[str, optim.Optimizer]:
    """{"muon": block matrices, "adamw": everything else} (split by common.training.is_muon_param
    in `optimizer_step`; MLX optimizers hold no parameter list, they initialize on first use)."""
    return {
        "muon": Muon(tc.muon_lr, momentum=tc.muon_momentum, weight_decay=tc.weight_decay),
        "adamw": optim.AdamW(tc.adamw_lr, betas=list(tc.adam_betas), eps=1e-8, weight_decay=tc.weight_decay,
                             bias_correction=True),  # MLX's default is False; torch always corrects
    }


def set_lr(optimizers: dict, tc: TrainConfig, step: int) -> float:
    """Apply the schedule of optimizer step `step` to both optimizers; returns the multiplier."""
    factor = lr_at(step, tc)
    peaks = {"muon": tc.muon_lr, "adamw": tc.adamw_lr}
    for name, opt in optimizers.items():
        opt.learning_rate = peaks[name] * factor
    return factor


def _param_names(model: HybridLM, opt_name: str) -> list[str]:
    """Canonical names of the parameters that optimizer `opt_name` trains."""
    return [n for n, _ in tree_flatten(model.trainable_parameters()) if tr.is_muon_param(n) == (opt_name == "muon")]


def optimizer_step(model: HybridLM, optimizers: dict, grads: dict) -> None:
    """Update the model with both optimizers (torch: muon.step(); adamw.step()). Lazy."""
    params = model.trainable_parameters()
    flat = dict(tree_flatten(grads))
    new = []
    for opt_name, opt in optimizers.items():
        part = tree_unflatten([(n, flat[n]) for n in _param_names(model, opt_name)])
        new += tree_flatten(opt.apply_gradients(part, params))
    model.update(tree_unflatten(new))


# --- loss and data -------------------------------------------------------------------------------------

def masked_loss(logits, tokens, loss_mask):
    """(summed float32 cross-entropy over counted targets, number of counted targets).

    logits[:, t] predicts tokens[:, t+1]; loss_mask[:, t+1] says whether that target counts.
    MLX has no boolean indexing: every position's loss is computed and the uncounted ones are zeroed.
    """
    target_mask = loss_mask[:, 1:]  # (B, T-1)
    pred = logits[:, :-1].astype(mx.float32)  # (B, T-1, V)
    ce = nn.losses.cross_entropy(pred, tokens[:, 1:], reduction="none")  # (B, T-1)
    return mx.where(target_mask, ce, 0.0).sum(), int(target_mask.sum().item())


def batch_for_step(task, tc: TrainConfig, step: int, rank: int = 0, world: int = 1):
    """(this rank's rows of step `step`'s global batch, counted targets in the whole global batch)."""
    batch = task.sample(tc.batch_size, seed=tr.data_seed(tc.seed, step))
    global_count = int(batch.loss_mask[:, 1:].sum())
    start, stop = tr.rank_rows(tc.batch_size, rank, world)
    local = Batch(batch.tokens[start:stop], batch.loss_mask[start:stop],
                  {k: v[start:stop] for k, v in batch.meta.items()})
    return local, global_count


def evaluate(model: HybridLM, task, n: int, seed: int = tr.EVAL_SEED, *, passes: int | None = None,
             batch_size: int = 64, autocast=contextlib.nullcontext) -> dict:
    """Score the model on task.sample(n, seed): {"loss": mean counted cross-entropy, **task.score}."""
    batch = task.sample(n, seed)
    tokens = mx.array(batch.tokens, dtype=mx.int32)
    mask = mx.array(batch.loss_mask)
    logits, loss_sum, count = [], 0.0, 0
    for i in range(0, n, batch_size):
        with autocast():
            out = model(tokens[i:i + batch_size], passes)
        s, c = masked_loss(out, tokens[i:i + batch_size], mask[i:i + batch_size])
        loss_sum, count = loss_sum + s.item(), count + c
        logits.append(np.array(out.astype(mx.float32)))
    scores = task.score(np.concatenate(logits), batch)
    return {**scores, "loss": loss_sum / max(count, 1)}


# --- compute dtype -------------------------------------------------------------------------------------
# MLX has no autocast. bfloat16 training keeps float32 master weights (what the optimizers update and
# the checkpoints hold) and runs the forward on bf16 copies made inside the differentiated function,
# so gradients come back float32 through the casts. A_log and dt_bias stay float32: the mixer computes
# the gates in float32 anyway, and rounding A_log to bf16 would move every decay rate by up to ~1%.
FLOAT32_PARAMS = ("A_log", "dt_bias")


@contextlib.contextmanager
def compute_dtype(model: HybridLM, dtype=None):
    """Run the model on copies of its parameters cast to `dtype` (None: as they are), then restore."""
    if dtype is None:
        yield
        return
    master = model.parameters()
    model.update(tree_map_with_path(lambda name, p: p if name.endswith(FLOAT32_PARAMS) else p.astype(dtype),
                                    master))
    try:
        yield
    finally:
        model.update(master)


# --- checkpoints ---------------------------------------------------------------------------------------

def optimizer_state(model: HybridLM, optimizers: dict) -> tuple[dict[str, mx.array], dict]:
    """Flatten optimizer states -> ({canonical tensor name: array}, JSON of groups and scalars).

    Tensors keep MLX's keys (AdamW m, v; Muon v), e.g. adamw.embed.weight.m; the step count is one per
    optimizer in MLX (torch: one per parameter), so it goes to optimizer.json with the hyper-parameters.
    """
    tensors, doc = {}, {}
    for opt_name, opt in optimizers.items():
        for key, value in tree_flatten(opt.state):
            if key not in OPTIMIZER_SCALARS:
                param, k = key.rsplit(".", 1)
                tensors[tr.optimizer_tensor_name(opt_name, param, k)] = value
        if isinstance(opt, Muon):
            group = dict(momentum=opt.momentum, nesterov=opt.nesterov, ns_steps=opt.ns_steps,
                         weight_decay=opt.decoupled_weight_decay)
        else:
            group = dict(betas=list(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                         bias_correction=opt.bias_correction)
        group = {"lr": opt.learning_rate.item(), **group}
        doc[opt_name] = {"param_groups": [{**group, "params": _param_names(model, opt_name)}],
                         "step": int(opt.step.item())}
    return tensors, doc


def load_optimizer_state(model: HybridLM, optimizers: dict, tensors: dict, doc: dict) -> None:
    """Inverse of optimizer_state: rebuild each optimizer's state tree by parameter name."""
    for opt_name, opt in optimizers.items():
        if opt_name not in doc:
            raise ckpt.CheckpointError(f"optimizer state has no {opt_name!r} entry")
        own = set(_param_names(model, opt_name))
        items = []
        for name, t in tensors.items():
            owner, param, key = tr.split_optimizer_tensor_name(name)
            if owner == opt_name:
                if param not in own:
                    raise ckpt.CheckpointError(f"optimizer tensor {name}: {param} is not trained by {opt_name}")
                items.append((f"{param}.{key}", t))
        state = tree_unflatten(items) if items else {}
        state["step"] = mx.array(doc[opt_name]["step"], dtype=mx.uint64)
        state["learning_rate"] = mx.array(doc[opt_name]["param_groups"][0]["lr"], dtype=mx.float32)
        opt.state = state  # filled in for any missing parameter on the next update


def rng_state() -> dict:
    """MLX's global PRNG key (nothing in training draws from it today; saved so that stays exact)."""
    return {"mlx": np.array(mx.random.state[0]).tolist()}


def set_rng_state(state: dict) -> None:
    key = mx.random.state[0]
    key[...] = mx.array(state["mlx"], dtype=key.dtype)  # in place: mx.random.state has no setter


def save_checkpoint(folder, model: HybridLM, optimizers: dict, state: dict, *, tokenizer: dict | None = None) -> None:
    """Write folder/ atomically: a model folder (config.json + model.safetensors) plus
    optimizer.safetensors, optimizer.json and trainer_state.json. Never pickle."""
    params = dict(tree_flatten(model.parameters()))
    weights = {n: params[n] for n in ckpt.param_shapes(model.config)}  # canonical order, like torch
    opt_tensors, opt_doc = optimizer_state(model, optimizers)
    meta = {"format": ckpt.FORMAT, "backend": BACKEND}
    with ckpt.atomic_folder(folder, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp / ckpt.WEIGHTS_FILE), weights, metadata=meta)
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, ckpt.config_document(model.config, tokenizer))
        mx.save_safetensors(str(tmp / tr.OPTIMIZER_FILE), opt_tensors, metadata=meta)
        ckpt.write_json(tmp / tr.OPTIMIZER_JSON, opt_doc)
        tr.write_trainer_state(tmp, state)


def load_checkpoint(folder, model: HybridLM, optimizers: dict) -> dict:
    """Load weights and optimizer state from a checkpoint folder into model/optimizers in place;
    returns trainer_state.json (ValueError for another backend's checkpoint)."""
    folder = Path(folder)
    state = tr.read_trainer_state(folder, BACKEND)
    _, weights = read_tensors(folder)
    model.load_arrays(weights)
    for f in (tr.OPTIMIZER_FILE, tr.OPTIMIZER_JSON):
        if not (folder / f).is_file():
            raise ckpt.CheckpointError(f"{folder / f}: missing (incomplete training checkpoint)")
    tensors = mx.load(str(folder / tr.OPTIMIZER_FILE))
    load_optimizer_state(model, optimizers, tensors, json.loads((folder / tr.OPTIMIZER_JSON).read_text()))
    return state


# --- the loop ------------------------------------------------------------------------------------------

def train(task, model_config: ModelConfig | str, train_config: TrainConfig, out_dir, *, resume: bool = False,
          progress: bool = True, max_steps: int | None = None, model: HybridLM | None = None,
          device=None) -> dict:
    """Train on `task` (Algorithm 1) and write out_dir/{metrics.jsonl, checkpoint/, model/}.

    model_config: a ModelConfig that agrees with the task's vocab_size and window, or a preset name
    (then the task's values are used). resume: continue out_dir/checkpoint exactly. max_steps: stop
    after that many optimizer steps in total without changing the schedule (which spans tc.steps).
    model: start from these weights instead of a fresh init (trained in place, as float32).
    device: None (MLX's default device), "cpu" or "gpu". Single device only.
    Returns {"step", "loss", "eval", "tokens_per_s", "wall_time", "elapsed", paths}.
    """
    tc = train_config
    mc = tr.resolve_model_config(task, model_config, {}) if isinstance(model_config, str) else model_config
    tr.check_task_config(task, mc)
    if model is not None and model.config != mc:
        raise ValueError("train(model=...): model.config differs from model_config")
    if tc.dtype == "float16":
        raise ValueError("TrainConfig.dtype='float16' is not supported for training (no loss scaling); "
                         "use 'bfloat16' or 'float32'")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("sleep_mlx.train runs on one device; for distributed training use sleep_torch.train "
                         "under torchrun")
    ckpt_dir = Path(out_dir) / tr.CHECKPOINT_DIR
    if not resume and ckpt_dir.exists():
        raise ValueError(f"{ckpt_dir} already exists; pass resume=True (--resume) to continue it "
                         "or choose another output folder")
    if device is not None and (device not in ("cpu", "gpu") or not mx.is_available(getattr(mx, device))):
        raise ValueError(f"device must be None, 'cpu' or 'gpu' (an available MLX device), got {device!r}")
    where = mx.stream(getattr(mx, device)) if device is not None else contextlib.nullcontext()
    with where:
        return _train(task, mc, tc, Path(out_dir), resume=resume, progress=progress, max_steps=max_steps,
                      model=model)


def _train(task, mc: ModelConfig, tc: TrainConfig, out_dir: Path, *, resume, progress, max_steps, model) -> dict:
    ckpt_dir, model_dir = out_dir / tr.CHECKPOINT_DIR, out_dir / tr.MODEL_DIR
    micro = tr.micro_rows(tc.batch_size, tc.grad_accum)  # [start, stop) of each micro-batch
    end = min(tc.steps, max_steps) if max_steps is not None else tc.steps

    mx.random.seed(tc.seed)
    model = model if model is not None else HybridLM(mc, seed=tc.seed)
    model.set_dtype(mx.float32)  # master weights; bf16 is a compute dtype only (compute_dtype above)
    model.checkpoint_windows = tc.checkpoint_windows
    model.set_scan_impl(tc.scan_impl)
    optimizers = build_optimizers(model, tc)

    step, elapsed_before, loss, last_eval = 0, 0.0, float("nan"), {}
    if resume:
        state = tr.read_trainer_state(ckpt_dir, BACKEND)
        tr.check_resume(state, mc, task)
        changed = tr.changed_train_fields(state, tc)
        if changed:
            print(f"warning: resuming with changed TrainConfig fields {changed}; the run will not match "
                  "an uninterrupted one", file=sys.stderr)
        load_checkpoint(ckpt_dir, model, optimizers)
        set_rng_state(state["rng"])
        step, elapsed_before = state["step"], state["elapsed"]
        loss, last_eval = state["metrics"].get("loss", loss), state["metrics"].get("eval", {})
    dtype = mx.bfloat16 if tc.dtype == "bfloat16" else None
    autocast = lambda: compute_dtype(model, dtype)  # noqa: E731
    tokenizer = task.tokenizer.to_dict()
    log = tr.MetricsLog(out_dir / tr.METRICS_FILE, step if resume else None)
    eval_batch = max(tc.batch_size // tc.grad_accum, 1)

    def loss_fn(tokens, mask, weight):
        with autocast():  # inside the differentiated function: the casts are part of the graph
            logits = model(tokens)
        s, _ = masked_loss(logits, tokens, mask)
        return s * weight, s

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def checkpoint_now(elapsed):
        doc = tr.trainer_state(backend=BACKEND, step=step, model_config=mc, train_config=tc, task=task,
                               rng=rng_state(), elapsed=elapsed, metrics={"loss": loss, "eval": last_eval})
        save_checkpoint(ckpt_dir, model, optimizers, doc, tokenizer=tokenizer)
        save(model, model_dir, overwrite=True, tokenizer=tokenizer, task={"name": task.name, "params": task.params})

    start_step, t_start = step, time.perf_counter()
    t_log, tokens_since_log = t_start, 0
    with tqdm(total=end, initial=step, desc="train", disable=not progress, dynamic_ncols=True) as bar:
        while step < end:
            factor = set_lr(optimizers, tc, step)
            batch, global_count = batch_for_step(task, tc, step)
            if global_count == 0:
                raise ValueError(f"the batch of step {step + 1} has no counted targets (loss_mask is all False)")
            tokens = mx.array(batch.tokens, dtype=mx.int32)
            mask = mx.array(batch.loss_mask)
            loss_sum, grads = mx.zeros(()), None
            for a, b in micro:
                (_, s), g = loss_and_grad(tokens[a:b], mask[a:b], 1.0 / global_count)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum = loss_sum + s
                mx.eval(grads, loss_sum)  # one micro-batch's graph at a time
            loss = loss_sum.item() / global_count
            last_good = str(ckpt_dir) if ckpt_dir.exists() else "none"
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {step + 1}; last good checkpoint: {last_good}")
            grads, norm = optim.clip_grad_norm(grads, tc.grad_clip or math.inf)
            grad_norm = norm.item()
            if not math.isfinite(grad_norm):
                raise TrainingError(f"gradient norm is {grad_norm} at step {step + 1}; "
                                    f"last good checkpoint: {last_good}")
            optimizer_step(model, optimizers, grads)
            mx.eval(model.parameters(), [opt.state for opt in optimizers.values()])
            step += 1
            tokens_since_log += batch.tokens.size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

            evaluate_now = tc.eval_interval and (step % tc.eval_interval == 0 or step == end)
            if evaluate_now:
                last_eval = evaluate(model, task, tc.eval_samples, passes=None, batch_size=eval_batch,
                                     autocast=autocast)
            if step % tc.log_interval == 0 or evaluate_now or step == end:
                now = time.perf_counter()
                record = {"step": step, "loss": loss, "lr": tc.muon_lr * factor, "lr_adamw": tc.adamw_lr * factor,
                          "grad_norm": grad_norm, "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                          "elapsed": elapsed_before + now - t_start}
                if evaluate_now:
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                log.write(record)
                t_log, tokens_since_log = now, 0
            if (tc.save_interval and step % tc.save_interval == 0) or step == end:
                checkpoint_now(elapsed_before + time.perf_counter() - t_start)
    wall = time.perf_counter() - t_start
    done_tokens = (step - start_step) * tc.batch_size * (task.seq_len or 0)
    return {"step": step, "loss": loss, "eval": last_eval, "tokens_per_s": done_tokens / max(wall, 1e-9),
            "wall_time": wall, "elapsed": elapsed_before + wall, "out_dir": str(out_dir),
            "checkpoint": str(ckpt_dir), "model": str(model_dir)}


# --- command line (the click CLI comes on top) -----------------------------------------------------

def main(argv=None) -> int:
    p = tr.train_arg_parser("python -m sleep_mlx.train", __doc__)
    p.add_argument("--device", choices=("cpu", "gpu"), help="MLX device (default: MLX's default device)")
    args = p.parse_args(argv)
    try:
        task, mc, tc = tr.run_from_args(args)
        summary = train(task, mc, tc, args.out, resume=args.resume, progress=not args.no_progress,
                        max_steps=args.max_steps, device=args.device)
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
