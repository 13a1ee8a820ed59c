"""`lmsleep`: one click group; each command parses flags and calls a library function.

Frameworks (torch, mlx) are imported lazily inside commands, so `lmsleep --help` is instant and
works without either installed. User mistakes end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click


class UserError(click.ClickException):
    """A mistake of the user's: one clear line, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn):
    """Turn ValueError / FileNotFoundError raised by library code into a one-line UserError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise UserError(str(message).splitlines()[0] if str(message) else type(e).__name__) from None

    return wrapper


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
        return
    doc = {"model": ModelConfig.from_name(name).to_dict()}
    if name in TRAIN_PRESETS:
        doc["train"] = TrainConfig.from_name(name).to_dict()
    click.echo(json.dumps(doc, indent=2))


@cli.command()
@click.argument("task")
@click.option("--n", "n", default=2, show_default=True, help="Examples to print.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
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


@cli.command()
@user_errors
def demo():
    """The short end-to-end job that `make demo` runs."""
    from lmsleep.demo import run_demo

    run_demo()


def main():
    cli(prog_name="lmsleep")


if __name__ == "__main__":
    sys.exit(main())
