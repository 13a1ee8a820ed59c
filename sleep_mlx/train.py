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
torch trainer's decoupled weight decay): `train_step`, which `lmsleep bench train` times too. Files
under out_dir: metrics.jsonl, checkpoint/ (resumable, exact; the torch trainer's layout, optimizer
state included, so convert/ makes it resumable by torch) and model/. One device, no distributed
training (mx.distributed is out of scope: use sleep_torch.train under torchrun). This file holds the
framework code only; the loop and its bookkeeping are common/training.py's. docs/TRAINING.md explains all.
"""

from __future__ import annotations

import contextlib
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

from common import checkpoint as ckpt
from common import training as tr
from common.config import ModelConfig, TrainConfig
from common.tasks import Batch
from common.training import TrainingError, lr_at  # noqa: F401  (shared by both backends; public here too)
from sleep_mlx.io import load, read_tensors, save
from sleep_mlx.model import HybridLM

BACKEND = "mlx"
# shared optimizer-state key (common.training.OPTIMIZER_STATE) -> this backend's state key
STATE_KEYS = {"muon": {"momentum": "v"}, "adamw": {"exp_avg": "m", "exp_avg_sq": "v"}}
COMPUTE_DTYPES = {"float32": None, "bfloat16": mx.bfloat16}  # TrainConfig.dtype -> compute dtype


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


def set_trainable(model: HybridLM, trainable) -> None:
    """Freeze every parameter not in `trainable` (canonical names; None: all train): model.freeze(),
    then unfreeze the trained ones, so that value_and_grad and the optimizers see only those."""
    model.unfreeze()
    if trainable is None:
        return
    model.freeze()
    for name in trainable:
        *path, leaf = name.split(".")
        module = model
        for part in path:  # "layers.3.ssm.o_proj": lists take the index
            module = module[int(part)] if isinstance(module, list) else getattr(module, part)
        module.unfreeze(recurse=False, keys=[leaf])


def trainable_names(model: HybridLM) -> list[str] | None:
    """The canonical names that train (None when nothing is frozen)."""
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    return None if len(names) == len(tree_flatten(model.parameters())) else names


def set_lr(optimizers: dict, tc: TrainConfig, step: int) -> float:
    """Apply the schedule of optimizer step `step` to both optimizers; returns the multiplier."""
    factor, lrs = tr.scheduled_lrs(tc, step)
    for name, opt in optimizers.items():
        opt.learning_rate = lrs[name]
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


def evaluate(model: HybridLM, task, n: int, seed: int = tr.EVAL_SEED, *, passes: int | None = None,
             batch_size: int = 64, autocast=contextlib.nullcontext) -> dict:
    """Score the model on task.sample(n, seed): {"loss": mean counted cross-entropy, **task.score}."""
    def score(tokens, loss_mask):
        tokens, mask = mx.array(tokens, dtype=mx.int32), mx.array(loss_mask)
        with autocast():
            out = model(tokens, passes)
        s, c = masked_loss(out, tokens, mask)
        return np.array(out.astype(mx.float32)), s.item(), c

    return tr.evaluate_batches(task, n, seed, batch_size, score)


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


# --- one optimizer step --------------------------------------------------------------------------------

def train_step(model, optimizers: dict, batch: Batch, tc: TrainConfig, step: int, *,
               global_count: int | None = None) -> tr.StepResult:
    """One optimizer step (0-based `step`) on `batch` (numpy rows).

    lr of the step (lr_at), value_and_grad of every micro-batch (tc.grad_accum of them) with the
    gradient trees added up, summed loss over the global batch's `global_count` counted targets
    (default: the batch's own), NaN check, global grad-norm clipping, Muon and AdamW. `model`: a
    HybridLM (one device). Raises TrainingError before the update when the loss or the gradient
    norm is not finite.
    """
    factor = set_lr(optimizers, tc, step)
    count = tr.counted_targets(batch) if global_count is None else global_count
    weight = 1.0 / count
    t0 = time.perf_counter()
    tokens = mx.array(batch.tokens, dtype=mx.int32)
    mask = mx.array(batch.loss_mask)

    def loss_fn(tokens, mask):
        with compute_dtype(model, COMPUTE_DTYPES[tc.dtype]):  # inside: the casts are part of the graph
            logits = model(tokens)
        s, _ = masked_loss(logits, tokens, mask)
        return s * weight, s

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    loss_sum, grads = mx.zeros(()), None
    for a, b in tr.micro_rows(len(batch.tokens), tc.grad_accum):
        (_, s), g = loss_and_grad(tokens[a:b], mask[a:b])
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum = loss_sum + s
        mx.eval(grads, loss_sum)  # one micro-batch's graph at a time
    loss = loss_sum.item() / count  # waits for the last micro-batch
    t1 = time.perf_counter()
    tr.check_finite("loss", loss, step)
    grads, norm = optim.clip_grad_norm(grads, tc.grad_clip or math.inf)
    grad_norm = norm.item()
    tr.check_finite("gradient norm", grad_norm, step)
    optimizer_step(model, optimizers, grads)
    mx.eval(model.parameters(), [opt.state for opt in optimizers.values()])
    return tr.StepResult(loss, grad_norm, factor, t1 - t0, time.perf_counter() - t1)


# --- checkpoints ---------------------------------------------------------------------------------------

def optimizer_state(model: HybridLM, optimizers: dict) -> tuple[dict[str, mx.array], dict]:
    """The optimizers' state in the layout both backends share (common.training.OPTIMIZER_STATE):
    ({"adamw.{param}.exp_avg" | ".exp_avg_sq" | "muon.{param}.momentum": array}, optimizer.json).
    MLX counts steps per optimizer (torch: per parameter); optimizer.json holds that count."""
    tensors, steps = {}, {}
    for opt_name, opt in optimizers.items():
        state = dict(tree_flatten(opt.state))
        for name in _param_names(model, opt_name):
            for key, own in STATE_KEYS[opt_name].items():
                if f"{name}.{own}" in state:
                    tensors[tr.optimizer_tensor_name(opt_name, name, key)] = state[f"{name}.{own}"]
        steps[opt_name] = int(opt.step.item())
    return tensors, tr.optimizer_document(model.config, steps, trainable_names(model))


def load_optimizer_state(model: HybridLM, optimizers: dict, tensors: dict, doc: dict) -> None:
    """Inverse of optimizer_state (checked with common.training.check_optimizer_state first)."""
    tr.check_optimizer_state(model.config, {n: tuple(t.shape) for n, t in tensors.items()}, doc, tr.OPTIMIZER_FILE,
                             trainable_names(model))
    for opt_name, opt in optimizers.items():
        step = doc[opt_name]["step"]
        items = [(f"{name}.{own}", tensors[tr.optimizer_tensor_name(opt_name, name, key)])
                 for name in (doc[opt_name]["params"] if step else []) for key, own in STATE_KEYS[opt_name].items()]
        state = tree_unflatten(items) if items else {}
        state["step"] = mx.array(step, dtype=mx.uint64)
        state["learning_rate"] = opt.learning_rate  # set again by set_lr before every step
        opt.state = state  # filled in for any missing parameter on the next update


def rng_state() -> dict:
    """MLX's global PRNG key (nothing in training draws from it today; saved so that stays exact)."""
    return {"mlx": np.array(mx.random.state[0]).tolist()}


def set_rng_state(state: dict) -> None:
    """Restore rng_state(); a converted torch checkpoint has none (the key stays as seeded)."""
    if "mlx" not in state:
        return
    key = mx.random.state[0]
    key[...] = mx.array(state["mlx"], dtype=key.dtype)  # in place: mx.random.state has no setter


def save_checkpoint(folder, model: HybridLM, optimizers: dict, state: dict, *, tokenizer: dict | None = None,
                    extra: dict | None = None) -> None:
    """sleep_torch.train.save_checkpoint in MLX: the weights in canonical order (only the trained ones
    when `extra` names a frozen "base"), the optimizer state, then common.training.write_checkpoint."""
    extra = extra or {}
    keep = trainable_names(model) if tr.BASE_KEY in extra else None
    params = dict(tree_flatten(model.parameters()))
    weights = {n: params[n] for n in ckpt.param_shapes(model.config) if keep is None or n in keep}  # canonical order
    opt_tensors, opt_doc = optimizer_state(model, optimizers)
    tr.write_checkpoint(folder, BACKEND, model.config, tokenizer, state, weights, opt_tensors, opt_doc,
                        lambda path, arrays, meta: mx.save_safetensors(str(path), arrays, metadata=meta),
                        files=ckpt.companion_files(model.tokenizer, model.chat_template), extra=extra)


def load_checkpoint(folder, model: HybridLM, optimizers: dict) -> dict:
    """sleep_torch.train.load_checkpoint in MLX: weights (a frozen-base checkpoint's trained tensors over
    the model's own), optimizer state; returns trainer_state.json."""
    state, opt_doc = tr.read_checkpoint(folder, BACKEND)
    saved = tr.frozen_base_weights(folder, model.config, trainable_names(model), lambda path: mx.load(str(path)))
    model.load_arrays(read_tensors(folder)[1] if saved is None else {**dict(tree_flatten(model.parameters())), **saved})
    load_optimizer_state(model, optimizers, mx.load(str(Path(folder) / tr.OPTIMIZER_FILE)), opt_doc)
    return state


def peak_memory(device=None) -> int:
    """Peak memory in bytes: on a GPU MLX's own count (mx.get_peak_memory: Metal buffers, which the RSS
    misses), on the CPU the process's RSS (as torch reports it there). device: None (the default), "cpu", "gpu"."""
    gpu = (device or ("gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu")) == "gpu"
    peak = mx.get_peak_memory() if gpu and hasattr(mx, "get_peak_memory") else 0
    return peak or tr.peak_rss_bytes()


# --- the loop ------------------------------------------------------------------------------------------

def train(task, model_config: ModelConfig | str | None, train_config: TrainConfig, out_dir, *, resume: bool = False,
          progress: bool = True, max_steps: int | None = None, model: HybridLM | None = None,
          device=None, init=None) -> dict:
    """sleep_torch.train.train with MLX: the same arguments, files and numbers (see there), on one
    device: `device` None (MLX's default device), "cpu" or "gpu"; `model` is trained in place as float32;
    `init` a model folder to fine-tune (train_config.freeze: what stays fixed)."""
    tc = train_config
    mc, ft = tr.prepare_run(task, model_config, tc, out_dir, resume=resume, model=model, init=init)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("sleep_mlx.train runs on one device; for distributed training use sleep_torch.train "
                         "under torchrun")
    if device is not None and (device not in ("cpu", "gpu") or not mx.is_available(getattr(mx, device))):
        raise ValueError(f"device must be None, 'cpu' or 'gpu' (an available MLX device), got {device!r}")
    where = mx.stream(getattr(mx, device)) if device is not None else contextlib.nullcontext()
    with where:
        return _train(task, mc, tc, Path(out_dir), resume=resume, progress=progress, max_steps=max_steps,
                      model=model, ft=ft)


def init_model(mc: ModelConfig, ft: tr.FineTune) -> HybridLM:
    """The init folder's model with config `mc` (same weights; runtime fields such as window may differ)."""
    loaded = load(ft.folder)
    if loaded.config == mc:
        return loaded
    model = HybridLM(mc, seed=None)
    model.load_arrays({n: p.astype(mx.float32) for n, p in tree_flatten(loaded.parameters())})
    model.tokenizer, model.chat_template = loaded.tokenizer, loaded.chat_template
    return model


def _train(task, mc: ModelConfig, tc: TrainConfig, out_dir: Path, *, resume, progress, max_steps, model, ft) -> dict:
    mx.random.seed(tc.seed)
    if model is None:
        model = init_model(mc, ft) if ft is not None else HybridLM(mc, seed=tc.seed)
    model.set_dtype(mx.float32)  # master weights; bf16 is a compute dtype only (compute_dtype above)
    model.checkpoint_windows = tc.checkpoint_windows
    model.set_scan_impl(tc.scan_impl)
    if getattr(model, "tokenizer", None) is None and hasattr(task.tokenizer, "to_json"):
        model.tokenizer = task.tokenizer  # a pretrained tokenizer's tokenizer.json goes with the folders
    set_trainable(model, ft.trainable if ft is not None else None)
    optimizers = build_optimizers(model, tc)
    start = None
    if resume:
        start = tr.resume_state(out_dir, BACKEND, mc, task, tc, ft=ft)
        load_checkpoint(out_dir / tr.CHECKPOINT_DIR, model, optimizers)
        set_rng_state(start["rng"])
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()
    eval_batch = max(tc.batch_size // tc.grad_accum, 1)
    extra = tr.checkpoint_extra(ft)
    ckpt_extra = {**extra, tr.BASE_KEY: ft.base} if ft is not None and ft.base is not None else extra
    tokenizer = model.tokenizer.to_dict() if ft is not None and model.tokenizer is not None else None
    return tr.run_loop(
        task, mc, tc, out_dir, backend=BACKEND, start=start, progress=progress, max_steps=max_steps,
        step=lambda s, batch, count: train_step(model, optimizers, batch, tc, s, global_count=count),
        evaluate=lambda: evaluate(model, task, tc.eval_samples, batch_size=eval_batch,
                                  autocast=lambda: compute_dtype(model, COMPUTE_DTYPES[tc.dtype])),
        save_checkpoint=lambda folder, doc, **files: save_checkpoint(folder, model, optimizers, doc, extra=ckpt_extra,
                                                                     **files),
        save_model=lambda folder, **files: save(model, folder, overwrite=True, **files, **extra), rng=rng_state,
        tokenizer=tokenizer, memory=peak_memory)


# --- command line (the click CLI comes on top) -----------------------------------------------------

def main(argv=None) -> int:
    return tr.main(train, "python -m sleep_mlx.train", __doc__, argv, devices=("cpu", "gpu"))


if __name__ == "__main__":
    sys.exit(main())
