"""The paper-scale retrofit recipe for a GPU (PAPER.md: Jet-Nemotron-2B from Qwen2.5-1.5B, looping its middle 14
of 28 layers, fine-tuned on GSM-Infinite under hard eviction, L = 2000), as `lmsleep` commands.

    python -m experiments.gpu.recipe                         # print the commands (qwen2.5-1.5b, 1 GPU)
    python -m experiments.gpu.recipe --profile smollm2-1.7b --gpus 8 --micro 2
    python -m experiments.gpu.recipe --estimate              # memory and time per GPU for every N
    python -m experiments.gpu.recipe --dry-run               # validate all, then run the tiny profile (1 step, CPU)
    python -m experiments.gpu.recipe --run [--root runs/gpu] # run them (resumable: train --resume)

The recipe: retrofit the source with `--window 2000 --loop 7:21` (hard eviction; one SSM block in front of
every other looped layer: 7 for Qwen's 28 layers); then for each N in {1, 2, 4}, `lmsleep train --init` on
gsm-infinite (medium subset, 2..8 operations, problems of 2000..3300 tokens in the model's own tokens, so the
question always lies in the evicted first window) with the `retrofit` preset's optimizer (Muon 1e-3 for
the block matrices, AdamW 5e-5 for the rest), nothing frozen (the paper and McLeish et al. fine-tune the
whole model; `--freeze base` is the cheap variant), batch 256 accumulated from micro-batches, bf16
autocast with float32 masters, each window recomputed in backward, 300 steps; finally `lmsleep
sleep-eval` per op count (whole-context upper bound, untrained lower bound, every trained N at 1, 2, 4).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = "runs/gpu"


@dataclass(frozen=True)
class Profile:
    source: str  # retrofit SRC: Hub id, HF folder, GGUF or bundled name
    hf_config: dict  # the source's config.json (public numbers): plans the retrofit without downloading it
    loop: str | None  # looped source layers a:b (None: the retrofit's default middle half)
    window: int = 2000  # L
    length: tuple[int, int] = (2000, 3300)  # problem length in the model's tokens (T = length[1])
    subset: str = "medium"
    ops: tuple[int, int] = (2, 8)
    passes: tuple[int, ...] = (1, 2, 4)
    steps: int = 300
    batch: int = 256
    micro: int = 1  # sequences per GPU per micro-batch
    freeze: str = "none"
    dtype: str = "bfloat16"
    eval_samples: int = 8  # in-training evaluation (the trainer keeps n x T x V logits: keep it small)
    eval_n: int = 512  # final sleep-eval examples, scored eval_batch at a time (predictions only)
    eval_batch: int = 4
    sets: dict = field(default_factory=dict)  # extra --set overrides


QWEN25_15B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False,
              "max_window_layers": 28, "sliding_window": 131072, "max_position_embeddings": 131072}
SMOLLM2_17B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
               "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 130000.0,
               "vocab_size": 49152, "tie_word_embeddings": True, "hidden_act": "silu", "max_position_embeddings": 8192}
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                "vocab_size": 49152, "tie_word_embeddings": True, "hidden_act": "silu", "max_position_embeddings": 8192}
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "vocab_size": 258, "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False,
        "max_position_embeddings": 4096, "bos_token_id": 256, "eos_token_id": 257}

PROFILES = {
    "qwen2.5-1.5b": Profile("Qwen/Qwen2.5-1.5B", QWEN25_15B, "7:21"),  # Jet-Nemotron's source and loop
    "smollm2-1.7b": Profile("HuggingFaceTB/SmolLM2-1.7B", SMOLLM2_17B, "6:18"),
    # Calibration on a lent GPU (benchmarks/gpu.sh; no Hub access there): the bundled SmolLM2-135M with the recipe's
    # exact sequence, window and flags, 2 steps of 8 sequences at N = 1 and 4: peak CUDA memory and s/step.
    "smollm2-135m": Profile("smollm2-135m-instruct", SMOLLM2_135M, None, passes=(1, 4), steps=2, batch=8,
                            eval_samples=4, eval_n=16),
    # The dry run: a random Qwen2-shaped model of 4 layers with a byte-level BPE without merges (256 bytes + 2
    # specials), every flag the same except the sizes; float32 on a CPU (bf16 autocast is what a GPU runs).
    "tiny": Profile("", TINY, "1:3", window=256, length=(384, 512), ops=(2, 3), passes=(1, 2), steps=1, batch=4,
                    micro=2,
                    dtype="float32", eval_samples=2, eval_n=4, eval_batch=2),
}


def task_args(p: Profile, root: str, *, tokenizer: bool = True) -> dict:
    args = {"subset": p.subset, "ops": list(p.ops), "length": list(p.length), "window": p.window}
    return {**args, "tokenizer_dir": f"{root}/retrofit"} if tokenizer else args


def arg(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def task_argv(p: Profile, root: str) -> list[str]:
    pairs = task_args(p, root)
    return [a for k, v in pairs.items() for a in ("--task-arg", f"{k}={arg(v)}")]


def train_sets(p: Profile, gpus: int) -> dict:
    if p.batch % (p.micro * gpus):
        raise ValueError(f"batch {p.batch} is not a multiple of micro-batch {p.micro} x {gpus} GPUs")
    return {"batch_size": p.batch, "grad_accum": p.batch // (p.micro * gpus), "muon_lr": 1e-3, "adamw_lr": 5e-5,
            "warmup_steps": min(20, p.steps), "dtype": p.dtype, "checkpoint_windows": True, "grad_clip": 1.0,
            "eval_interval": 50, "eval_samples": p.eval_samples, "save_interval": 10, "log_interval": 1, "seed": 0,
            **p.sets}


def commands(p: Profile, root: str = ROOT, gpus: int = 1, source: str | None = None) -> list[tuple[str, list[str]]]:
    """(name, lmsleep argv) in order: retrofit, one training per N, sleep-eval."""
    out = [("retrofit", ["retrofit", source or p.source, f"{root}/retrofit", "--window", str(p.window)]
            + (["--loop", p.loop] if p.loop else []) + ["--passes", "1", "--backend", "torch"])]
    for n in p.passes:
        argv = ["train", "--init", f"{root}/retrofit", "--freeze", p.freeze, "--preset", "retrofit",
                "--task", "gsm-infinite", *task_argv(p, root), "--passes", str(n), "--steps", str(p.steps)]
        argv += [a for k, v in train_sets(p, gpus).items() for a in ("--set", f"{k}={arg(v)}")]
        argv += ["--nproc", str(gpus)] * (gpus > 1) + ["--out", f"{root}/n{n}", "--resume", "--quiet"]
        out.append((f"n{n}", argv))
    ev = ["sleep-eval", "--task", "gsm-infinite", *task_argv(p, root), "--retrofit", f"{root}/retrofit"]
    ev += [a for n in p.passes for a in ("--trained", f"{root}/n{n}/model")]
    ev += [a for n in p.passes for a in ("--passes", str(n))]
    ev += ["--n", str(p.eval_n), "--eval-batch", str(p.eval_batch), "--whole-trained",
           "--json", f"{root}/sleep_eval.json",
           "--plot", f"{root}/sleep_eval.png"]
    return out + [("sleep-eval", ev)]


def shell(argv: list[str]) -> str:
    return "lmsleep " + " ".join(shlex.quote(a) for a in argv)


# --- validation (no download, no GPU) --------------------------------------------------------------------

def plan_of(p: Profile):
    """The retrofit's plan from the source's config numbers: ModelConfig and parameter counts."""
    from common.pretrained import from_hf_config
    from common.retrofit import parameter_counts, plan

    pl = plan(from_hf_config(p.hf_config), loop=p.loop, window=p.window, passes=1)
    return pl, parameter_counts(pl)


def check_options(argv: list[str]) -> None:
    """Refuse an lmsleep argv naming a command or an option that the CLI does not have."""
    from lmsleep.cli import cli

    cmd = cli.commands.get(argv[0])
    if cmd is None:
        raise ValueError(f"lmsleep has no command {argv[0]!r}")
    known = {o for prm in cmd.params for o in prm.opts}
    unknown = [a for a in argv[1:] if a.startswith("--") and a not in known]
    if unknown:
        raise ValueError(f"`lmsleep {argv[0]}` has no option {unknown[0]}")


def validate(p: Profile, root: str, gpus: int) -> list[str]:
    """Check every command without running it: click parses each argv (options, types, ranges), the train
    configs build (the retrofit preset + the sets), the task builds with its arguments (byte tokenizer), the
    retrofit plans. Returns a line per check; raises ValueError on the first failure."""
    from common.config import TRAIN_PRESETS, split_overrides
    from common.tasks import make

    lines = []
    for name, argv in commands(p, root, gpus):
        check_options(argv)
        lines.append(f"ok {name}: {len(argv)} arguments, options known to `lmsleep {argv[0]}`")
    pl, (src, new) = plan_of(p)
    lines.append(f"ok retrofit plan: {pl.config.n_layers} blocks ({len(pl.inserted)} SSM), loop blocks "
                 f"{pl.config.sleep_layers}, {src / 1e6:.0f}M source + {new / 1e6:.1f}M new parameters")
    model_sets, train_only = split_overrides(train_sets(p, gpus))
    assert not model_sets, model_sets
    tc = TRAIN_PRESETS["retrofit"].replace(**train_only, steps=p.steps, freeze=p.freeze)
    lines.append(f"ok train config: batch {tc.batch_size} = {p.micro} x {gpus} GPUs x {tc.grad_accum} accumulation, "
                 f"Muon {tc.muon_lr:g} / AdamW {tc.adamw_lr:g}, {tc.dtype}, checkpoint_windows={tc.checkpoint_windows}")
    task = make("gsm-infinite", **task_args(p, root, tokenizer=False))  # validates the arguments
    lines.append(f"ok task: gsm-infinite T = {task.seq_len}, window {task.window} (byte tokenizer here; the model's "
                 f"own on the GPU)")
    for n in p.passes:  # every N is a valid sleep_passes of this model
        pl.config.replace(sleep_passes=n)
    return lines


# --- memory and time estimate ------------------------------------------------------------------------------

# Measured on this CPU (experiments/retrofit/measure.py, SmolLM2-135M retrofit, float32, recall T = 192, micro-batch
# 2, --freeze base): peak RSS beyond the weights 1188 MiB (N = 1) without window recomputation; 620 MiB (N = 1) and
# 828 MiB (N = 2) with it. Less the logits (2 x 192 x 49,152 x 12 bytes: logits, log-softmax, gradient) and the
# trained blocks' gradients and AdamW moments (13.4M x 12 bytes), the rest is activations: ~10 bytes per token per
# "activation unit" (units = non-embedding parameters / d_model: the summed output widths of the linear layers,
# 208k for SmolLM2-135M), and each extra sleep pass adds ~0.83 of a window's activations.
BYTES_PER_UNIT_TOKEN = 10.0
EXTRA_PASS_SHARE = 0.83
LOGIT_BYTES = 12  # per logit: the logits, the float32 log-softmax and its gradient
BF16_ACTIVATIONS = 0.6  # assumed share of the float32 activation bytes under bf16 autocast (not measured here)


def estimate(p: Profile, gpus: int = 1, tflops: float = 300.0) -> list[dict]:
    """Per-GPU memory (GiB) and time per optimizer step for every N. Assumptions: activations scale with
    units x live tokens (one window at a time, with checkpoint_windows; the sleep passes of the previous window
    are part of it); float32 masters, gradients and optimizer state (Muon momentum 4 B, AdamW moments 8 B per
    trained parameter); logits of the whole sequence stay alive; time = 8 x params x tokens FLOPs (forward,
    backward, recomputation) x (1 + extra passes over the looped half of the first window's share of T), at
    `tflops` achieved per GPU (H200 bf16 peak ~990: ~30%)."""
    from common.training import is_muon_param

    pl, (src, new) = plan_of(p)
    c = pl.config
    embed = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    units = (src + new - embed) / c.d_model
    from common.checkpoint import param_shapes

    shapes = param_shapes(c)
    inserted = tuple(f"layers.{i}." for i in pl.inserted)
    trained = {n: math.prod(s) for n, s in shapes.items() if p.freeze == "none" or n.startswith(inserted)}
    muon = sum(v for n, v in trained.items() if is_muon_param(n))
    state = 4 * (src + new) + 4 * sum(trained.values()) + 4 * muon + 8 * (sum(trained.values()) - muon)
    T = p.length[1]
    rows = []
    for n in p.passes:
        live = p.micro * min(p.window, T) * (1 + EXTRA_PASS_SHARE * (n - 1))
        act = live * units * BYTES_PER_UNIT_TOKEN * (BF16_ACTIVATIONS if p.dtype == "bfloat16" else 1.0)
        logits = p.micro * T * c.vocab_size * LOGIT_BYTES
        tokens = p.batch * T / gpus
        flops = 8 * (src + new) * tokens * (1 + (n - 1) * 0.5 * min(p.window, T) / T)
        rows.append({"passes": n, "micro": p.micro, "gpus": gpus, "weights_optimizer_gib": state / 2**30,
                     "activations_gib": act / 2**30, "logits_gib": logits / 2**30,
                     "total_gib": (state + act + logits) / 2**30, "s_per_step": flops / (tflops * 1e12),
                     "hours": flops / (tflops * 1e12) * p.steps / 3600})
    return rows


def estimate_table(p: Profile, gpus: int = 1) -> str:
    lines = ["| N | micro-batch | GPUs | weights + grads + optimizer (GiB) | activations (GiB) | logits (GiB) | "
             "total per GPU (GiB) | s/step | hours for the run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in estimate(p, gpus):
        lines.append(f"| {r['passes']} | {r['micro']} | {r['gpus']} | {r['weights_optimizer_gib']:.1f} | "
                     f"{r['activations_gib']:.1f} | {r['logits_gib']:.1f} | {r['total_gib']:.0f} | "
                     f"{r['s_per_step']:.1f} | {r['hours']:.1f} |")
    return "\n".join(lines)


# --- tiny source and running -------------------------------------------------------------------------------

def write_tiny_source(folder, seed: int = 0) -> Path:
    """A random Hugging Face Qwen2 folder of the TINY shape: config.json, model.safetensors and a tokenizer.json
    (byte-level BPE without merges: one token per byte, then <|endoftext|> and <|im_end|>)."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from common.pretrained import expected_hf_shapes, from_hf_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arch = from_hf_config(TINY)
    tensors = {name: (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                      else 0.05 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in expected_hf_shapes(arch).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**TINY, "architectures": ["Qwen2ForCausalLM"]}))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def run(cmds: list[tuple[str, list[str]]], *, in_process: bool = False) -> None:
    """Run each command, in order: `python -m lmsleep` subprocesses, or (the dry run) the click CLI in this
    process (no interpreter start-up per command)."""
    import click

    from lmsleep.cli import cli

    for name, argv in cmds:
        print(f"$ {shell(argv)}", flush=True)
        if in_process:
            try:
                cli.main(args=argv, prog_name="lmsleep", standalone_mode=False)
            except click.ClickException as e:
                raise RuntimeError(f"{name}: {e.format_message()}") from None
        elif subprocess.call([sys.executable, "-m", "lmsleep", *argv]):
            raise RuntimeError(f"{name}: `{shell(argv)}` failed")


def dry_run(p: Profile, root: str, gpus: int, tiny_root: str | None = None) -> int:
    """Validate the profile's commands, then run the tiny profile end to end (retrofit, 1 step per N, sleep-eval)."""
    for line in validate(p, root, gpus):
        print(line)
    for name, argv in commands(p, root, gpus):
        print(f"{name}: {shell(argv)}")
    print(estimate_table(p, gpus))
    with tempfile.TemporaryDirectory(prefix="lmsleep-gpu-dry-") as tmp:
        base = Path(tiny_root or tmp)
        src = write_tiny_source(base / "tiny-src")
        t = PROFILES["tiny"]
        run(commands(t, str(base / "tiny"), 1, source=str(src)), in_process=True)
        rows = json.loads((base / "tiny" / "sleep_eval.json").read_text())["results"]
        print(f"ok tiny run: {len(rows)} sleep-eval rows")
    return 0


def main(args=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.gpu.recipe", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="qwen2.5-1.5b", choices=sorted(PROFILES))
    ap.add_argument("--root", default=ROOT)
    ap.add_argument("--gpus", type=int, default=1, help="GPUs of the machine (--nproc; DDP)")
    ap.add_argument("--micro", type=int, help="sequences per GPU per micro-batch (default: the profile's)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the profile's)")
    ap.add_argument("--freeze", choices=["none", "mlp", "base"], help="default: the profile's (none)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--estimate", action="store_true", help="print the memory/time estimate")
    mode.add_argument("--dry-run", action="store_true", help="validate, then run the tiny profile (CPU)")
    mode.add_argument("--run", action="store_true", help="run every command (resumable)")
    a = ap.parse_args(args)
    p = PROFILES[a.profile]
    p = replace(p, **{k: v for k, v in (("micro", a.micro), ("steps", a.steps), ("freeze", a.freeze)) if v})
    try:
        if a.estimate:
            print(estimate_table(p, a.gpus))
        elif a.dry_run:
            return dry_run(p, a.root, a.gpus)
        elif a.run:
            done = Path(a.root) / "retrofit" / "config.json"
            run([c for c in commands(p, a.root, a.gpus) if not (c[0] == "retrofit" and done.exists())])
        else:
            for _, argv in commands(p, a.root, a.gpus):
                print(shell(argv))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
