"""The `edgeexit` command line.

Commands live by side: `train_commands` (train, pretrain, export, static-batch, quantize, cuts,
demo; torch or onnx imported lazily, with a one-line hint when the [train] extra is missing) and
`runtime_commands` (run, info, verify, calibrate, bench, profile; torch-free), and `web_command`
(web: a bundle on a web page; torch-free). Every error the
project raises is printed as one line with its own exit code, never as a traceback (`common.Group`).
"""
from __future__ import annotations

import click

from edgeexit import __version__
from edgeexit.cli import runtime_commands, train_commands, web_command
from edgeexit.cli.common import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeexit")
def main() -> None:
    """edgeexit: early-exit CNNs for edge devices.

    \b
    Typical flow:
      edgeexit train --data digits --backbone resnet20 --out model.pt
      edgeexit export model.pt bundle/
      edgeexit run bundle/ --device cpu --data digits
    """



for _command in (*train_commands.COMMANDS, *runtime_commands.COMMANDS, *web_command.COMMANDS):
    main.add_command(_command)
