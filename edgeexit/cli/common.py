"""What every edgeexit command shares: one-line error handling, the [train]-extra guard, option parsing."""
from __future__ import annotations

import os
import sys
from signal import SIGPIPE
from typing import Any, ContextManager

import click

from edgeexit.errors import ConfigError, EdgeExitError, first_line
from edgeexit.extras import guard
from edgeexit.runtime.datasets import DATASETS, DEFAULT_DATA
from edgeexit.runtime.providers import DEVICES

DEBUG_ENV = "EDGEEXIT_DEBUG"


def training_extra() -> ContextManager[None]:
    """Around the import of a training-side module: a missing [train] dependency is a one-line MissingExtraError."""
    return guard("this command")


class Group(click.Group):
    """click group that turns project errors and unexpected failures into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeExitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader left (`edgeexit cuts | head -3`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit fails again
            sys.exit(128 + SIGPIPE)
        except Exception as exc:  # last line of defence: no traceback unless asked for
            if os.environ.get(DEBUG_ENV):
                raise
            message = first_line(exc) if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {message} (set {DEBUG_ENV}=1 for details)", err=True)
            sys.exit(1)



def parse_numbers(value: str | None, option: str = "--threshold") -> float | list[float] | None:
    """'0.7' -> 0.7; '0.6,0.8' -> [0.6, 0.8] (one per exit); None stays None."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise ConfigError(f"{option} takes a number or comma-separated numbers, got '{value}'") from None
    return parts[0] if len(parts) == 1 else parts


BETA_HELP = "Class exclusion: dynamic-threshold beta in [0, 1], B for every exit or B1,B2,... one per exit."


def beta_args(value: str | None) -> dict | None:
    """--beta as policy args ({"beta": B or [B1, B2, ...]}), None when not given."""
    beta = parse_numbers(value, "--beta")
    return None if beta is None else {"beta": beta}



DEVICE_HELP = f"One of: {DEVICES.choices()}."
DATA_DIR_OPTION = click.option("--data-dir", default=None, help="Where torchvision data sets live (mnist, cifar10, ...).")


def labeled_data_options(command: Any) -> Any:
    """--data and --data-dir, for the commands that need labels (calibrate, bench, quantize)."""
    data = click.option("--data", default=DEFAULT_DATA, show_default=True, help=f"Labeled data: {DATASETS.choices()}.")
    return data(DATA_DIR_OPTION(command))
