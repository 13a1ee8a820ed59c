"""Training (SPEC section 3): Algorithm 1 on any common task or text, with PyTorch.

    from common.tasks import make
    from common.config import TRAIN_PRESETS
    from sleep_torch.train import train
    task = make("rule110", width=8, states=2, steps=0)
    summary = train(task, "debug", TRAIN_PRESETS["debug"], "runs/r110")

    python -m sleep_torch.train --task rule110 --task-arg steps=0 --preset debug --out runs/r110
    torchrun --nproc_per_node 2 -m sleep_torch.train --task rule110 --preset debug --out runs/ddp

One optimizer step: the global batch of step s is task.sample(batch_size, data_seed(seed, s)); each
DDP rank takes a contiguous slice of it and splits that into grad_accum micro-batches. The model
runs every window and every sleep pass (model.forward) and backpropagates through all of them. The
loss is the mean cross-entropy (float32) over all counted targets of the global batch, so each
micro-batch's summed loss is weighted by 1 / (counted targets of the global batch). Then: global
grad-norm clipping, the lr schedule (common.training.lr_at), Muon on the block matrices and AdamW
on the rest. Files under out_dir: metrics.jsonl, checkpoint/ (resumable, exact) and model/.
The pieces both backends must agree on live in common/training.py; docs/TRAINING.md explains all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common import checkpoint as ckpt
from common import training as tr
from common.config import ModelConfig, TrainConfig
from common.tasks import Batch
from common.training import lr_at  # noqa: F401  (the schedule both backends share; public here too)
from sleep_torch.io import read_tensors, save
from sleep_torch.model import HybridLM

BACKEND = "torch"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message is one line."""


# --- Muon ---------------------------------------------------------------------------------------------

def zeropower_via_newtonschulz(G, steps: int = 5, dtype=torch.float32):
    """Approximately orthogonalize a matrix G [m, n] (Keller Jordan's quintic Newton-Schulz).

    Same math as mlx.optimizers.Muon: X = G / (||G||_F + 1e-7) on the wide orientation, then
    `steps` times X <- a X + (b A + c A^2) X with A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T  # (n, m): the Gram matrix X X^T is the smaller one
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: momentum, Nesterov, Newton-Schulz orthogonalization, shape-scaled lr.

        v <- momentum * v + (1 - momentum) * g
        u <- (1 - momentum) * g + momentum * v            (nesterov; else u = v)
        W <- W * (1 - lr * weight_decay)                   (decoupled)
        W <- W - lr * sqrt(max(1, rows / cols)) * NS5(u)

    Written here instead of torch.optim.Muon because that one orthogonalizes in bfloat16, which is
    slow on CPUs and differs from mlx.optimizers.Muon (float32); see docs/TRAINING.md.
    `ns_dtype` = torch.bfloat16 is fine on CUDA.
    """

    def __init__(self, params, lr: float = 2e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype=torch.float32):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon trains 2-D weights only, got a parameter of shape {list(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                v = state["momentum_buffer"]
                v.mul_(mu).add_(g, alpha=1 - mu)
                u = g * (1 - mu) + v * mu if group["nesterov"] else v
                update = zeropower_via_newtonschulz(u, group["ns_steps"], self.ns_dtype)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def build_optimizers(model: HybridLM, tc: TrainConfig, *, ns_dtype=torch.float32) -> dict[str, torch.optim.Optimizer]:
    """{"muon": block matrices, "adamw": everything else} (split by common.training.is_muon_param)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        (muon if tr.is_muon_param(name) else adamw).append(p)
    return {
        "muon": Muon(muon, lr=tc.muon_lr, momentum=tc.muon_momentum, weight_decay=tc.weight_decay,
                     ns_dtype=ns_dtype),
        "adamw": torch.optim.AdamW(adamw, lr=tc.adamw_lr, betas=tc.adam_betas, eps=1e-8,
                                   weight_decay=tc.weight_decay),
    }


def set_lr(optimizers: dict, tc: TrainConfig, step: int) -> float:
    """Apply the schedule of optimizer step `step` to both optimizers; returns the multiplier."""
    factor = lr_at(step, tc)
    peaks = {"muon": tc.muon_lr, "adamw": tc.adamw_lr}
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = peaks[name] * factor
    return factor


# --- loss and data -------------------------------------------------------------------------------------

def masked_loss(logits, tokens, loss_mask):
    """(summed float32 cross-entropy over counted targets, number of counted targets).

    logits[:, t] predicts tokens[:, t+1]; loss_mask[:, t+1] says whether that target counts.
    """
    target_mask = loss_mask[:, 1:]  # (B, T-1)
    pred = logits[:, :-1][target_mask].float()  # (count, V)
    target = tokens[:, 1:][target_mask].long()  # (count,)
    return F.cross_entropy(pred, target, reduction="sum"), int(target_mask.sum())


def batch_for_step(task, tc: TrainConfig, step: int, rank: int = 0, world: int = 1):
    """(this rank's rows of step `step`'s global batch, counted targets in the whole global batch)."""
    batch = task.sample(tc.batch_size, seed=tr.data_seed(tc.seed, step))
    global_count = int(batch.loss_mask[:, 1:].sum())
    start, stop = tr.rank_rows(tc.batch_size, rank, world)
    local = Batch(batch.tokens[start:stop], batch.loss_mask[start:stop],
                        {k: v[start:stop] for k, v in batch.meta.items()})
    return local, global_count


@torch.no_grad()
def evaluate(model: HybridLM, task, n: int, seed: int = tr.EVAL_SEED, *, passes: int | None = None,
             batch_size: int = 64, autocast=contextlib.nullcontext) -> dict:
    """Score the model on task.sample(n, seed): {"loss": mean counted cross-entropy, **task.score}."""
    batch = task.sample(n, seed)
    device = model.embed.weight.device
    tokens = torch.from_numpy(batch.tokens).to(device).long()
    mask = torch.from_numpy(batch.loss_mask).to(device)
    logits, loss_sum, count = [], 0.0, 0
    for i in range(0, n, batch_size):
        with autocast():
            out = model(tokens[i:i + batch_size], passes)
        s, c = masked_loss(out, tokens[i:i + batch_size], mask[i:i + batch_size])
        loss_sum, count = loss_sum + float(s), count + c
        logits.append(out.float().cpu().numpy())
    scores = task.score(np.concatenate(logits), batch)
    return {**scores, "loss": loss_sum / max(count, 1)}


# --- checkpoints ---------------------------------------------------------------------------------------

def _param_order(model: HybridLM, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def optimizer_state(model: HybridLM, optimizers: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten optimizer state dicts -> ({canonical tensor name: tensor}, JSON of groups and scalars)."""
    tensors, doc = {}, {}
    for opt_name, opt in optimizers.items():
        order = _param_order(model, opt)
        sd = opt.state_dict()
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
                  for g in sd["param_groups"]]
        scalars = {}
        for index, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[tr.optimizer_tensor_name(opt_name, order[index], key)] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(order[index], {})[key] = value
        doc[opt_name] = {"param_groups": groups, "scalars": scalars}
    return tensors, doc


def load_optimizer_state(model: HybridLM, optimizers: dict, tensors: dict, doc: dict) -> None:
    """Inverse of optimizer_state: rebuild each optimizer's state_dict by parameter name."""
    for opt_name, opt in optimizers.items():
        if opt_name not in doc:
            raise ckpt.CheckpointError(f"optimizer state has no {opt_name!r} entry")
        index = {name: i for i, name in enumerate(_param_order(model, opt))}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in doc[opt_name]["param_groups"]]
        state: dict[int, dict] = {}
        for name, t in tensors.items():
            owner, param, key = tr.split_optimizer_tensor_name(name)
            if owner == opt_name:
                state.setdefault(index[param], {})[key] = t
        for param, values in doc[opt_name]["scalars"].items():
            state.setdefault(index[param], {}).update(values)
        opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(device: torch.device) -> dict:
    state = {"torch_cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["torch_cuda"], dtype=torch.uint8), device)


def save_checkpoint(folder, model: HybridLM, optimizers: dict, state: dict, *, tokenizer: dict | None = None) -> None:
    """Write folder/ atomically: a model folder (config.json + model.safetensors) plus
    optimizer.safetensors, optimizer.json and trainer_state.json. Never pickle."""
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    opt_tensors, opt_doc = optimizer_state(model, optimizers)
    meta = {"format": ckpt.FORMAT, "backend": BACKEND}
    with ckpt.atomic_folder(folder, overwrite=True) as tmp:
        save_file(weights, str(tmp / ckpt.WEIGHTS_FILE), metadata=meta)
        ckpt.write_json(tmp / ckpt.CONFIG_FILE, ckpt.config_document(model.config, tokenizer))
        save_file(opt_tensors, str(tmp / tr.OPTIMIZER_FILE), metadata=meta)
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
    tensors = {n: t.to(model.embed.weight.device) for n, t in load_file(str(folder / tr.OPTIMIZER_FILE)).items()}
    load_optimizer_state(model, optimizers, tensors, json.loads((folder / tr.OPTIMIZER_JSON).read_text()))
    return state


# --- distributed ---------------------------------------------------------------------------------------

def setup_distributed(device=None) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, created_group): from an initialized process group or torchrun's env."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
    return rank, world, torch.device(device), created


# --- the loop ------------------------------------------------------------------------------------------

def train(task, model_config: ModelConfig | str, train_config: TrainConfig, out_dir, *, resume: bool = False,
          progress: bool = True, max_steps: int | None = None, model: HybridLM | None = None,
          device=None) -> dict:
    """Train on `task` (Algorithm 1) and write out_dir/{metrics.jsonl, checkpoint/, model/}.

    model_config: a ModelConfig that agrees with the task's vocab_size and window, or a preset name
    (then the task's values are used). resume: continue out_dir/checkpoint exactly. max_steps: stop
    after that many optimizer steps in total without changing the schedule (which spans tc.steps).
    model: start from these weights instead of a fresh init (trained in place). Under torchrun (or an
    initialized process group) this runs DistributedDataParallel; only rank 0 writes files.
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
    ckpt_dir = Path(out_dir) / tr.CHECKPOINT_DIR
    if not resume and ckpt_dir.exists():
        raise ValueError(f"{ckpt_dir} already exists; pass resume=True (--resume) to continue it "
                         "or choose another output folder")
    rank, world, device, created_group = setup_distributed(device)
    try:
        return _train(task, mc, tc, Path(out_dir), rank=rank, world=world, device=device, resume=resume,
                      progress=progress, max_steps=max_steps, model=model)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(task, mc: ModelConfig, tc: TrainConfig, out_dir: Path, *, rank, world, device, resume, progress,
           max_steps, model) -> dict:
    ckpt_dir, model_dir = out_dir / tr.CHECKPOINT_DIR, out_dir / tr.MODEL_DIR
    first, last = tr.rank_rows(tc.batch_size, rank, world)
    micro = tr.micro_rows(last - first, tc.grad_accum)  # [start, stop) of each micro-batch in this rank's rows
    end = min(tc.steps, max_steps) if max_steps is not None else tc.steps

    torch.manual_seed(tc.seed)
    model = (model if model is not None else HybridLM(mc, seed=tc.seed)).to(device=device, dtype=torch.float32)
    model.checkpoint_windows = tc.checkpoint_windows
    model.set_scan_impl(tc.scan_impl)
    bf16 = tc.dtype == "bfloat16"  # autocast; parameters, SSM states and the loss stay float32
    ns_dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    optimizers = build_optimizers(model, tc, ns_dtype=ns_dtype)

    step, elapsed_before, loss, last_eval = 0, 0.0, float("nan"), {}
    if resume:
        state = tr.read_trainer_state(ckpt_dir, BACKEND)
        tr.check_resume(state, mc, task)
        changed = tr.changed_train_fields(state, tc)
        if changed and rank == 0:
            print(f"warning: resuming with changed TrainConfig fields {changed}; the run will not match "
                  "an uninterrupted one", file=sys.stderr)
        load_checkpoint(ckpt_dir, model, optimizers)
        set_rng_state(state["rng"], device)
        step, elapsed_before = state["step"], state["elapsed"]
        loss, last_eval = state["metrics"].get("loss", loss), state["metrics"].get("eval", {})
    net = model  # what runs forward/backward: the model itself, or its DDP wrapper (same forward signature)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    tokenizer = task.tokenizer.to_dict()
    log = tr.MetricsLog(out_dir / tr.METRICS_FILE, step if resume else None) if rank == 0 else None
    eval_batch = max(tc.batch_size // tc.grad_accum // world, 1)

    def checkpoint_now(elapsed):
        doc = tr.trainer_state(backend=BACKEND, step=step, model_config=mc, train_config=tc, task=task,
                               rng=rng_state(device), elapsed=elapsed, metrics={"loss": loss, "eval": last_eval})
        save_checkpoint(ckpt_dir, model, optimizers, doc, tokenizer=tokenizer)
        save(model, model_dir, overwrite=True, tokenizer=tokenizer, task={"name": task.name, "params": task.params})

    start_step, t_start = step, time.perf_counter()
    t_log, tokens_since_log = t_start, 0
    with tqdm(total=end, initial=step, desc="train", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        while step < end:
            factor = set_lr(optimizers, tc, step)
            batch, global_count = batch_for_step(task, tc, step, rank, world)
            if global_count == 0:
                raise ValueError(f"the batch of step {step + 1} has no counted targets (loss_mask is all False)")
            tokens = torch.from_numpy(batch.tokens).to(device).long()
            mask = torch.from_numpy(batch.loss_mask).to(device)
            loss_sum = torch.zeros((), device=device)
            for i, (a, b) in enumerate(micro):
                # DDP averages gradients over ranks: scaling by world makes the result sum / global_count.
                sync = world == 1 or i == len(micro) - 1
                with contextlib.nullcontext() if sync else net.no_sync():
                    with autocast():
                        logits = net(tokens[a:b])
                    s, _ = masked_loss(logits, tokens[a:b], mask[a:b])
                    (s * (world / global_count)).backward()
                loss_sum += s.detach()
            if world > 1:
                dist.all_reduce(loss_sum)  # every rank sees the global loss, so all stop together on NaN
            loss = loss_sum.item() / global_count
            last_good = str(ckpt_dir) if ckpt_dir.exists() else "none"
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {step + 1}; last good checkpoint: {last_good}")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf")))
            if not math.isfinite(grad_norm):
                raise TrainingError(f"gradient norm is {grad_norm} at step {step + 1}; "
                                    f"last good checkpoint: {last_good}")
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens_since_log += batch.tokens.size * world
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

            evaluate_now = tc.eval_interval and (step % tc.eval_interval == 0 or step == end)
            if evaluate_now and rank == 0:
                last_eval = evaluate(model, task, tc.eval_samples, passes=None, batch_size=eval_batch,
                                     autocast=autocast)
            if rank == 0 and (step % tc.log_interval == 0 or evaluate_now or step == end):
                now = time.perf_counter()
                record = {"step": step, "loss": loss, "lr": tc.muon_lr * factor, "lr_adamw": tc.adamw_lr * factor,
                          "grad_norm": grad_norm, "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                          "elapsed": elapsed_before + now - t_start}
                if evaluate_now:
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                log.write(record)
                t_log, tokens_since_log = now, 0
            if rank == 0 and ((tc.save_interval and step % tc.save_interval == 0) or step == end):
                checkpoint_now(elapsed_before + time.perf_counter() - t_start)
    wall = time.perf_counter() - t_start
    done_tokens = (step - start_step) * tc.batch_size * (task.seq_len or 0)
    return {"step": step, "loss": loss, "eval": last_eval, "tokens_per_s": done_tokens / max(wall, 1e-9),
            "wall_time": wall, "elapsed": elapsed_before + wall, "out_dir": str(out_dir),
            "checkpoint": str(ckpt_dir), "model": str(model_dir)}


# --- command line (torchrun launches this; the click CLI comes on top) ------------------------------

def main(argv=None) -> int:
    p = tr.train_arg_parser("python -m sleep_torch.train", __doc__)
    args = p.parse_args(argv)
    try:
        task, mc, tc = tr.run_from_args(args)
        summary = train(task, mc, tc, args.out, resume=args.resume, progress=not args.no_progress,
                        max_steps=args.max_steps)
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
