"""The ``minivmm`` command line: parse, call the library, format. Nothing else."""

from __future__ import annotations

import json
import sys

import click

from . import profiles as profiles_mod
from .cpuidview import GuestCpuidView
from .errors import MinivmmError
from .vm import VM, parse_size

NOT_YET = {"migrate": "--migrate", "force": "--force", "audit": "--audit"}


class OneLineErrors(click.Group):
    """Every error is one line on stderr and exit status 2, never a traceback."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("minivmm: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            where = f"minivmm {e.ctx.command.name}" if e.ctx and e.ctx.command.name != "cli" else "minivmm"
            click.echo(f"{where}: error: {e.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"minivmm: error: {e.format_message()}", err=True)
            sys.exit(2)
        except MinivmmError as e:
            click.echo(f"minivmm: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("minivmm: interrupted", err=True)
            sys.exit(130)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def print_table(title: str, columns, rows, justify="left") -> None:
    # rich costs a tenth of a second to import: only the commands that draw pay it.
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="minivmm")
def cli():
    """minivmm: a small x86 hypervisor that shows why CPUID masking is advisory.

    Guests run on emulated host CPUs built from real CPUID dumps; every CPUID the
    guest executes exits to the VMM, which answers with the host's bits.

    \b
    Start here:
      minivmm profiles                         the host CPUs you can emulate
      minivmm run detect_cpuid --host penryn   run a shipped guest
      minivmm cpuid nehalem --format raw       what a guest's CPUID would return
    """


@cli.command()
@click.argument("guest")
@click.option("--host", default="nehalem", show_default=True, metavar="PROFILE",
              help="Host profile to start on: a built-in name, dump:NAME, file:PATH or native.")
@click.option("--evc", metavar="MODE", help="Apply a VMware EVC mode's mask to the guest CPUID view.")
@click.option("--cpuid-mask", multiple=True, metavar="SPEC", help="A CPUID mask (repeatable).")
@click.option("--migrate", multiple=True, metavar="PROFILE@WHEN",
              help="Live-migrate at checkpoint:N, insn:N or ms:N (repeatable).")
@click.option("--force", is_flag=True, help="Migrate even when the compatibility check fails.")
@click.option("--audit", is_flag=True, help="Report instructions whose feature the CPUID view hides.")
@click.option("--memory", default="16M", show_default=True, metavar="SIZE", help="Guest RAM: 64M, 1G or bytes.")
@click.option("--max-insns", type=click.IntRange(min=1), metavar="N",
              help="Stop with 'limit' after N guest instructions (exact; slower per instruction).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop with 'limit' after this much wall time (free per instruction).")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON report on stdout.")
def run(guest, host, evc, cpuid_mask, memory, max_insns, timeout, as_json, **later):
    """Run GUEST on an emulated host and report how it ended.

    GUEST is a file (.asm/.s assembly, a flat binary or a static ELF64) or the name
    of a shipped guest. The console goes to stdout as the guest writes it; one line
    on stderr says how the run ended. The exit status is the guest's power-off
    status, 0 for hlt, 125 crashed, 126 unsupported, 124 limit, 2 bad input.

    \b
    Examples:
      minivmm run detect_cpuid --host penryn
      minivmm run guests/cpuid_dump.asm --host epyc --json
      minivmm run my_guest.bin --host dump:Xeon-E5-2650-v3 --timeout 5
    """
    for key, flag in NOT_YET.items():
        if later.get(key):
            raise MinivmmError(f"{flag} is not implemented yet in this version of minivmm")
    vm = VM(guest, host, memory=parse_size(memory), evc=evc, masks=cpuid_mask)
    sink = None if as_json else _stream_console
    result = vm.run(max_insns=max_insns, timeout=timeout, console=sink)
    if as_json:
        emit_json(result.to_dict())
    else:
        sys.stdout.flush()
        click.echo(f"minivmm: {result.stop.reason}: {result.stop.message} (host {result.host})", err=True)
    sys.exit(result.exit_code)


def _stream_console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    if data == b"\n":
        sys.stdout.buffer.flush()


@cli.command()
@click.option("--dumps", is_flag=True, help="List the real CPUID dumps usable as dump:NAME instead.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def profiles(dumps, as_json):
    """List the built-in host profiles (or, with --dumps, the real CPU dumps).

    \b
    Examples:
      minivmm profiles
      minivmm profiles --dumps --json
    """
    names = [f"dump:{n}" for n in profiles_mod.dump_names()] if dumps else profiles_mod.builtin_names()
    rows = [profiles_mod.load_profile(n).summary() for n in names]
    if as_json:
        emit_json(rows)
        return
    print_table("Real CPU dumps" if dumps else "Built-in host profiles",
                ("name", "vendor", "family/model/stepping", "CPU", "engine model", "features"),
                [(r["name"], r["vendor"], f"{r['family']:#x}/{r['model']:#x}/{r['stepping']}",
                  r["cpu"], r["engine_model"], str(r["features"])) for r in rows])


@cli.command()
@click.argument("profile")
@click.option("--evc", metavar="MODE", help="Apply a VMware EVC mode's mask.")
@click.option("--cpuid-mask", multiple=True, metavar="SPEC", help="A CPUID mask (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "raw", "json"]), default="table", show_default=True,
              help="raw is the `cpuid -1 -r` line format, to diff with the real tool.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def cpuid(profile, evc, cpuid_mask, fmt, as_json):
    """Show the CPUID a guest sees on PROFILE (the guest CPUID view).

    \b
    Examples:
      minivmm cpuid penryn
      minivmm cpuid nehalem --format raw | diff - <(cpuid -1 -r)
      minivmm cpuid dump:EPYC-7601-32-Core --format json
    """
    host = profiles_mod.load_profile(profile)
    view = GuestCpuidView.for_host(host, evc, cpuid_mask).table
    if as_json or fmt == "json":
        emit_json({"profile": host.name, "vendor": host.vendor, "cpu": host.description,
                   "leaves": [{"leaf": leaf, "subleaf": sub, "eax": a, "ebx": b, "ecx": c, "edx": d}
                              for (leaf, sub), (a, b, c, d) in view.items()]})
    elif fmt == "raw":
        click.echo("\n".join(view.raw_lines()))
    else:
        print_table(f"{host.name}: {host.description} (guest CPUID view)",
                    ("leaf", "subleaf", "eax", "ebx", "ecx", "edx"),
                    [(f"0x{leaf:08x}", f"0x{sub:02x}", *(f"0x{r:08x}" for r in regs))
                     for (leaf, sub), regs in view.items()], justify="right")


def main():
    cli()
