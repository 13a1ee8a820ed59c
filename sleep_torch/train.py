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
on the rest (`train_step`, which `lmsleep bench train` times too). Files under out_dir: metrics.jsonl,
checkpoint/ (resumable, exact; convert/ makes it resumable by the MLX trainer) and model/.
This file holds the framework code only; the loop and its bookkeeping (data of each step, cadence,
resume, files) are common/training.py's, shared with sleep_mlx/train.py. docs/TRAINING.md explains all.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import checkpoint as ckpt
from common import training as tr
from common.config import ModelConfig, TrainConfig
from common.tasks import Batch
from common.training import TrainingError, lr_at  # noqa: F401  (shared by both backends; public here too)
from sleep_torch.io import load, read_tensors, save
from sleep_torch.model import HybridLM

BACKEND = "torch"
# shared optimizer-state key (common.training.OPTIMIZER_STATE) -> this backend's state key
STATE_KEYS = {"muon": {"momentum": "momentum_buffer"}, "adamw": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}}
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # TrainConfig.dtype -> autocast dtype


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
                    state["momentum_buffer"], state["step"] = torch.zeros_like(g), 0
                state["step"] += 1  # not used by the update; kept so the checkpoint says how far Muon is
                v = state["momentum_buffer"]
                v.mul_(mu).add_(g, alpha=1 - mu)
                u = g * (1 - mu) + v * mu if group["nesterov"] else v
                update = zeropower_via_newtonschulz(u, group["ns_steps"], self.ns_dtype)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def build_optimizers(model: HybridLM, tc: TrainConfig, *, ns_dtype=torch.float32) -> dict[str, torch.optim.Optimizer]:
    """{"muon": block matrices, "adamw": everything else} (split by common.training.is_muon_param),
    over the parameters that require grad (freeze: `set_trainable`)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen parameters (requires_grad False) get no optimizer and no state
            (muon if tr.is_muon_param(name) else adamw).append(p)
    return {
        "muon": Muon(muon, lr=tc.muon_lr, momentum=tc.muon_momentum, weight_decay=tc.weight_decay,
                     ns_dtype=ns_dtype),
        "adamw": torch.optim.AdamW(adamw, lr=tc.adamw_lr, betas=tc.adam_betas, eps=1e-8,
                                   weight_decay=tc.weight_decay),
    }


def set_trainable(model: HybridLM, trainable) -> None:
    """Freeze every parameter not in `trainable` (canonical names; None: all train)."""
    keep = None if trainable is None else set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(keep is None or name in keep)


def trainable_names(model: HybridLM) -> list[str] | None:
    """The canonical names that train (None when nothing is frozen)."""
    params = list(model.named_parameters())
    names = [n for n, p in params if p.requires_grad]
    return None if len(names) == len(params) else names


def set_lr(optimizers: dict, tc: TrainConfig, step: int) -> float:
    """Apply the schedule of optimizer step `step` to both optimizers; returns the multiplier."""
    factor, lrs = tr.scheduled_lrs(tc, step)
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = lrs[name]
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


def compute_dtype(model: HybridLM, dtype=None):
    """Context for the forward: autocast to `dtype` on the model's device (None: float32 as it is).
    Parameters, SSM states and the loss stay float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model.embed.weight.device.type, dtype=dtype)


def train_step(model, optimizers: dict, batch: Batch, tc: TrainConfig, step: int, *,
               global_count: int | None = None) -> tr.StepResult:
    """One optimizer step (0-based `step`) on `batch` (numpy rows; this rank's under DDP).

    lr of the step (lr_at), forward + backward of every micro-batch (tc.grad_accum of them), summed
    loss over the global batch's `global_count` counted targets (default: the batch's own), NaN
    check, global grad-norm clipping, Muon and AdamW. `model`: a HybridLM or its
    DistributedDataParallel wrapper (then gradients and the loss are averaged over the ranks).
    Raises TrainingError before the update when the loss or the gradient norm is not finite.
    """
    net = model  # what runs forward/backward: the model itself, or its DDP wrapper (same forward signature)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    model, world = (model.module, dist.get_world_size()) if ddp else (model, 1)
    device = model.embed.weight.device
    factor = set_lr(optimizers, tc, step)
    count = tr.counted_targets(batch) if global_count is None else global_count
    t0 = time.perf_counter()
    tokens = torch.from_numpy(batch.tokens).to(device).long()
    mask = torch.from_numpy(batch.loss_mask).to(device)
    micro = tr.micro_rows(len(tokens), tc.grad_accum)
    loss_sum = torch.zeros((), device=device)
    for i, (a, b) in enumerate(micro):
        # DDP averages gradients over ranks: scaling by world makes the result sum / count.
        sync = not ddp or i == len(micro) - 1
        with contextlib.nullcontext() if sync else net.no_sync():
            with compute_dtype(model, COMPUTE_DTYPES[tc.dtype]):
                logits = net(tokens[a:b])
            s, _ = masked_loss(logits, tokens[a:b], mask[a:b])
            (s * (world / count)).backward()
        loss_sum += s.detach()
    if ddp:
        dist.all_reduce(loss_sum)  # every rank sees the global loss, so all stop together on NaN
    loss = loss_sum.item() / count  # waits for the backward
    t1 = time.perf_counter()
    tr.check_finite("loss", loss, step)
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, tc.grad_clip or float("inf")))
    tr.check_finite("gradient norm", grad_norm, step)
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tr.StepResult(loss, grad_norm, factor, t1 - t0, time.perf_counter() - t1)


@torch.no_grad()
def evaluate(model: HybridLM, task, n: int, seed: int = tr.EVAL_SEED, *, passes: int | None = None,
             batch_size: int = 64, autocast=contextlib.nullcontext) -> dict:
    """Score the model on task.sample(n, seed): {"loss": mean counted cross-entropy, **task.score}."""
    device = model.embed.weight.device

    def score(tokens, loss_mask):
        tokens, mask = torch.from_numpy(tokens).to(device).long(), torch.from_numpy(loss_mask).to(device)
        with autocast():
            out = model(tokens, passes)
        s, c = masked_loss(out, tokens, mask)
        return out.float().cpu().numpy(), float(s), c

    return tr.evaluate_batches(task, n, seed, batch_size, score)


# --- checkpoints ---------------------------------------------------------------------------------------

def optimizer_state(model: HybridLM, optimizers: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizers' state in the layout both backends share (common.training.OPTIMIZER_STATE):
    ({"adamw.{param}.exp_avg" | ".exp_avg_sq" | "muon.{param}.momentum": tensor}, optimizer.json)."""
    names = {p: n for n, p in model.named_parameters()}
    tensors, steps = {}, {}
    for opt_name, opt in optimizers.items():
        counts = set()
        for p, state in opt.state.items():
            for key, own in STATE_KEYS[opt_name].items():
                tensors[tr.optimizer_tensor_name(opt_name, names[p], key)] = state[own].detach().cpu().contiguous()
            counts.add(int(state["step"]))  # torch counts per parameter; every parameter steps every time
        assert len(counts) <= 1, f"{opt_name}: parameters at different steps {sorted(counts)}"
        steps[opt_name] = counts.pop() if counts else 0
    return tensors, tr.optimizer_document(model.config, steps, trainable_names(model))


def load_optimizer_state(model: HybridLM, optimizers: dict, tensors: dict, doc: dict) -> None:
    """Inverse of optimizer_state (checked with common.training.check_optimizer_state first)."""
    tr.check_optimizer_state(model.config, {n: tuple(t.shape) for n, t in tensors.items()}, doc, tr.OPTIMIZER_FILE,
                             trainable_names(model))
    params = dict(model.named_parameters())
    for opt_name, opt in optimizers.items():
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        step, state = doc[opt_name]["step"], {}
        for name in doc[opt_name]["params"] if step else []:
            entry = {own: tensors[tr.optimizer_tensor_name(opt_name, name, key)]
                     for key, own in STATE_KEYS[opt_name].items()}
            entry["step"] = torch.tensor(float(step)) if opt_name == "adamw" else step  # AdamW keeps a tensor
            state[index[id(params[name])]] = entry
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def rng_state(device: torch.device) -> dict:
    state = {"torch_cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state(); a converted MLX checkpoint has none (the generators stay as seeded)."""
    if "torch_cpu" in state:
        torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["torch_cuda"], dtype=torch.uint8), device)


def save_checkpoint(folder, model: HybridLM, optimizers: dict, state: dict, *, tokenizer: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write a training checkpoint folder (common.training.write_checkpoint) from model and optimizers.
    With a "base" in `extra` (frozen weights that live in the init folder) only the trained tensors are
    written; the companion files (tokenizer.json, chat template) come from model.tokenizer / chat_template."""
    extra = extra or {}
    keep = trainable_names(model) if tr.BASE_KEY in extra else None
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if keep is None or n in keep}
    opt_tensors, opt_doc = optimizer_state(model, optimizers)
    tr.write_checkpoint(folder, BACKEND, model.config, tokenizer, state, weights, opt_tensors, opt_doc,
                        lambda path, tensors, meta: save_file(tensors, str(path), metadata=meta),
                        files=ckpt.companion_files(model.tokenizer, model.chat_template), extra=extra)


def load_checkpoint(folder, model: HybridLM, optimizers: dict) -> dict:
    """Load a training checkpoint into model and optimizers in place; returns trainer_state.json
    (ValueError for another backend's checkpoint: convert/ converts it). A checkpoint of frozen-base
    training holds the trained tensors only: the others stay as the model holds them (the init folder's,
    checked by common.training.check_base on resume)."""
    state, opt_doc = tr.read_checkpoint(folder, BACKEND)
    saved = tr.frozen_base_weights(folder, model.config, trainable_names(model), lambda path: load_file(str(path)))
    current = {n: p.detach() for n, p in model.named_parameters()} if saved is not None else None
    model.load_arrays(read_tensors(folder)[1] if saved is None else {**current, **saved})
    tensors = {n: t.to(model.embed.weight.device) for n, t in load_file(str(Path(folder) / tr.OPTIMIZER_FILE)).items()}
    load_optimizer_state(model, optimizers, tensors, opt_doc)
    return state


def peak_memory(device=None) -> int:
    """Peak memory in bytes: allocated on CUDA (torch.cuda.max_memory_allocated), else the process's RSS."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return torch.cuda.max_memory_allocated(device) if cuda else tr.peak_rss_bytes()


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

def train(task, model_config: ModelConfig | str | None, train_config: TrainConfig, out_dir, *, resume: bool = False,
          progress: bool = True, max_steps: int | None = None, model: HybridLM | None = None,
          device=None, init=None) -> dict:
    """Train on `task` (Algorithm 1) and write out_dir/{metrics.jsonl, checkpoint/, model/}.

    model_config: a ModelConfig that agrees with the task's vocab_size and window, or a preset name
    (then the task's values are used). resume: continue out_dir/checkpoint exactly. max_steps: stop
    after that many optimizer steps in total without changing the schedule (which spans tc.steps).
    model: start from these weights instead of a fresh init (trained in place). init: a model folder to
    fine-tune (its weights, tokenizer and chat template; model_config None = its config with the task's
    window); train_config.freeze keeps some of its weights fixed (docs/TRAINING.md "Fine-tuning").
    Under torchrun (or an initialized process group) this runs DistributedDataParallel; only rank 0
    writes files. Returns {"step", "loss", "eval", "tokens_per_s", "peak_mem_mib", "wall_time", "elapsed", paths}.
    """
    tc = train_config
    mc, ft = tr.prepare_run(task, model_config, tc, out_dir, resume=resume, model=model, init=init)
    rank, world, device, created_group = setup_distributed(device)
    try:
        return _train(task, mc, tc, Path(out_dir), rank=rank, world=world, device=device, resume=resume,
                      progress=progress, max_steps=max_steps, model=model, ft=ft)
    finally:
        if created_group:
            dist.destroy_process_group()


def init_model(mc: ModelConfig, ft: tr.FineTune) -> HybridLM:
    """The init folder's model with config `mc` (same weights; runtime fields such as window may differ)."""
    loaded = load(ft.folder)
    if loaded.config == mc:
        return loaded
    model = HybridLM(mc, seed=None)
    model.load_arrays({n: p.detach().float() for n, p in loaded.named_parameters()})
    model.tokenizer, model.chat_template = loaded.tokenizer, loaded.chat_template
    return model


def _train(task, mc: ModelConfig, tc: TrainConfig, out_dir: Path, *, rank, world, device, resume, progress,
           max_steps, model, ft) -> dict:
    torch.manual_seed(tc.seed)
    if model is None:
        model = init_model(mc, ft) if ft is not None else HybridLM(mc, seed=tc.seed)
    model = model.to(device=device, dtype=torch.float32)
    model.checkpoint_windows = tc.checkpoint_windows
    model.set_scan_impl(tc.scan_impl)
    if getattr(model, "tokenizer", None) is None and hasattr(task.tokenizer, "to_json"):
        model.tokenizer = task.tokenizer  # a pretrained tokenizer's tokenizer.json goes with the folders
    set_trainable(model, ft.trainable if ft is not None else None)
    bf16 = COMPUTE_DTYPES[tc.dtype] is not None
    optimizers = build_optimizers(model, tc, ns_dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32)
    start = None
    if resume:
        start = tr.resume_state(out_dir, BACKEND, mc, task, tc, announce=rank == 0, ft=ft)
        load_checkpoint(out_dir / tr.CHECKPOINT_DIR, model, optimizers)
        set_rng_state(start["rng"], device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eval_batch = max(tc.batch_size // tc.grad_accum // world, 1)
    extra = tr.checkpoint_extra(ft)
    ckpt_extra = {**extra, tr.BASE_KEY: ft.base} if ft is not None and ft.base is not None else extra
    tokenizer = model.tokenizer.to_dict() if ft is not None and model.tokenizer is not None else None
    return tr.run_loop(
        task, mc, tc, out_dir, backend=BACKEND, start=start, rank=rank, world=world, progress=progress,
        max_steps=max_steps, step=lambda s, batch, count: train_step(net, optimizers, batch, tc, s, global_count=count),
        evaluate=lambda: evaluate(model, task, tc.eval_samples, batch_size=eval_batch,
                                  autocast=lambda: compute_dtype(model, COMPUTE_DTYPES[tc.dtype])),
        save_checkpoint=lambda folder, doc, **files: save_checkpoint(folder, model, optimizers, doc, extra=ckpt_extra,
                                                                     **files),
        save_model=lambda folder, **files: save(model, folder, overwrite=True, **files, **extra),
        rng=lambda: rng_state(device), tokenizer=tokenizer, memory=lambda: peak_memory(device))


# --- command line (torchrun launches this; the click CLI comes on top) ------------------------------

def main(argv=None) -> int:
    return tr.main(train, "python -m sleep_torch.train", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
