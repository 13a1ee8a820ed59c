"""`lmsleep`: one click group; each command parses flags and calls a library function.

Frameworks (torch, mlx) are imported lazily inside commands, so `lmsleep --help` is instant and
works without either installed. User mistakes end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import click

from common.config import MAX_SLEEP_PASSES


class UserError(click.ClickException):
    """A mistake of the user's: one clear line, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn):
    """Turn the failures a user causes into a one-line UserError (exit 2):

    ValueError (library code validates what it reads and names the bad value), OSError (a path the
    user gave: missing, a directory where a file is expected, under a file, not writable, a full
    disk) and common.training.TrainingError (the NaN stop). Anything else (KeyError, TypeError...)
    is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from common.training import TrainingError  # the command imports it anyway; --help stays light
        from lmsleep.workflows import one_line

        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, TrainingError) as e:
            raise UserError(one_line(e)) from None

    return wrapper


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


COUNT = click.IntRange(min=0)  # tokens, generation steps: 0 allowed
POSITIVE = click.IntRange(min=1)  # steps, examples, sizes, repeats
SEED = click.IntRange(0, 2**63 - 1)
PASSES = click.IntRange(1, MAX_SLEEP_PASSES)  # N, within ModelConfig's limit (docs/FORMAT.md "Limits")
MAX_PRINTED_EXAMPLES = 10_000  # `lmsleep data` prints; more is never readable
MAX_EVAL_EXAMPLES = 1 << 20  # `lmsleep eval --n`: sampled at once


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lm-sleep")
def cli():
    """lm-sleep: attention-SSM hybrids that sleep.

    When the attention window is about to be evicted, the model runs N offline passes over it,
    writing it into the fast weights of its SSM blocks, then clears its KV cache.

    \b
    Examples:
      lmsleep data rule110 --n 2          # see what the model sees
      lmsleep presets                     # list model/train presets
      lmsleep demo                        # the short end-to-end job `make demo` runs
    """


@cli.command()
@click.argument("name", required=False)
@user_errors
def presets(name):
    """List the named presets, or print one as JSON.

    \b
    Example:
      lmsleep presets paper-rule110
    """
    from common.config import PRESETS, TRAIN_PRESETS, ModelConfig, TrainConfig

    if name is None:
        for key, cfg in PRESETS.items():
            click.echo(f"{key:16s} d_model={cfg.d_model:<4d} layers={cfg.layer_types:<10s} "
                       f"window={cfg.window:<4d} N={cfg.sleep_passes}")
        for key in TRAIN_PRESETS.keys() - PRESETS.keys():  # training only (e.g. retrofit: the model comes from --init)
            click.echo(f"{key:16s} (train settings only: the model comes from `lmsleep train --init DIR`)")
        return
    doc = {}
    if name in PRESETS or name not in TRAIN_PRESETS:  # an unknown name: from_name's one-line error
        doc["model"] = ModelConfig.from_name(name).to_dict()
    if name in TRAIN_PRESETS:
        doc["train"] = TrainConfig.from_name(name).to_dict()
    click.echo(json.dumps(doc, indent=2))


@cli.command()
@click.argument("task")
@click.option("--n", "n", default=2, show_default=True, type=click.IntRange(1, MAX_PRINTED_EXAMPLES),
              help="Examples to print.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Sampling seed.")
@click.option("--set", "params", multiple=True, metavar="KEY=VALUE",
              help="Task parameter, e.g. --set steps=4 (repeatable).")
@user_errors
def data(task, n, seed, params):
    """Print decoded examples of TASK with windows and answers marked.

    Each window of L tokens is one line; answer tokens (the loss mask) are shown in [brackets].

    \b
    Example:
      lmsleep data rule110 --set steps=2 --n 3
    """
    from common.config import parse_override
    from common.tasks import make
    from common.tasks.render import render_example

    t = make(task, **dict(parse_override(p) for p in params))
    batch = t.sample(n, seed)
    click.echo(f"task {t.name} {json.dumps(t.params)}  window L={t.window}  vocab={t.vocab_size}  "
               f"T={batch.tokens.shape[1]}")
    for i in range(n):
        click.echo(f"--- example {i}")
        click.echo(render_example(t, batch, i))


class BackendChoice(click.Choice):
    """The backends of common/backends.py's table, read when click asks (help, parsing), not at import."""

    def __init__(self, auto: bool = True):
        self.auto = auto
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from common import backends

        return backends.choices() if self.auto else backends.names()

    @choices.setter
    def choices(self, _):  # click.Choice.__init__ assigns; the table is the only source
        pass


def backend_option(fn):
    return click.option("--backend", default="auto", show_default=True, type=BackendChoice(),
                        help="auto = mlx on Apple Silicon (when installed), else torch.")(fn)


def dtype_choice() -> click.Choice:
    from common.checkpoint import DTYPE_TAGS

    return click.Choice(list(DTYPE_TAGS))


def parse_pairs(pairs) -> dict:
    from common.config import parse_override

    return dict(parse_override(p) for p in pairs)


@cli.command()
@click.option("--task", required=True, help="rule110 | depo | gsm | text | recall | gsm-infinite")
@click.option("--preset", help="Model + train preset (see `lmsleep presets`); default debug. With --init only the "
              "train preset counts; default retrofit.")
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False),
              help="Model folder to fine-tune (e.g. from `lmsleep retrofit`): its config, weights and tokenizer.")
@click.option("--freeze", type=click.Choice(["none", "mlp", "base"]),
              help="With --init: base = only the SSM blocks a retrofit inserted learn (retrofit preset's default), "
                   "mlp = all but the MLPs, none = everything.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="ModelConfig or TrainConfig field, e.g. --set d_model=64 --set muon_lr=0.01 (repeatable).")
@click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE",
              help="Task parameter, e.g. --task-arg steps=4 (repeatable).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="Text/JSONL file for --task text.")
@click.option("--passes", type=PASSES, help="Sleep passes N (ModelConfig.sleep_passes).")
@click.option("--grad-accum", type=POSITIVE, help="Micro-batches per optimizer step.")
@click.option("--steps", type=POSITIVE, help="Optimizer steps (TrainConfig.steps).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue OUT/checkpoint exactly where it stopped.")
@click.option("--nproc", type=click.IntRange(1, os.cpu_count() or 1), default=1, show_default=True,
              help="Processes for DistributedDataParallel (torch; gloo on CPU, NCCL on GPUs).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@backend_option
@user_errors
def train(task, preset, init, freeze, sets, task_args, data, passes, grad_accum, steps, out, resume, nproc, quiet,
          backend):
    """Train a sleeping hybrid on a task; writes OUT/{metrics.jsonl, checkpoint/, model/}.

    \b
    Examples:
      lmsleep train --task rule110 --task-arg steps=2 --preset small-rule110 --passes 4 --out runs/r110-n4
      lmsleep train --task text --data notes.txt --preset debug --out runs/text
      lmsleep train --task rule110 --preset debug --nproc 2 --out runs/ddp     # 2 processes (torch)
      lmsleep train --init runs/smol --task recall --out runs/smol-ft          # fine-tune a retrofit
    """
    from lmsleep import workflows as wf

    t, mc, tc = wf.build_run(task, parse_pairs(task_args), preset, parse_pairs(sets), passes=passes,
                             grad_accum=grad_accum, steps=steps, data=data, init=init, freeze=freeze)
    resume = wf.resume_or_start(out, resume)
    if nproc > 1:
        from common.backends import BACKENDS, get

        b = get(backend)
        if not b.distributed:
            able = ", ".join(x.name for x in BACKENDS.values() if x.distributed)
            raise UserError(f"--nproc needs a backend that trains over several processes ({able}); "
                            f"{b.name} trains on one device")
        argv = ["--task", task, "--out", out] + ["--preset", preset] * bool(preset) + ["--init", init] * bool(init)
        argv += [f"--task-arg={k}={json.dumps(v)}" for k, v in t.params.items()]
        argv += [f"--set={k}={json.dumps(v)}" for k, v in {**mc.to_dict(), **tc.to_dict()}.items()]
        argv += ["--resume"] * resume + ["--no-progress"] * quiet
        sys.exit(wf.launch_distributed(nproc, argv))
    summary = wf.run_train(backend, t, mc, tc, out, resume=resume, progress=not quiet, init=init)
    click.echo(json.dumps({k: summary[k] for k in ("step", "loss", "eval", "tokens_per_s", "peak_mem_mib", "model")
                           if k in summary}))


@cli.command(name="eval")
@click.argument("model_dir", type=click.Path())
@click.option("--task", help="Task name; default: the task recorded in the model folder.")
@click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE", help="Task parameter (repeatable).")
@click.option("--passes", "passes", multiple=True, type=PASSES,
              help="Sleep passes N at evaluation (repeatable: compare several N). Default: the trained N.")
@click.option("--n", "n", default=512, show_default=True, type=click.IntRange(1, MAX_EVAL_EXAMPLES), help="Examples.")
@click.option("--seed", default=1, show_default=True, type=SEED, help="Sampling seed of the evaluation set.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write results as JSON ('-' = stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write accuracy vs N as a PNG (needs matplotlib).")
@click.option("--data", type=click.Path(dir_okay=False), help="Data file of a text task (replaces the one the "
              "trainer recorded; a recorded path must lie inside the model folder).")
@backend_option
@user_errors
def eval_(model_dir, task, task_args, passes, n, seed, json_out, plot, data, backend):
    """Score a model on its task, per difficulty, for one or several N.

    \b
    Examples:
      lmsleep eval runs/r110-n4/model --passes 1 --passes 2 --passes 4 --plot acc_vs_n.png
      lmsleep eval runs/depo/model --task depo --task-arg k=8 --json -
      lmsleep eval runs/notes/model --data notes.txt
    """
    from lmsleep import workflows as wf

    t = wf.model_task(model_dir, task, parse_pairs(task_args), data=data)
    rows = wf.run_eval(backend, model_dir, t, list(passes), n=n, seed=seed)
    click.echo(wf.format_table(rows))
    if json_out:
        wf.write_json(rows, json_out)
    if plot:
        written = wf.plot_eval(rows, plot)
        click.echo(f"plot: {written}" if written else "plot skipped: matplotlib is not installed", err=True)


def sampling_options(fn):
    for option in reversed([
        click.option("--max-tokens", default=200, show_default=True, type=COUNT, help="Tokens to generate."),
        click.option("--temp", default=0.0, show_default=True, type=FiniteFloat(min=0),
                     help="Temperature; 0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=COUNT,
                     help="Sample from the k most likely; 0 = all."),
        click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0, 1, min_open=True),
                     help="Nucleus sampling mass, in (0, 1]."),
        click.option("--seed", default=0, show_default=True, type=SEED, help="Sampling seed."),
        click.option("--passes", type=PASSES, help="Sleep passes N (default: the model's)."),
        click.option("--dtype", type=dtype_choice(), help="Compute dtype."),
    ]):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--prompt", required=True, help="Text to start from.")
@click.option("--verbose", is_flag=True, help="Mark sleeps inline and print stats at the end.")
@sampling_options
@backend_option
@user_errors
def generate(model_dir, prompt, verbose, max_tokens, temp, top_k, top_p, seed, passes, dtype, backend):
    """Stream a continuation of PROMPT; sleeps are reported on stderr as they happen.

    \b
    Example:
      lmsleep generate runs/text/model --prompt "Once upon a time" --max-tokens 300 --temp 0.8
    """
    from lmsleep import workflows as wf

    b, model, tok = wf.load_for_generation(backend, model_dir, dtype)
    ids = wf.encode_prompt(tok, prompt)
    state = model.new_state(1)
    sleeps = 0
    for token in b.generate(model, ids, max_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p,
                            seed=seed, stop=wf.stop_ids(tok), passes=passes, state=state):
        if token in wf.stop_ids(tok):
            break
        click.echo(tok.decode([token]) + getattr(tok, "sep", ""), nl=False)
        if state.sleeps != sleeps:
            sleeps = state.sleeps
            click.echo(f" [sleep {sleeps}] " if verbose else "", nl=False)
            click.echo(f"[sleep {sleeps} after {state.seen} tokens]", err=True)
    click.echo()
    if verbose:
        click.echo(f"[{state.seen} tokens, {state.sleeps} sleeps, state {state.nbytes() / 1024:.1f} KiB]", err=True)


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--memory", type=click.Path(), help="Start from a memory file (written by /save); one that cannot "
              "be loaded is reported and the chat starts empty.")
@click.option("--system", help="System message (models with a chat template).")
@sampling_options
@backend_option
@user_errors
def chat(model_dir, memory, system, max_tokens, temp, top_k, top_p, seed, passes, dtype, backend):
    """Chat with a model; it sleeps between turns and its memory stays constant.

    Models with a chat template (retrofitted ones) get each turn rendered by it; only the text a
    turn adds is fed, so the conversation's past is never read again: it lives in the State.

    \b
    In the REPL:
      /reset          forget everything         /sleep       consolidate the current window now
      /save FILE      write a memory file       /load FILE   continue from a memory file
      /stats          tokens seen, sleeps, memory in use     /quit
    \b
    Examples:
      lmsleep chat runs/text/model --temp 0.7
      lmsleep chat runs/smol --system "You are terse."
    """
    from lmsleep import workflows as wf
    from lmsleep.chat import ChatSession, run_repl

    b, model, tok = wf.load_for_generation(backend, model_dir, dtype)
    sampling = dict(max_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p, seed=seed, passes=passes)
    session = ChatSession(model, tok, b.generate, sampling=sampling, stop=wf.stop_ids(tok), no_grad=b.no_grad,
                          echo=lambda text, nl=True: click.echo(text, nl=nl),
                          conversation=wf.conversation_for(model_dir, tok, system))
    if memory:
        session.command("/load", memory)
    run_repl(session, interactive=sys.stdin.isatty())


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; keep 127.0.0.1 unless behind a proxy (there is no authentication).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port; 0 = any free.")
@click.option("--sessions", type=click.Path(file_okay=False),
              help="Folder for conversation snapshots (memory files): conversations survive restarts. Default: RAM.")
@click.option("--max-sessions", default=16, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Conversation States kept in RAM.")
@click.option("--max-disk-mb", default=1024, show_default=True, type=click.IntRange(1, 1 << 24),
              help="Size cap of --sessions; the least recently used snapshots go first.")
@click.option("--parallel", default=2, show_default=True, type=click.IntRange(1, 256), help="Requests computed at once.")
@click.option("--queue", default=64, show_default=True, type=click.IntRange(0, 1 << 16),
              help="Requests waiting beyond --parallel; more get HTTP 429.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Reply length when a request gives none.")
@click.option("--passes", type=PASSES, help="Sleep passes N (default: the model's).")
@click.option("--dtype", type=dtype_choice(), help="Compute dtype.")
@click.option("--model-id", help="Model name clients send (default: the folder's name).")
@click.option("--quiet", is_flag=True, help="No access log on stderr.")
@backend_option
@user_errors
def serve(model_dir, host, port, sessions, max_sessions, max_disk_mb, parallel, queue, max_tokens, passes, dtype,
          model_id, quiet, backend):
    """Serve a model over an OpenAI-compatible HTTP API; each conversation is a fixed-size State.

    POST /v1/chat/completions (streamed or not), /v1/completions, GET /v1/models, /health. A
    conversation continues from the State of its last turn: each request processes only the text
    it adds. See docs/SERVING.md.

    \b
    Example:
      lmsleep serve runs/smol --sessions runs/smol-sessions --port 8000
      # then, in Python: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    """
    from lmsleep.server import make_server, serve_forever, stderr_log

    server = make_server(model_dir, host=host, port=port, backend=backend, sessions_dir=sessions,
                         max_sessions=max_sessions, max_disk_mb=max_disk_mb, parallel=parallel, queue=queue,
                         max_tokens=max_tokens, passes=passes, dtype=dtype, model_id=model_id,
                         log=None if quiet else stderr_log)
    serve_forever(server, echo=click.echo)


@cli.command(name="convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to", required=True, type=BackendChoice(auto=False), help="Target backend.")
@click.option("--dtype", type=dtype_choice(),
              help="Cast the float tensors (default: keep them bit for bit).")
@click.option("--quantize", "bits", type=click.Choice(["4", "8"]),
              help="Quantize the block linear weights to 4 or 8 bits (--to mlx only).")
@click.option("--group-size", default=64, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Weights per quantization group (with --quantize).")
@click.option("--dequantize", is_flag=True, help="Unpack a quantized folder to float weights (needed for --to torch).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@user_errors
def convert_(src, dst, to, dtype, bits, group_size, dequantize, force):
    """Convert a model folder or a training checkpoint SRC for another backend into DST.

    SRC may be a model folder, a trainer's OUT/checkpoint (DST is then a checkpoint that the target
    backend resumes with `lmsleep train ... --resume`, optimizer state included; with --dtype it
    becomes a plain model folder), or any
    safetensors file/folder with a config.json beside it (`module.` / `_orig_mod.` prefixes are
    stripped). Tensors are copied bit for bit unless --dtype or --quantize asks otherwise.

    \b
    Examples:
      lmsleep convert runs/r110/model runs/r110/model-mlx --to mlx
      lmsleep convert runs/r110/checkpoint runs/r110/model-bf16 --to torch --dtype bfloat16
      lmsleep convert runs/r110/model runs/r110/model-q4 --to mlx --quantize 4 --group-size 64
    """
    from convert.convert import convert_path, summary

    report = convert_path(src, dst, to=to, dtype=dtype, quantize_bits=int(bits) if bits else None,
                          group_size=int(group_size), dequantize=dequantize, overwrite=force)
    click.echo(summary(report))
    q = report.get("quantization_error")
    if q:
        click.echo(f"quantization error vs {src} (MLX, {q['tokens']} random tokens): logits max abs "
                   f"{q['max_abs']:.3e}, relative {q['max_rel']:.3e}; greedy agreement {q['greedy_agreement']:.1%}")


def parse_insert_at(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated source layer indices, e.g. 4,8,12") from None


@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--insert", type=click.IntRange(0, 4096), help="SSM blocks to insert, spread evenly over the looped "
              "range [default: about n_layers/4].")
@click.option("--insert-at", callback=parse_insert_at,
              help="Insert one SSM block in front of each of these source layers (comma-separated; "
                   "n_layers = after the last).")
@click.option("--loop", "loop", help="Looped range a:b in source layers (b exclusive) or 'all' "
              "[default: the middle half].")
@click.option("--window", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Attention window L (tokens kept before a sleep).")
@click.option("--eviction", default="hard", show_default=True, type=click.Choice(["hard", "sliding"]))
@click.option("--passes", default=2, show_default=True, type=PASSES, help="Sleep passes N.")
@click.option("--ssm-heads", type=click.IntRange(1, 1024), help="Heads of the inserted SSM blocks "
              "[default: the attention's].")
@click.option("--ssm-head-dim", type=click.IntRange(1, 4096), help="Key size of the inserted SSM blocks "
              "[default: the attention's head_dim].")
@click.option("--init", "init", default="zero", show_default=True, type=click.Choice(["zero", "copy-attn"]),
              help="zero: inserted blocks are exact no-ops (o_proj = 0); copy-attn: also copy q/k/v from the "
                   "nearest attention layer.")
@click.option("--dtype", default="float32", show_default=True, type=dtype_choice(), help="Weights' dtype in OUT.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@backend_option
@user_errors
def retrofit(src, out, insert, insert_at, loop, window, eviction, passes, ssm_heads, ssm_head_dim, init, dtype,
             revision, force, backend):
    """Make a pretrained Llama-family model (llama, mistral, qwen2, qwen3) a sleeping hybrid in OUT.

    SRC: a Hugging Face model folder, a Hub repo id (owner/name[@revision]; safetensors and tokenizer
    files only), a .gguf file, or a bundled model name (smollm2-135m-instruct). The source's
    attention layers keep their weights; MLP-free SSM blocks are inserted and start as exact
    no-ops, so before training OUT computes what SRC computes inside every window. The tokenizer
    and chat template are carried over. --backend loads OUT once to check it.

    \b
    Examples:
      lmsleep retrofit smollm2-135m-instruct runs/smol --window 512
      lmsleep retrofit Qwen/Qwen2.5-1.5B-Instruct runs/qwen --loop 7:21 --passes 4 --dtype bfloat16
      lmsleep chat runs/smol
    """
    from convert.retrofit import retrofit as run_retrofit
    from convert.retrofit import summary
    from lmsleep.backends import load_backend

    b = load_backend(backend)
    report = run_retrofit(src, out, insert=insert, insert_at=insert_at, loop=loop, window=window, eviction=eviction,
                          passes=passes, ssm_heads=ssm_heads, ssm_head_dim=ssm_head_dim, init=init, dtype=dtype,
                          backend=b.name, overwrite=force, revision=revision,
                          progress=progress_echo if sys.stderr.isatty() else None)  # errors stay one line
    click.echo(summary(report))
    model = b.load(out)  # the folder loads in the chosen backend
    click.echo(f"loaded in {b.name}: {len(model.config.layer_types)} blocks, tokenizer "
               f"{type(model.tokenizer).__name__}; chat with: lmsleep chat {out}")


@cli.command(name="parity")
@click.argument("model_dir", type=click.Path())
@click.option("--passes", type=PASSES, help="Sleep passes N (default: the model's).")
@click.option("--tokens", default=64, show_default=True, type=POSITIVE, help="Random tokens per sequence.")
@click.option("--batch", default=2, show_default=True, type=POSITIVE, help="Sequences.")
@click.option("--gen-tokens", default=50, show_default=True, type=COUNT, help="Greedy generation steps to compare.")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), help="Override the model's eviction mode.")
@click.option("--tol", default=1e-4, show_default=True, type=FiniteFloat(min=0), help="Largest relative error allowed.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the random tokens.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the report as JSON ('-' = stdout).")
@user_errors
def parity_(model_dir, passes, tokens, batch, gen_tokens, eviction, tol, seed, json_out):
    """Run MODEL_DIR in torch and MLX (float32) and compare every stage; exit 1 above --tol.

    Stages: embeddings and each block output of every wake window, the SSM states of every sleep
    pass and of the coda, the final logits (relative error = max|mlx - torch| / max|torch|), then
    greedy generation (steps where torch's top-2 margin is within the tolerance are not counted).

    \b
    Example:
      lmsleep parity runs/r110/model --passes 3 --tokens 96 --json parity.json
    """
    from convert.parity import parity

    report = parity(model_dir, passes=passes, tokens=tokens, batch=batch, seed=seed, gen_tokens=gen_tokens,
                    eviction=eviction, tol=tol)
    click.echo(report.format_table())
    if json_out == "-":
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif json_out:
        from common.checkpoint import write_json

        write_json(json_out, report.to_dict())
    if not report.ok:
        sys.exit(1)


@cli.group()
def hub():
    """Push model folders to / pull them from the Hugging Face Hub (HF_TOKEN, HF_HUB_OFFLINE apply)."""


@hub.command(name="push")
@click.argument("model_dir", type=click.Path())
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@user_errors
def hub_push(model_dir, repo, private):
    """Upload MODEL_DIR (validated first) to the Hub repo REPO.

    \b
    Example:
      HF_TOKEN=hf_... lmsleep hub push runs/notes/model me/sleepy-notes
    """
    from convert.hub import push

    click.echo(f"pushed {model_dir} to {push(model_dir, repo, private=private)}")


@hub.command(name="pull")
@click.argument("repo")
@click.argument("out_dir", type=click.Path())
@click.option("--revision", help="Branch, tag or commit.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@user_errors
def hub_pull(repo, out_dir, revision, force):
    """Download REPO into OUT_DIR (validated before it appears there).

    \b
    Example:
      lmsleep hub pull me/sleepy-notes models/notes
    """
    from convert.hub import pull

    click.echo(f"pulled {repo} into {pull(repo, out_dir, revision=revision, overwrite=force)}")


@cli.group()
def bench():
    """Measure speed and memory: the SSM scan, decoding, sleep, training, the server.

    Each prints a table, writes JSON (default benchmarks/results/NAME-BACKEND[-quick].json) with the
    machine, settings, every measurement and each target met or not, and can draw a PNG.
    Timings are medians of repeats after warm-up. docs/BENCHMARKS.md has the measured tables.
    """


def device_help() -> str:
    from common.backends import BACKENDS

    per_backend = "; ".join(f"{b.name}: {'|'.join(b.devices)}" for b in BACKENDS.values())
    return f"{per_backend}; auto = the backend's default (CUDA when torch sees it, MLX's default device)."


def bench_options(fn):
    for option in reversed([
        click.option("--quick", is_flag=True, help="Fewer sizes and repeats (about a minute on a laptop CPU)."),
        click.option("--json", "json_out", type=click.Path(dir_okay=False),
                     help="Where to write the results.  [default: benchmarks/results/NAME-BACKEND[-quick].json]"),
        click.option("--plot", type=click.Path(dir_okay=False),
                     help="Also draw the results as a PNG (needs matplotlib)."),
        click.option("--device", default="auto", show_default=True, help=device_help()),
        click.option("--threads", type=POSITIVE, help="torch intra-op threads (default: 1 where 2 CPUs or fewer are usable, else one per CPU; "
                          "OMP_NUM_THREADS sets it too)."),
    ]):
        fn = option(fn)
    return backend_option(fn)


def finish_bench(name: str, module, doc: dict, json_out, plot) -> None:
    """Print the table and targets, write the JSON, draw the plot."""
    from lmsleep.bench import common as bc

    doc["command"] = command_line()
    m = doc["machine"]
    click.echo(f"\n{name} | {doc['backend']} on {m['device']} | {m['cpu']} x{m['cpus_usable']} | "
               f"{m['date']} | load {m['load_avg']}")
    click.echo(module.table(doc))
    if doc["targets"]:
        click.echo("targets:\n" + bc.format_targets(doc["targets"]))
    path = bc.write_json(doc, json_out or bc.default_json_path(name, doc["backend"], doc["quick"]))
    click.echo(f"json: {path}")
    if plot:
        written = module.plot(doc, plot)
        click.echo(f"plot: {written}" if written else "plot skipped: matplotlib is not installed", err=True)


def command_line() -> str:
    """The bench command as typed (arguments of the click context, for the JSON record)."""
    ctx = click.get_current_context()
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value in (None, False, ()) or value == param.default:
            continue
        flag = param.opts[0]
        if value is True:
            args.append(flag)
        else:
            args += [f"{flag} {v}" for v in (value if isinstance(value, tuple) else (value,))]
    return " ".join(["lmsleep", ctx.command_path.split(" ", 1)[-1], *args])


def progress_echo(line: str) -> None:
    click.echo(line, err=True)


@bench.command(name="scan")
@click.option("--length", "lengths", multiple=True, type=POSITIVE,
              help="Sequence length T (repeatable).  [default: 256 1024 4096; --quick: 256 1024]")
@click.option("--repeats", type=POSITIVE, help="Timed runs per cell (after one warm-up).")
@bench_options
@user_errors
def bench_scan(lengths, repeats, quick, json_out, plot, device, threads, backend):
    """ssm_scan ref vs chunk vs kernel, forward and forward+backward, both rules, B=4 H=4 D=64.

    Reports time, tokens/s and the speedup over the step-by-step ref; "kernel" runs where it
    exists (CUDA with flash-linear-attention, Metal for MLX) and is listed as skipped elsewhere.

    \b
    Example:
      lmsleep bench scan --backend torch --quick --plot scan.png
    """
    from lmsleep.bench import scan

    doc = scan.run(backend, quick=quick, device=device, threads=threads, lengths=lengths or None,
                   repeats=repeats, progress=progress_echo)
    finish_bench("scan", scan, doc, json_out, plot)


@bench.command(name="decode")
@click.option("--context", "contexts", multiple=True, type=POSITIVE,
              help="Context length to measure at (repeatable).  [default: 1024 4096 16384 65536; --quick: 1024 4096]")
@click.option("--measure", type=POSITIVE,
              help="Single-token steps timed at each context.  [default: 256; --quick: 128]")
@click.option("--stream", "stream_mode", type=click.Choice(["tokens", "chunks"]),
              help="How the sleep model reaches each context: one token per step, or a window per step.  "
                   "[default: tokens; --quick: chunks]")
@click.option("--passes", default=2, show_default=True, type=PASSES, help="Sleep passes N of the sleep model.")
@click.option("--window", default=64, show_default=True, type=POSITIVE, help="Window L of the sleep model.")
@click.option("--no-baseline", is_flag=True, help="Skip the growing-KV-cache baseline.")
@bench_options
@user_errors
def bench_decode(contexts, measure, stream_mode, passes, window, no_baseline, quick, json_out, plot, device,
                 threads, backend):
    """Per-token latency and memory while streaming long contexts, vs a full-attention baseline.

    The sleep model (small-rule110, vocabulary 258, batch 1) keeps a bounded State; the baseline
    (same width and depth, all attention, nothing evicted) keeps every key and value.

    \b
    Example:
      lmsleep bench decode --backend torch --quick --plot decode.png
    """
    from lmsleep.bench import decode

    doc = decode.run(backend, quick=quick, device=device, threads=threads, contexts=contexts or None,
                     measure=measure, stream_mode=stream_mode, passes=passes, window=window,
                     baseline=not no_baseline, progress=progress_echo)
    finish_bench("decode", decode, doc, json_out, plot)


@bench.command(name="sleep")
@click.option("--passes", "passes", multiple=True, type=PASSES,
              help="Sleep passes N (repeatable).  [default: 1..8; --quick: 1 2 4 8]")
@click.option("--window", "windows", multiple=True, type=POSITIVE,
              help="Window L (repeatable).  [default: 64 128 256; --quick: 64 128]")
@click.option("--batch", default=1, show_default=True, type=POSITIVE, help="Streams sleeping at once.")
@bench_options
@user_errors
def bench_sleep(passes, windows, batch, quick, json_out, plot, device, threads, backend):
    """Time of one sleep vs N and vs L, next to one window's prefill.

    \b
    Example:
      lmsleep bench sleep --backend torch --quick --plot sleep.png
    """
    from lmsleep.bench import sleep

    doc = sleep.run(backend, quick=quick, device=device, threads=threads, passes=passes or None,
                    windows=windows or None, batch=batch, progress=progress_echo)
    finish_bench("sleep", sleep, doc, json_out, plot)


@bench.command(name="train")
@click.option("--preset", "presets", multiple=True, type=click.Choice(["paper-rule110", "paper-depo", "debug"]),
              help="Model preset and its task (repeatable).  "
                   "[default: paper-rule110 paper-depo; --quick: paper-rule110]")
@click.option("--passes", "passes", multiple=True, type=PASSES,
              help="Sleep passes N (repeatable).  [default: 1 2 4; --quick: 1 4]")
@click.option("--batch", type=POSITIVE, help="Examples per optimizer step.  [default: 64; --quick: 16]")
@click.option("--micro-batch", type=POSITIVE,
              help="Rows per forward/backward (gradients accumulate).  [default: the whole batch; paper-depo: 8]")
@click.option("--repeats", type=POSITIVE, help="Timed steps per row (after one warm-up step).")
@click.option("--scan-impl", default="auto", show_default=True,
              type=click.Choice(["auto", "chunk", "kernel", "ref"]),
              help="ssm_scan implementation used in training (auto = kernel on CUDA, else chunk).")
@click.option("--no-profile", is_flag=True, help="Skip the torch.profiler run.")
@bench_options
@user_errors
def bench_train(presets, passes, batch, micro_batch, repeats, scan_impl, no_profile, quick, json_out, plot, device,
                threads, backend):
    """Training tokens/s and model FLOP/s as a fraction of this machine's measured matmul peak.

    One step = forward + backward over every window and sleep pass, then Muon + AdamW. The torch
    backend also profiles one step (top ops by self CPU time).

    \b
    Example:
      lmsleep bench train --backend torch --quick --json train.json
    """
    from lmsleep.bench import train

    doc = train.run(backend, quick=quick, device=device, threads=threads, presets=presets or None,
                    passes=passes or None, batch=batch, micro_batch=micro_batch, repeats=repeats,
                    scan_impl=scan_impl, profile=not no_profile, progress=progress_echo)
    finish_bench("train", train, doc, json_out, plot)


@bench.command(name="serve")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="Model folder to serve.  [default: a random debug-preset model with the byte tokenizer]")
@click.option("--concurrency", "levels", multiple=True, type=POSITIVE,
              help="Conversations at once (repeatable).  [default: 1 4 16; --quick: 1 4]")
@click.option("--turns", type=POSITIVE, help="Turns per conversation.  [default: 10; --quick: 3]")
@click.option("--max-tokens", type=POSITIVE, help="Reply tokens per turn.  [default: 32; --quick: 4]")
@click.option("--parallel", default=2, show_default=True, type=POSITIVE,
              help="Replies the server computes at once (lmsleep serve --parallel).")
@bench_options
@user_errors
def bench_serve(model_dir, levels, turns, max_tokens, parallel, quick, json_out, plot, device, threads, backend):
    """The OpenAI-compatible server on 127.0.0.1: time to first token and tokens/s at 1, 4, 16 conversations.

    Each conversation is a thread sending streamed chat completions turn after turn; the table also
    shows TTFT of turn 1 vs the last turn (a conversation kept as a State should not slow down).

    \b
    Example:
      lmsleep bench serve --quick --plot serve.png
    """
    from lmsleep.bench import serve

    if device != "auto":
        raise click.BadParameter("the server loads the model on the backend's default device; leave it at auto",
                                 param_hint="--device")
    doc = serve.run(backend, quick=quick, model_dir=model_dir, levels=levels or None, turns=turns,
                    max_tokens=max_tokens, parallel=parallel, threads=threads, progress=progress_echo)
    finish_bench("serve", serve, doc, json_out, plot)


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the two runs go (re-running continues / reuses them).")
@click.option("--steps", default=200, show_default=True, type=POSITIVE, help="Training steps for each N.")
@click.option("--batch-size", default=32, show_default=True, type=POSITIVE, help="Examples per step.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Init and data seed (same for both N).")
@backend_option
@user_errors
def demo(out, steps, batch_size, seed, backend):
    """Train N=1 and N=4 on Rule 110 for the same steps and compare (what `make demo` runs).

    \b
    Example:
      lmsleep demo --steps 400 --out runs/demo400
    """
    from lmsleep.demo import run_demo

    run_demo(out, steps=steps, batch_size=batch_size, backend=backend, seed=seed)


@cli.command(name="sleep-eval")
@click.option("--task", help="Task name; default: the task recorded in the first --trained folder.")
@click.option("--task-arg", "task_args", multiple=True, metavar="KEY=VALUE", help="Task parameter (repeatable).")
@click.option("--retrofit", "retrofit_dir", required=True, type=click.Path(file_okay=False),
              help="The retrofitted folder before training (the lower bound: eviction, no memory).")
@click.option("--trained", multiple=True, type=click.Path(file_okay=False),
              help="A trained folder (repeatable; e.g. N=1 and N=2 runs' model/).")
@click.option("--base", help="Upper bound: a model folder or retrofit source (GGUF, HF folder, Hub id, bundled "
              "name) run with the whole context. Default: the --retrofit folder with its window widened.")
@click.option("--passes", "passes", multiple=True, type=PASSES,
              help="N at which every trained folder is evaluated (repeatable).  [default: 1 2 4]")
@click.option("--n", "n", default=64, show_default=True, type=click.IntRange(1, MAX_EVAL_EXAMPLES), help="Examples.")
@click.option("--seed", default=1, show_default=True, type=SEED, help="Sampling seed of the evaluation set.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Every row as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Accuracy per difficulty as a PNG (needs matplotlib).")
@click.option("--eval-batch", type=POSITIVE, help="Score this many examples at a time, keeping predictions only "
              "(long sequences with a large vocabulary: the logits of all --n examples would not fit).")
@click.option("--whole-trained", is_flag=True, help="Also evaluate each trained folder with the whole context "
              "(no eviction): the fine-tuned model's own upper bound.")
@backend_option
@user_errors
def sleep_eval_(task, task_args, retrofit_dir, trained, base, passes, n, seed, json_out, plot, eval_batch,
                whole_trained, backend):
    """What sleep bought: per difficulty, the whole-context upper bound, the untrained retrofit (lower
    bound) and each trained folder at every N, on the same examples.

    \b
    Example:
      lmsleep sleep-eval --task recall --task-arg tokenizer_dir=runs/smol --task-arg window=64 \\
          --retrofit runs/smol --trained runs/n1/model --trained runs/n2/model --passes 1 --passes 2 --json t.json
    """
    from lmsleep import sleepeval as se
    from lmsleep import workflows as wf

    t = wf.model_task(trained[0] if trained else retrofit_dir, task, parse_pairs(task_args))
    rows = se.sleep_eval(backend, t, retrofit=retrofit_dir, trained=trained, base=base, passes=passes or (1, 2, 4),
                         n=n, seed=seed, eval_batch=eval_batch, whole_trained=whole_trained,
                         progress=lambda line: click.echo(line, err=True))
    click.echo(se.format_table(rows))
    if json_out:
        wf.write_json(rows, json_out)
    if plot:
        written = se.plot(rows, plot, title=t.name)
        click.echo(f"plot: {written}" if written else "plot skipped: matplotlib is not installed", err=True)


def main():
    from common.backends import cpu_thread_policy

    cpu_thread_policy()  # before any command imports torch: 1 thread on a 2-CPU machine
    cli(prog_name="lmsleep")


if __name__ == "__main__":
    sys.exit(main())
