"""The ``minivmm`` command line: parse, call the library, format. Nothing else."""

from __future__ import annotations

import json
import os
import sys

import click

from . import digits
from .cpu import profiles as profiles_mod
from .errors import MinivmmError
from .files import check_output, write_atomically
from .masking import compat as compat_mod
from .masking import evc as evc_mod
from .masking import flexmigration as flex_mod
from .masking import lint as lint_mod
from .masking.formats import format_firecracker_template, format_mask, parse_mask
from .masking.view import GuestCpuidView
from .vmm import snapshot as snapshot_mod
from .vmm.migration import MAX_COUNT, POLICIES, MigrationRequest, PreCopy
from .vmm.accelerated import ACCELERATORS
from .vmm.vm import MAX_TIMEOUT, VM, boot_cr4, check_budgets


class OneLineErrors(click.Group):
    """Every error is one line on stderr and exit status 2, never a traceback."""

    def parse_args(self, ctx, args):
        # "minivmm -h run" is help on run, as "minivmm help run" (click would show the
        # top-level help and ignore the command named after it).
        if len(args) > 1 and args[0] in ctx.help_option_names:
            args = ["help", *args[1:]]
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:  # "minivmm", "minivmm mask": help, not an error
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.Abort:
            click.echo("minivmm: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "minivmm"
            click.echo(f"{where}: error: {' '.join(e.format_message().split())}", err=True)
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


class Seconds(click.ParamType):
    """A time budget: a finite number of seconds above 0 (NaN or infinity would never fire)."""
    name = "seconds"

    def convert(self, value, param, ctx):
        seconds = digits.real(value) if isinstance(value, str) else value
        try:
            check_budgets(None, seconds)
        except MinivmmError:
            seconds = None
        if seconds is None:
            self.fail(f"{value!r} is not a number of seconds above 0 and at most {MAX_TIMEOUT:g}", param, ctx)
        return float(seconds)


class Whole(click.IntRange):
    """click's IntRange over ASCII digits only: click reads numbers with int(), which
    takes '１６' and '١٦' too."""
    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and digits.integer(value) is None:
            self.fail(f"{value!r} is not a whole number in ASCII digits", param, ctx)
        return super().convert(value, param, ctx)


SECONDS = Seconds()
INSTRUCTIONS = Whole(1, MAX_COUNT)
MAX_JOBS = 4 * (os.cpu_count() or 1)   # emulation is CPU-bound: more workers than this only queue


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _terminal_width() -> int:
    from rich.console import Console
    return Console().width


def print_table(title: str, columns, rows, justify="left", names=1) -> None:
    """A table readable at 80 columns: the first ``names`` columns hold what people copy
    (profile names, EVC modes), so they are never cut; other columns wrap."""
    # rich costs a tenth of a second to import: only the commands that draw pay it.
    from rich.console import Console
    from rich.table import Table
    rows = [tuple(row) for row in rows]
    table = Table(title=title)
    for i, column in enumerate(columns):
        if i < names:
            width = max([len(column)] + [len(row[i]) for row in rows])
            table.add_column(column, justify=justify, no_wrap=True, min_width=width)
        else:
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
      minivmm demo                             the whole EVC story, told by real runs
      minivmm profiles                         the host CPUs you can emulate
      minivmm run detect_cpuid --host penryn   run a shipped guest
      minivmm cpuid nehalem --format raw       what a guest's CPUID would return
      minivmm compare detect_both --hosts core2,penryn,nehalem --evc intel-merom
      minivmm matrix my_guest.elf --hosts all --junit out.xml
      minivmm help run                         a command's options, with examples
      minivmm docs                             the reference: ABI, CLI, Python API
    """


@cli.command("help")
@click.argument("names", nargs=-1, metavar="[COMMAND]...")
@click.pass_context
def help_command(ctx, names):
    """Show the help of COMMAND (a group's command too), or of minivmm itself.
    The same as COMMAND --help, or -h.

    \b
    Examples:
      minivmm help run
      minivmm help mask convert
      minivmm -h run
    """
    target = ctx.find_root()
    for name in names:
        command = target.command.get_command(target, name) if isinstance(target.command, click.Group) else None
        if command is None:
            raise click.UsageError(f"no command '{' '.join([target.command_path, name])}' (see 'minivmm help"
                                   f"{target.command_path.removeprefix('minivmm')}')", ctx)
        target = click.Context(command, info_name=name, parent=target, **command.context_settings)
    click.echo(target.get_help())


@cli.command()
@click.argument("topic", required=False)
def docs(topic):
    """Print the reference that comes with minivmm: the page of TOPIC, or without one
    the topics (the guest ABI, the command line, the Python API, masks ...). The pages
    are Markdown, the docs/ directory of the source.

    \b
    Examples:
      minivmm docs
      minivmm docs cli
      minivmm docs api | less
    """
    from . import reference
    if topic is not None:
        click.echo(reference.text(topic), nl=False)
        return
    found = reference.topics()
    width = max(map(len, found))
    click.echo("minivmm docs TOPIC prints one of:")
    for name, title in found.items():
        click.echo(f"  {name:<{width}}  {title}")


@cli.command()
@click.argument("guest")
@click.argument("args", nargs=-1, metavar="[-- ARGS...]")
@click.option("--linux", is_flag=True, default=None,
              help="Run GUEST as a Linux program (chosen by itself for an ELF with PT_INTERP, PT_TLS "
                   "or the GNU/Linux OS ABI).")
@click.option("--env", multiple=True, metavar="K=V", help="A Linux program's environment (repeatable; "
              "default: PATH, HOME, LANG, TERM).")
@click.option("--seed", type=Whole(0, 2**64 - 1), default=0, show_default=True,
              help="Seed of a Linux program's AT_RANDOM bytes, getrandom and /dev/urandom, and of "
                   "where its threads' time slices end (the same seed, the same interleaving).")
@click.option("--mount", multiple=True, metavar="HOST[:GUEST]",
              help="Show a file or directory of this machine to a Linux program, read-only, at GUEST "
                   "(default: the same path; repeatable). --mount / shows the whole machine, which "
                   "dynamically linked programs need for their libraries.")
@click.option("--realtime", is_flag=True,
              help="A Linux program reads the machine's clock (default: virtual time, reproducible).")
@click.option("--host", metavar="PROFILE",
              help="Host profile to start on: a built-in name, dump:NAME, file:PATH or native "
                   "(default: nehalem; native under --accel native).")
@click.option("--evc", metavar="MODE", help="Apply a VMware EVC mode's mask to the guest CPUID view.")
@click.option("--cpuid-mask", multiple=True, metavar="MASK",
              help="A CPUID mask in any format (repeatable; see 'minivmm mask --help').")
@click.option("--migrate", multiple=True, metavar="PROFILE@WHEN",
              help="Live-migrate at checkpoint:N, insn:N, ms:N or (Linux programs) syscall:N (repeatable); "
                   "PROFILE tcp:ADDR:PORT sends the VM to a 'minivmm receive' there.")
@click.option("--secret-file", metavar="FILE", help="The secret shared with the receivers of --migrate tcp:.")
@click.option("--force", is_flag=True, help="Migrate even when the compatibility check fails (VMware's override).")
@click.option("--cold", is_flag=True, help="Migrations power the VM off and boot it on the destination.")
@click.option("--stop-and-copy", is_flag=True,
              help="Switch hosts exactly at WHEN (no iterative pre-copy while the guest runs).")
@click.option("--migration", "policy", type=click.Choice(POLICIES), default="live", show_default=True,
              help="The VM's migration policy: offline allows only --cold, disabled refuses all.")
@click.option("--snapshot-at", metavar="WHEN", help="Save a snapshot at checkpoint:N, insn:N, ms:N or (Linux programs) syscall:N.")
@click.option("--snapshot-file", metavar="FILE", help="Where --snapshot-at writes the snapshot.")
@click.option("--audit", is_flag=True, help="Report instructions whose feature the CPUID view hides.")
@click.option("--syscalls", is_flag=True,
              help="List where a Linux program's system calls fall (per name: calls, first, last), to "
                   "choose N for syscall:N.")
@click.option("--memory", metavar="SIZE",
              help="Guest RAM: 64M, 1G or bytes (2M to 4G). Default: what the guest declares, else 16M.")
@click.option("--max-insns", type=INSTRUCTIONS, metavar="N",
              help="Stop with 'limit' after N guest instructions (exact; slower per instruction).")
@click.option("--timeout", type=SECONDS, metavar="SECONDS",
              help="Stop with 'limit' after this much wall time (free per instruction).")
@click.option("--accel", type=click.Choice(ACCELERATORS), default="tcg", show_default=True,
              help="tcg: the emulation engine runs the host profile. kvm: this machine's own CPU runs the "
                   "guest (--host native; --evc and --cpuid-mask may only hide features), CPUID answered "
                   "from the view's table, as QEMU's -accel kvm -cpu host,-FEATURE. native: a Linux program "
                   "runs as a process of this machine, its CPUID, /proc/cpuinfo and AT_HWCAP answered from "
                   "the view by a ptrace supervisor (CPUID faulting; docs/accel.md).")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON report on stdout.")
def run(guest, args, linux, env, seed, mount, realtime, host, evc, cpuid_mask, migrate, secret_file, force, cold,
        stop_and_copy, policy, snapshot_at, snapshot_file, audit, syscalls, memory, max_insns, timeout, accel, as_json):
    """Run GUEST on an emulated host and report how it ended.

    GUEST is a file (.asm/.s assembly, a flat binary or a static ELF64) or the name
    of a shipped guest (the guest ABI: docs/abi.md), or an x86-64 Linux program
    (static, static-pie, or dynamic with --mount /) with its ARGS after --
    (docs/linux.md); its stdin is this command's, its stdout the console, its stderr
    goes to stderr, and a fatal signal exits 128+N (132 for SIGILL). The console goes to stdout as
    the guest writes it; one line on stderr says how the run ended. The exit status
    is the guest's power-off status, 0 for hlt, 125 crashed, 126 unsupported, 124
    limit, 2 bad input (docs/cli.md; the --json report: docs/report.schema.json).

    \b
    Examples:
      minivmm run detect_cpuid --host penryn
      minivmm run guests/cpuid_dump.asm --host epyc --json
      minivmm run my_guest.bin --host dump:Xeon-E5-2650-v3 --timeout 5
      minivmm run ./a.out --host penryn --evc intel-merom -- --verbose
      minivmm run ./a.out --syscalls                  # then: --migrate penryn@syscall:N
      minivmm run /usr/bin/sha256sum --mount / --host penryn -- /etc/hostname
      minivmm run detect_extended --host native --accel kvm --cpuid-mask=-sse4a
      minivmm run ./a.out --accel native --evc intel-penryn
      minivmm run dispatch_cpuid --host nehalem --migrate tcp:10.0.0.7:4444@checkpoint:1 --secret-file s.key
    """
    for item in env:
        if "=" not in item:
            raise MinivmmError(f"--env {item!r}: expected NAME=VALUE")
    vm = VM(guest, host, memory=memory, evc=evc, masks=cpuid_mask, policy=policy,
            linux=linux, argv=args, env=list(env) if env else None, seed=seed, mounts=mount, realtime=realtime,
            stdin=_stdin_fd(), terminal=sys.stdout.isatty() and not as_json, accel=accel)
    _report(vm, as_json, syscalls, max_insns=max_insns, timeout=timeout, audit=audit, force=force,
            migrations=[MigrationRequest.parse(m, cold) for m in migrate],
            snapshot_at=snapshot_at, snapshot_file=snapshot_file,
            precopy=PreCopy(enabled=not stop_and_copy), secret=_secret(secret_file))


def _secret(path: str | None) -> bytes | None:
    from .vmm.wire import read_secret
    return None if path is None else read_secret(path)


def _stdin_fd() -> int | None:
    """This command's standard input, passed through to a Linux program (if it has one)."""
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):
        return None


def _report(vm, as_json, syscalls=False, **options):
    """Run, then print the console/report the documented way (docs/cli.md) and exit with the run's code;
    ``syscalls``: and where the system calls fell."""
    sys.exit(_run_and_print(vm, as_json, syscalls, **options))


def _run_and_print(vm, as_json, syscalls=False, **options) -> int:
    """Run, print as :func:`_report` does, and return the run's exit code."""
    sink = None if as_json else _stream_console
    result = vm.run(console=sink, **options)
    if as_json:
        emit_json(result.to_dict())
    else:
        sys.stdout.flush()
        _end_line(result.console, sys.stdout.isatty() and sys.stderr.isatty())  # one terminal shows both
        if result.stderr:
            sys.stderr.write(result.stderr)
            _end_line(result.stderr, True)  # the program's standard error and minivmm's lines share stderr
        for entry in result.audit:
            click.echo(f"minivmm: audit: {entry['rip']:#x} {entry['instruction']} needs "
                       f"{', '.join(entry['features'])}, hidden from the guest's CPUID "
                       f"(reached {entry['count']}x{' or more' if entry.get('more') else ''})", err=True)
        for m in result.migrations:
            verdict = "migrated" if m["ok"] else "refused" if m["refused"] else "did not migrate"
            rounds = f"{m['rounds']} round{'' if m['rounds'] == 1 else 's'}"
            detail = f"{m['mode']}, {rounds}, downtime {m['downtime_ms']} ms" if m["ok"] else m.get("reason", "")
            forced = " (forced past the compatibility check)" if m["forced"] else ""
            click.echo(f"minivmm: {verdict} {m['from']} -> {m['to']} at {m['when']}{forced}: {detail}", err=True)
        for saved in result.snapshots:
            click.echo(f"minivmm: did not save a snapshot at {saved['when']} on {saved['host']}: {saved['refused']}"
                       if "refused" in saved else
                       f"minivmm: saved a snapshot at {saved['when']} on {saved['host']} to {saved['file']}", err=True)
        for point in result.unreached:
            what = f"migration to {point['to']}" if point["event"] == "migration" else f"snapshot to {point['file']}"
            made = f", after {result.syscalls['total']} system calls" if result.syscalls else ""
            click.echo(f"minivmm: never reached: {what} at {point['when']} (the run ended first{made})", err=True)
        if syscalls:
            _print_syscalls(result)
        click.echo(f"minivmm: {result.stop.reason}: {result.stop.message} (host {result.host})", err=True)
    return result.exit_code


def _print_syscalls(result) -> None:
    if result.syscalls is None:
        click.echo("minivmm: no system calls: not a Linux program", err=True)
        return
    places, total = result.syscall_places, result.syscalls["total"]
    kept = f"; the first {len(result.syscalls['sample'])} of {total}" if total > len(result.syscalls["sample"]) else ""
    click.echo(f"minivmm: {total} system calls{kept} (syscall:N is right after call #N); per name: calls, "
               f"#first..#last", err=True)
    width = max((len(str(p["name"])) for p in places), default=0)
    for p in places:
        span = f"#{p['first']}" + (f"..#{p['last']}" if p["last"] != p["first"] else "")
        click.echo(f"  {p['name']!s:<{width}} {p['calls']:>5}  {span}", err=True)


def _end_line(text: str, shared: bool) -> None:
    """When ``text`` ended mid-line where minivmm's lines follow it (``shared``), end
    that line, so that they start lines of their own ("H" then "minivmm: limit: ...").
    A console piped elsewhere gets its bytes as they are."""
    if shared and text and not text.endswith("\n"):
        sys.stderr.write("\n")


def _stream_console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    if data == b"\n":
        sys.stdout.buffer.flush()


@cli.group(invoke_without_command=True)
@click.option("--dumps", is_flag=True, help="List the real CPUID dumps usable as dump:NAME instead.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def profiles(context, dumps, as_json):
    """List the built-in host profiles (or, with --dumps, the real CPU dumps);
    capture this machine's CPUID as a profile, or diff two profiles.

    \b
    Examples:
      minivmm profiles
      minivmm profiles --dumps --json
      minivmm profiles capture this-host.txt     # then: --host file:this-host.txt
      minivmm profiles diff file:a.txt file:b.txt
    """
    if context.invoked_subcommand is not None:
        return
    names = [f"dump:{n}" for n in profiles_mod.dump_names()] if dumps else profiles_mod.builtin_names()
    rows = [profiles_mod.load_profile(n).summary() for n in names]
    if as_json:
        emit_json(rows)
        return
    columns = ("name", "vendor", "CPU", "features", "family/model/stepping", "engine model")
    table = [(r["name"], r["vendor"], r["cpu"], str(r["features"]), f"{r['family']:#x}/{r['model']:#x}/{r['stepping']}",
              r["engine_model"]) for r in rows]
    wide = _terminal_width() >= 120  # on 80 columns: the essentials; the rest in --json
    print_table("Real CPU dumps" if dumps else "Built-in host profiles", columns if wide else columns[:4],
                table if wide else [row[:4] for row in table])


@profiles.command("capture")
@click.argument("file", metavar="FILE")
def profiles_capture(file):
    """Write this machine's CPUID (every leaf and subleaf, in `cpuid -1 -r`'s lines)
    to FILE, for use as --host file:FILE here or anywhere: a host's fingerprint.

    \b
    Example:
      minivmm profiles capture host-a.txt && minivmm profiles diff file:host-a.txt native
    """
    table = profiles_mod.load_profile("native").cpuid
    check_output(file, "profile file", [])
    write_atomically(file, "\n".join(table.raw_lines()) + "\n", "profile file")
    click.echo(f"minivmm: wrote {len(table.raw_lines()) - 1} CPUID leaves of this machine to {file} "
               f"(use it as --host file:{file})", err=True)


@profiles.command("diff")
@click.argument("first", metavar="A")
@click.argument("second", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def profiles_diff(first, second, as_json):
    """The features host A reports and B lacks, those B reports and A lacks, and
    the EVC modes each can run: drift between "identical" hosts, found before a
    migration fails. Exit 0 if they report the same features, 1 if not.

    \b
    Example:
      minivmm profiles diff file:rack1-host3.txt file:rack1-host4.txt
    """
    from .masking.compat import diff_profiles
    a, b = profiles_mod.load_profile(first), profiles_mod.load_profile(second)
    data = diff_profiles(a, b)
    if as_json:
        emit_json(data)
    else:
        for side, other, key in ((a, b, "only_a"), (b, a, "only_b")):
            click.echo(f"{side.name} has, {other.name} lacks: {', '.join(data[key]) or '-'}")
        for side, key in ((a, "evc_a"), (b, "evc_b")):
            click.echo(f"EVC modes {side.name} can run: {', '.join(data[key]) or '-'}")
    sys.exit(0 if not data["only_a"] and not data["only_b"] else 1)


@cli.command()
@click.argument("profile")
@click.option("--evc", metavar="MODE", help="Apply a VMware EVC mode's mask.")
@click.option("--cpuid-mask", multiple=True, metavar="MASK", help="A CPUID mask (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "raw", "json"]), default="table", show_default=True,
              help="raw is the `cpuid -1 -r` line format, to diff with the real tool.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def cpuid(profile, evc, cpuid_mask, fmt, as_json):
    """Show the CPUID a guest sees on PROFILE at boot (the guest CPUID view):
    the host's table through the masks, the hypervisor bit, APIC IDs 0, OSXSAVE as the
    boot CR4 sets it, and minivmm's leaf 0x40000000.

    \b
    Examples:
      minivmm cpuid penryn
      minivmm cpuid nehalem --format raw | diff - <(cpuid -1 -r)
      minivmm cpuid dump:EPYC-7601-32-Core --format json
    """
    host = profiles_mod.load_profile(profile)
    guest_view = GuestCpuidView.for_host(host, evc, cpuid_mask)
    view = guest_view.seen_with(boot_cr4(guest_view))
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


def _profiles(names):
    return [profiles_mod.load_profile(n) for n in names]


@cli.command()
@click.argument("profiles", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def baseline(profiles, as_json):
    """What a cluster of PROFILES can present: common features, EVC mode, levelling masks.

    The common feature set is what every host physically has (as `virsh
    cpu-baseline`); the EVC mode is the richest one every host supports; each host's
    mask hides what it has beyond the baseline.

    \b
    Examples:
      minivmm baseline penryn nehalem westmere
      minivmm baseline dump:EPYC-7601-32-Core dump:EPYC-7502-32-Core --json
    """
    result = compat_mod.baseline(_profiles(profiles))
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"hosts: {', '.join(result.hosts)}")
    click.echo(f"highest common EVC mode: {result.evc.key if result.evc else 'none'}")
    import textwrap
    click.echo(textwrap.fill(f"common features ({len(result.features)}): {' '.join(sorted(result.features))}",
                             width=80, subsequent_indent="  ", break_on_hyphens=False))
    for host, mask in result.masks.items():
        click.echo(f"levelling mask for {host}: {format_mask(mask, 'features') or '(none needed)'}")


@cli.command()
@click.argument("source")
@click.argument("destination")
@click.option("--evc", metavar="MODE", help="The VM runs under this EVC mode.")
@click.option("--cpuid-mask", multiple=True, metavar="MASK", help="A CPUID mask of the VM (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(source, destination, evc, cpuid_mask, as_json):
    """Can a VM powered on on SOURCE live-migrate to DESTINATION?

    Prints IDENTICAL (the destination presents the same features), SUPERSET (it
    has more: the VM keeps its view and moves) or INCOMPATIBLE, with the features
    that block the move. Exit status 0 when the VM can move, 1 when it cannot.

    SOURCE may also be a VM that ran: a snapshot, or a run's --json report. The
    answer then has three levels: its view (as above), the feature bits it read from
    CPUID (it depends on each), and the gated features it executed that its view
    hides (with --audit): a VM that executed a masked instruction is UNSAFE on a host
    without it, though its view matches.

    \b
    Examples:
      minivmm check nehalem penryn                     # INCOMPATIBLE: sse4_2 popcnt rdtscp
      minivmm check nehalem penryn --evc intel-penryn  # IDENTICAL
      minivmm run my_guest --host nehalem --evc intel-penryn --audit --json > ran.json
      minivmm check ran.json penryn                    # UNSAFE if it executed popcnt
    """
    if os.path.isfile(source):
        _check_what_ran(source, profiles_mod.load_profile(destination), as_json)
        return
    src, dst = _profiles((source, destination))
    result = compat_mod.compare(src, dst, evc, cpuid_mask)
    if as_json:
        emit_json({"source": src.name, "destination": dst.name, "evc": evc, **result.to_dict()})
    else:
        click.echo(result.verdict)
        if result.blocking:
            click.echo(f"blocking features (the VM sees them, {dst.name} lacks them): "
                       f"{' '.join(sorted(result.blocking))}")
        for mark in result.marks:
            click.echo(f"blocking mark: {mark}")
    sys.exit(0 if result.can_migrate else 1)


MAX_REPORT = 256 << 20   # a run's --json report: its console (16 MiB), stderr (16 MiB), logs and audit, with room


def _check_what_ran(path: str, destination, as_json: bool) -> None:
    """``check`` of a snapshot or a report: the view, what was read, what was executed."""
    from .cpu.features import catalogue
    from .files import read_bytes
    try:
        with open(path, "rb") as f:   # (a regular file: the caller checked)
            magic = f.read(len(snapshot_mod.MAGIC))
    except OSError as e:
        raise MinivmmError(f"cannot read {path}: {e.strerror}") from None
    if magic == snapshot_mod.MAGIC:
        snap = snapshot_mod.load(path)
        view, observed = catalogue().decode(snap.view_table), snap.meta.get("observed")
    else:
        try:
            report = json.loads(read_bytes(path, "report", MAX_REPORT))
            view, observed = report["view_features"], report["observed"]
            ok = isinstance(view, list) and all(isinstance(f, str) for f in view) and all(
                isinstance(observed[k], list) and all(isinstance(f, str) for f in observed[k])
                for k in ("read", "executed")) and isinstance(observed["audited"], bool)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise MinivmmError(f"{path}: neither a snapshot nor a run's --json report (with view_features and "
                               f"observed)")
    observed = observed or {"read": [], "executed": [], "audited": False}
    result = compat_mod.observed_check(view, observed, destination)
    if as_json:
        emit_json({"source": path, **result})
    else:
        name = destination.name
        click.echo(f"view: {'blocked by ' + ' '.join(result['view']) if result['view'] else 'compatible'} "
                   f"(the features it was powered on with, which {name} must have)")
        click.echo(f"read: {' '.join(result['read_features']) or '-'}; {name} lacks: {' '.join(result['read']) or '-'}"
                   f" (a feature bit read is a dependency, used or not)")
        if not result["audited"]:
            click.echo("executed: not audited (run with --audit to know what it executed beyond its view)")
        else:
            click.echo(f"executed beyond its view: {' '.join(result['executed_hidden']) or '-'}; {name} lacks: "
                       f"{' '.join(result['executed']) or '-'}" + (
                           " (the EVC hazard: masked, yet executed)" if result["executed"] else ""))
        click.echo(result["verdict"])
    sys.exit(0 if result["verdict"] == "COMPATIBLE" else 1)


@cli.group()
def evc():
    """VMware EVC modes: named baselines that a whole cluster presents."""


@evc.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evc_list(as_json):
    """List the EVC modes (VMware's keys) in order, per vendor: each one's features
    (its parent mode's and what it adds) and the source they rest on, documented by
    VMware or inferred from a real CPU's dump (dump:NAME, also a --host).

    \b
    Examples:
      minivmm evc list
      minivmm evc list --json      # with the sources' addresses and every feature
    """
    modes = list(evc_mod.evc_modes().values())
    if as_json:
        emit_json([_mode_dict(m) for m in modes])
        return
    print_table("EVC modes", ("mode", "features", "source"),
                [(m.key, " ".join([f"{m.parent} +"] * bool(m.parent) + sorted(m.added)),
                  f"{m.confidence}: {m.source_name}") for m in modes])


@evc.command("show")
@click.argument("mode")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evc_show(mode, as_json):
    """Show one EVC MODE: its features, source, and the built-in hosts that can run it.

    \b
    Example:
      minivmm evc show intel-penryn
    """
    m = evc_mod.evc_mode(mode)
    hosts = [p.name for p in profiles_mod.builtin_profiles() if m.supported_by(p)]
    if as_json:
        emit_json({**_mode_dict(m), "hosts": hosts})
        return
    click.echo(f"{m.key} ({m.vendor}, order {m.order}, parent {m.parent or 'none'}, {m.confidence})")
    click.echo(f"source: {m.source}")
    click.echo(f"features ({len(m.features)}): {' '.join(sorted(m.features))}")
    click.echo(f"built-in hosts that can run it: {' '.join(hosts) or 'none'}")


def _mode_dict(m):
    return {"mode": m.key, "vendor": m.vendor, "order": m.order, "parent": m.parent,
            "added": sorted(m.added), "features": sorted(m.features), "source": m.source,
            "source_name": m.source_name, "confidence": m.confidence}


@cli.group()
def mask():
    """CPUID masks: convert between formats, lint, explain, and see them as MSRs.

    \b
    Formats (docs/masks.md):
      Firecracker  0x1:ecx=0bxxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxx   (or a CPU template .json)
      VMware       cpuid.1.ecx=----:----:---0:----:----:----:----:----
      Xen          1:ecx=xxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxx
      features     -sse4_1,-popcnt,+lahf_lm
      EVC          evc:intel-penryn
    On run and cpuid, write a mask that starts with '-' as --cpuid-mask=-sse4_1.
    """


class MaskCommand(click.Command):
    """"-sse4_1,-popcnt" is a mask, not options, and "-h" inside "-shstk" must not mean
    --help; "-h" alone is help, as on every command (no feature is named "h")."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, ["--help" if arg == "-h" else arg for arg in args])


MASK_ARGUMENTS = {"ignore_unknown_options": True, "help_option_names": ["--help"]}


@mask.command("convert", cls=MaskCommand, context_settings=MASK_ARGUMENTS)
@click.argument("spec", metavar="MASK")
@click.option("--to", "fmt", type=click.Choice(["firecracker", "vmware", "xen", "features", "firecracker-json"]),
              required=True, help="Target format.")
def mask_convert(spec, fmt):
    """Write MASK in another format, exactly (or refuse, naming what cannot be written).

    \b
    Examples:
      minivmm mask convert -sse4_1,-popcnt --to vmware
      minivmm mask convert 'cpuid.1.ecx=----:----:---0:----:----:----:----:----' --to xen
    """
    parsed = parse_mask(spec)
    click.echo(format_firecracker_template(parsed) if fmt == "firecracker-json" else format_mask(parsed, fmt))


@mask.command("lint", cls=MaskCommand, context_settings=MASK_ARGUMENTS)
@click.argument("spec", metavar="MASK")
@click.option("--host", metavar="PROFILE", help="Also check the mask on this host.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mask_lint(spec, host, as_json):
    """Report inconsistencies in MASK; exit 1 if there are any.

    Shown features whose requirements are hidden (avx2 without avx), a maximum leaf
    clamped below leaves that still advertise features, leaves or features of the
    other vendor.

    \b
    Example:
      minivmm mask lint -avx,+avx2 --host haswell
    """
    problems = lint_mod.lint(parse_mask(spec), profiles_mod.load_profile(host) if host is not None else None)
    if as_json:
        emit_json({"mask": spec, "problems": problems})
    else:
        click.echo("\n".join(problems) if problems else "no problems found")
    sys.exit(1 if problems else 0)


@mask.command("msr", cls=MaskCommand, context_settings=MASK_ARGUMENTS)
@click.argument("spec", metavar="MASK")
@click.option("--host", metavar="PROFILE", required=True, help="The host whose masking MSRs to use.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mask_msr(spec, host, as_json):
    """The FlexMigration / Extended Migration MSR values that express MASK on HOST.

    Bits the host's MSRs cannot express are listed: they need CPUID faulting or a
    CPUID-exiting hypervisor like minivmm.

    \b
    Examples:
      minivmm mask msr -sse4_1 --host penryn
      minivmm mask msr evc:amd-greyhound-no3dnow --host opteron-g3
    """
    view = flex_mod.msr_view(parse_mask(spec), profiles_mod.load_profile(host))
    if as_json:
        emit_json(view.to_dict())
        return
    kind = "value replaces CPUID's answer" if view.replaces else "AND mask: 1 passes the bit, 0 hides it"
    for msr, value in view.values:
        click.echo(f"wrmsr {msr.index:#x} {value:#018x}   # {msr.name} ({kind})")
    for line in view.unmaskable:
        click.echo(f"cannot mask: {line}")


@mask.command("explain", cls=MaskCommand, context_settings=MASK_ARGUMENTS)
@click.argument("specs", metavar="MASK...", nargs=-1)
@click.option("--host", metavar="PROFILE", required=True, help="The host the VM runs on.")
@click.option("--evc", metavar="MODE", help="The VM's EVC mode (applied first).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mask_explain(specs, host, evc, as_json):
    """For each CPUID bit the guest sees differently from HOST, the rule that changed it.

    \b
    Example:
      minivmm mask explain -xsave --host sandybridge
    """
    changes = lint_mod.explain(specs, profiles_mod.load_profile(host), evc)
    if as_json:
        emit_json([c.to_dict() for c in changes])
        return
    for c in changes:
        click.echo(f"{c.name}: host {c.host} -> guest {c.guest}: {c.rule}")


@cli.command()
@click.argument("snapshot_file", metavar="SNAPSHOT")
@click.option("--host", metavar="PROFILE", help="The host to resume on (default: the one it was saved on).")
@click.option("--mount", multiple=True, metavar="HOST[:GUEST]",
              help="What a Linux program sees of this machine, read-only, as for run (repeatable): the "
                   "snapshot's mounts and open files must be among them.")
@click.option("--force", is_flag=True, help="Resume even if the host lacks features of the VM's CPUID view.")
@click.option("--migrate", multiple=True, metavar="PROFILE@WHEN",
              help="Live-migrate later (repeatable; tcp:ADDR:PORT@WHEN to a 'minivmm receive').")
@click.option("--secret-file", metavar="FILE", help="The secret shared with the receivers of --migrate tcp:.")
@click.option("--audit", is_flag=True, help="Report instructions whose feature the CPUID view hides.")
@click.option("--syscalls", is_flag=True, help="List where a Linux program's system calls fall, as for run.")
@click.option("--max-insns", type=INSTRUCTIONS, metavar="N", help="Instruction budget.")
@click.option("--timeout", type=SECONDS, metavar="SECONDS", help="Time budget.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON report on stdout.")
def resume(snapshot_file, host, mount, force, migrate, secret_file, audit, syscalls, max_insns, timeout, as_json):
    """Resume the VM saved in SNAPSHOT on HOST, as it was (its CPUID view included).
    A Linux program sees only what --mount grants, and the snapshot is refused, naming
    the --mount it lacks, when its mounts or open files are not all granted.

    \b
    Examples:
      minivmm run dispatch_cpuid --host penryn --snapshot-at checkpoint:1 --snapshot-file vm.snap
      minivmm resume vm.snap --host nehalem
      minivmm resume vm.snap                 # on the host it was saved on
      minivmm resume prog.snap --mount /data:/in
    """
    vm = VM.resume(snapshot_mod.load(snapshot_file), host, force=force, mounts=mount)
    _report(vm, as_json, syscalls, max_insns=max_insns, timeout=timeout, audit=audit, force=force,
            migrations=[MigrationRequest.parse(m) for m in migrate], secret=_secret(secret_file))


@cli.command()
@click.option("--listen", "address", required=True, metavar="ADDR:PORT",
              help="Where to wait for VMs (port 0: any free port, printed on stderr).")
@click.option("--host", required=True, metavar="PROFILE", help="The host this receiver is: the VMs run on it.")
@click.option("--secret-file", required=True, metavar="FILE",
              help="The secret a source must prove it shares (at least 16 bytes) before anything crosses.")
@click.option("--evc", metavar="MODE", help="The EVC mode of this host's cluster: VMs whose view exceeds it are refused.")
@click.option("--once", is_flag=True, help="Exit after the first VM that arrives, with its status.")
@click.option("--force", is_flag=True, help="Take VMs whose CPUID view this host lacks (VMware's override).")
@click.option("--mount", multiple=True, metavar="HOST[:GUEST]", help="What a Linux program that arrives sees, as for resume.")
@click.option("--migrate", multiple=True, metavar="PROFILE@WHEN",
              help="Move each VM on from here, as for run (tcp:ADDR:PORT@WHEN with this secret).")
@click.option("--timeout", type=SECONDS, metavar="SECONDS", help="Time budget of each VM's run here.")
@click.option("--json", "as_json", is_flag=True, help="Print each arrived VM's JSON report on stdout.")
def receive(address, host, secret_file, evc, once, force, mount, migrate, timeout, as_json):
    """Receive VMs that other minivmm processes migrate live (run --migrate
    tcp:ADDR:PORT@WHEN), as the host PROFILE, and run them.

    The source proves it holds the shared secret, and this receiver that it does,
    before any VM state crosses. Each VM is checked as VirtualCenter checks a vMotion,
    against this host (and --evc): a VM it cannot run is refused, and its source keeps
    it. Once a VM has arrived it runs here, its console on stdout, one line on stderr
    when it ends. A conversation that fails leaves this receiver waiting for the next.

    \b
    Examples:
      minivmm receive --listen 0.0.0.0:4444 --host penryn --secret-file s.key --once
      minivmm run dispatch_cpuid --host nehalem --evc intel-penryn --secret-file s.key \\
          --migrate tcp:127.0.0.1:4444@checkpoint:1
    """
    from .cpu.profiles import load_profile
    from .masking.evc import evc_mode
    from .vmm import remote
    secret, profile = _secret(secret_file), load_profile(host)
    if evc is not None and not evc_mode(evc).supported_by(profile):
        raise MinivmmError(f"--evc {evc}: {profile.name} cannot present this EVC mode")
    migrations = [MigrationRequest.parse(m) for m in migrate]
    destination = remote.Destination(profile, evc, secret, lambda snapshot: VM.resume(
        snapshot, profile, force=force, **({"mounts": mount} if snapshot.process is not None else {})))
    with remote.listen(address) as server:
        bound = server.getsockname()
        click.echo(f"minivmm: receiving VMs on {bound[0]}:{bound[1]} as {profile.name}"
                   f"{f' (EVC mode {evc})' if evc else ''}", err=True)
        receiving = remote.Receiving(server, destination)
        while True:
            vm, peer = receiving.next_vm(lambda peer, why: click.echo(
                f"minivmm: refused a migration from {peer}: {why}", err=True))
            click.echo(f"minivmm: a VM arrived from {peer}: {vm.image.name}", err=True)
            code = _run_and_print(vm, as_json, timeout=timeout, force=force, migrations=migrations, secret=secret)
            if once:
                sys.exit(code)
            receiving.done()


@cli.group()
def snapshot():
    """Snapshots of running VMs (written by run --snapshot-at)."""


@snapshot.command("inspect")
@click.argument("snapshot_file", metavar="SNAPSHOT")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def snapshot_inspect(snapshot_file, as_json):
    """Check SNAPSHOT (every section's checksum) and say what it holds.

    \b
    Example:
      minivmm snapshot inspect vm.snap
    """
    summary = snapshot_mod.load(snapshot_file).summary()
    if as_json:
        emit_json(summary)
        return
    for key, value in summary.items():
        click.echo(f"{key}: {_plain(key, value)}")


def _plain(key: str, value) -> str:
    """A value as a person reads it: addresses in hex, lists joined, no Python reprs."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, int) and key in ("entry", "rip", "xcr0"):
        return f"{value:#x}"
    if isinstance(value, int) and key == "memory":
        return f"{value >> 20} MiB" if value % (1 << 20) == 0 else f"{value} bytes"
    return str(value)


@cli.command()
@click.argument("guests", nargs=-1, required=True, metavar="GUEST...")
@click.option("--hosts", metavar="all|A,B",
              help="Host profiles to run on, as for matrix (default: all; native under --accel kvm or native).")
@click.option("--evc", metavar="MODE", help="Run every VM under this EVC mode.")
@click.option("--cpuid-mask", multiple=True, metavar="MASK", help="A CPUID mask for every VM (repeatable).")
@click.option("--accel", type=click.Choice(ACCELERATORS), default="tcg", show_default=True,
              help="What runs each guest, as for run: native runs Linux programs on this machine's own CPU.")
@click.option("--migrate-to", metavar="PROFILE", help="Also migrate each VM to PROFILE at its first checkpoint.")
@click.option("--force", is_flag=True, help="Force those migrations past the compatibility check.")
@click.option("--html", "html_file", metavar="FILE",
              help="Also write the matrix as a self-contained HTML page.")
@click.option("--timeout", type=SECONDS, default=60, show_default=True,
              metavar="SECONDS", help="Time budget of each run.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(guests, hosts, evc, cpuid_mask, accel, migrate_to, force, html_file, timeout, as_json):
    """Run each GUEST on each host and compare, per feature, what the host has
    (physical), what CPUID tells the guest, what its probe found and which path it
    used; with --migrate-to, what happened to that choice after a live migration.

    Guests report through detection lines (FEATURE: cpuid=.. probe=.. uses=..).

    \b
    Highlighted cells end with a mark, so they read without colour too:
      *  masked but executable: CPUID hides what the host runs (yellow)
      !  advertised but #UD: CPUID shows it, the probe faulted (red)
      +  advertised but absent: CPUID shows what the host lacks (red)
    After a migration: crashes in red, refused migrations in orange.

    \b
    Examples:
      minivmm compare detect_both --hosts core2,penryn,nehalem --evc intel-merom
      minivmm compare dispatch_cpuid dispatch_ud --hosts penryn --evc intel-merom --migrate-to core2
      minivmm compare detect_both --hosts all --html matrix.html
      minivmm compare ./detect_both --accel native --evc intel-penryn
    """
    from .teaching.compare import compare as run_comparison
    if html_file is not None:
        check_output(html_file, "--html file", guests)
    if hosts is None:
        hosts = "all" if accel == "tcg" else "native"
    comparison = run_comparison(guests, profiles_mod.host_names(hosts), evc=evc, masks=cpuid_mask, migrate_to=migrate_to,
                                timeout=timeout, force=force, accel=accel)
    if html_file is not None:
        from .teaching.html import comparison_page
        write_atomically(html_file, comparison_page(comparison), "HTML page")
    if as_json:
        emit_json(comparison.to_dict())
        return
    _print_comparison(comparison)
    if html_file is not None:
        click.echo(f"minivmm: wrote {html_file}", err=True)


def _print_comparison(comparison) -> None:
    """One table per guest: a row per feature, a cell per host reading
    "physical cpuid probe uses" (then "-> outcome" after a migration). A highlighted
    cell also ends with a mark, so the table reads the same without colour."""
    from rich.console import Console
    from rich.table import Table

    from .teaching.compare import ADVERTISED_BUT_ABSENT, ADVERTISED_BUT_UD, MASKED_BUT_EXECUTABLE
    alarms = {MASKED_BUT_EXECUTABLE: ("*", "black on yellow", "CPUID hides what the host runs", "yellow"),
              ADVERTISED_BUT_UD: ("!", "white on red", "CPUID shows it, the probe faulted", "red"),
              ADVERTISED_BUT_ABSENT: ("+", "white on red", "CPUID shows what the host lacks", "red")}
    console = Console()
    for guest in comparison.guests:
        features = comparison.features(guest)
        cells = {(feature, host): _cell_text(comparison.cell(guest, feature, host), alarms)
                 for feature in features for host in comparison.hosts}
        # As many host columns as fit the terminal, then another table for the rest:
        # host names are never cut.
        first = max([len("feature")] + [len(f) for f in features]) + 4
        widths = {h: max([len(h)] + [len(line) for f in features for line in _plain_lines(cells[f, h])]) + 3
                  for h in comparison.hosts}
        for hosts in _fitting(comparison.hosts, widths, console.width - first):
            console.print(guest + (f" under {comparison.evc}" if comparison.evc else ""), soft_wrap=True)
            table = Table()
            table.add_column("feature", no_wrap=True)
            for host in hosts:
                table.add_column(host, no_wrap=True)
            for feature in features:
                table.add_row(feature, *(cells[feature, host] for host in hosts))
            if not features:
                table.caption = "this guest printed no detection lines (FEATURE: cpuid=.. probe=.. uses=..)"
            console.print(table)
    console.print("cell: physical, cpuid, probe (✓ yes, ✗ no, · not probed), path the guest took")
    shown = {cell.disagreement for cell in comparison.cells}
    for kind, (mark, style, meaning, colour) in alarms.items():
        if kind in shown:
            console.print(f"[{style}]{mark}[/] {kind}: {meaning} ({colour})")
    if comparison.migrate_to:
        console.print(f"→ after migrating to {comparison.migrate_to} at checkpoint 1; "
                      "[white on red]crashes[/] red, [black on dark_orange]refusals[/] orange")


def _cell_text(cell, alarms) -> str:
    from .teaching.compare import outcome_kind
    text = f"{MARKS[cell.physical]} {MARKS[cell.cpuid]} {MARKS[cell.probe]} {cell.uses or '-'}"
    if cell.disagreement:
        mark, style, _, _ = alarms[cell.disagreement]
        text = f"[{style}]{text} {mark}[/]"
    if cell.after:
        style = OUTCOME_STYLES.get(outcome_kind(cell.after), "")
        text += "\n→ " + (f"[{style}]{cell.after}[/]" if style else cell.after)
    return text


MARKS = {True: "✓", False: "✗", None: "·"}
OUTCOME_STYLES = {"crash": "white on red", "refused": "black on dark_orange"}


def _plain_lines(markup: str) -> list[str]:
    from rich.text import Text
    return Text.from_markup(markup).plain.splitlines()


def _fitting(hosts, widths, room: int):
    """Hosts in groups whose columns fit in ``room`` characters (at least one each)."""
    group, used = [], 0
    for host in hosts:
        if group and used + widths[host] > room:
            yield group
            group, used = [], 0
        group.append(host)
        used += widths[host]
    if group:
        yield group


@cli.command()
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("-o", "--output", required=True, metavar="FILE", help="The guest image (a static ELF64) to write.")
def cc(sources, output):
    """Build a C guest: compile SOURCE files with the freestanding guest runtime
    (crt0, console, #UD hook, probing; see guests/c/minivmm.h) into a static ELF
    that 'minivmm run' loads. Needs gcc ($CC to use another compiler).

    \b
    Example:
      minivmm cc my_detect.c -o my_detect.elf && minivmm run my_detect.elf --host penryn
    """
    from .guests.toolchain import build_c
    click.echo(str(build_c(sources, output)))


@cli.command()
@click.argument("name", default="all", metavar="[NAME]")
@click.option("--pace", is_flag=True, help="Wait for a key press between steps (for a classroom).")
@click.option("--json", "as_json", is_flag=True, help="Print the steps and their results as JSON.")
def demo(name, pace, as_json):
    """Narrated demos built from real runs: each step shows the command that
    reproduces it and what the run did. NAME is one of:

    \b
      evc       a mask hides SSE4.1; a CPUID-guided guest survives migration
      ud-probe  probing finds the hidden SSE4.1; the prober crashes after moving
      override  without EVC the move is refused; forcing it crashes the guest
      cold      cold migration re-detects: always safe
      lzcnt     LZCNT without asking CPUID: silently BSR on older CPUs
      avx       the complete AVX check (CPUID, OSXSAVE, XGETBV) vs the naive one
      linux     real gcc -static programs: glibc and libgcc follow the view; a
                SIGILL-probing program dies after migration (needs gcc)
      avx2      the same one generation later: AVX2 probed on a Haswell under the
                Sandy Bridge baseline, run by this machine's CPU (needs gcc, AVX2)
      prefetchw the other side: PREFETCHW, never reported by Intel CPUs before
                Broadwell, found by executing it on a Core 2 (needs gcc)
      all       all of them, in that order (the default)

    \b
    Examples:
      minivmm demo evc
      minivmm demo all --pace
    """
    from .teaching import demo as demo_mod
    if as_json:
        emit_json([step.to_dict() for step in demo_mod.steps(name)])
        return
    import textwrap

    from rich.console import Console
    console = Console(highlight=False)
    current = None
    for i, step in enumerate(demo_mod.steps(name)):
        if pace and i:
            click.pause("  (press any key for the next step)")
        if step.demo != current:
            current = step.demo
            console.rule(f"[bold]{current}")
        console.print(f"[bold]{step.title}[/]")
        for command in filter(None, (step.setup, step.command)):
            console.print(f"  [cyan]$ {command}[/]", soft_wrap=True)
        lines = step.console.splitlines()
        for line in lines[:6]:
            console.print(f"  [dim]| {line}[/]", markup=True, soft_wrap=True)
        if len(lines) > 6:
            console.print(f"  [dim]| ... ({len(lines) - 6} more lines)[/]")
        # Wrapped here, not by a rich Padding, which fills every line with blanks to the edge.
        console.print(textwrap.fill(step.narration, console.width, initial_indent="  ", subsequent_indent="  ",
                                    break_on_hyphens=False, break_long_words=False) + "\n",
                      markup=False, soft_wrap=True)


@cli.command()
@click.argument("guests", nargs=-1, required=True, metavar="GUEST...")
@click.option("--hosts", default="all", show_default=True, metavar="all|A,B", help="Host profiles.")
@click.option("--evc", default="none", show_default=True, metavar="none|all|MODE[,MODE]",
              help="EVC modes; 'all' runs every mode on every host that supports it (others are skipped).")
@click.option("--cpuid-mask", multiple=True, metavar="MASK", help="A CPUID mask for every cell (repeatable).")
@click.option("--migrate", default="none", show_default=True, metavar="none|all-pairs|A:B[,C:D]",
              help="Migrations: each host to each other, or the listed pairs SOURCE:DESTINATION.")
@click.option("--at", default="checkpoint:1", show_default=True, metavar="WHEN|random",
              help="Where to migrate: checkpoint:N, insn:N, syscall:N (a Linux program's; 'run --syscalls' "
                   "lists them), or random (an instruction count drawn from --seed).")
@click.option("--arg", "args", multiple=True, metavar="ARG",
              help="An argument of every Linux program (repeatable, in order).")
@click.option("--mount", multiple=True, metavar="HOST[:GUEST]",
              help="What every Linux program sees of this machine, read-only (repeatable).")
@click.option("--seed", type=Whole(), default=0, show_default=True, help="Seed of --at random.")
@click.option("--stop-and-copy", is_flag=True,
              help="Migrate without pre-copy: the guest stops at the point and moves at once.")
@click.option("--jobs", "-j", type=Whole(1, MAX_JOBS), metavar="N",
              help=f"Worker processes (default: one per core; at most {MAX_JOBS}, four per core).")
@click.option("--scheduler", metavar="local:N|tcp://ADDR:PORT",
              help="Run the cells as Dask tasks instead: on N worker processes here, or on the workers of a "
                   "running 'dask scheduler' (pip install 'minivmm[distributed]'; docs/matrix.md).")
@click.option("--timeout", type=SECONDS, default=60, show_default=True,
              metavar="SECONDS", help="Time budget of each cell.")
@click.option("--junit", "junit_file", metavar="FILE",
              help="Write JUnit XML (one test case per cell).")
@click.option("--report", "report_file", metavar="FILE",
              help="Write the JSON report to FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (no table).")
def matrix(guests, hosts, evc, cpuid_mask, migrate, at, args, mount, seed, stop_and_copy, jobs, scheduler, timeout,
           junit_file, report_file, as_json):
    """Run GUESTs over host profiles x EVC modes x migrations, in parallel.

    A cell passes when its guest powers off with status 0 and never reports a path
    (uses=FEATURE) its CPUID view hides; it is skipped when the host cannot run the
    EVC mode, the engine cannot execute the guest, or the guest ends before the
    migration point. Exit status 1 if a cell failed. Every cell records what it
    depends on and the 'minivmm run' command that replays it.

    \b
    Examples:
      minivmm matrix detect_cpuid detect_ud --hosts all --junit matrix.xml
      minivmm matrix dispatch_ud --hosts core2,penryn,nehalem --evc intel-merom --migrate all-pairs
      minivmm matrix my_guest.elf --evc all --at random --seed 7 --report out.json
      minivmm matrix detect_cpuid detect_ud --hosts all --scheduler tcp://10.0.0.5:8786
    """
    from .testing import matrix as matrix_mod
    if scheduler is not None:
        from .testing.distributed import check_scheduler
        check_scheduler(scheduler)
        if jobs is not None:
            raise MinivmmError("--jobs and --scheduler both say where the cells run: give one")
    for path, what in ((junit_file, "--junit file"), (report_file, "--report file")):
        if path is not None:
            check_output(path, what, guests)
    if junit_file and report_file and os.path.abspath(junit_file) == os.path.abspath(report_file):
        raise MinivmmError(f"--junit and --report both name {junit_file}")
    cell_list = matrix_mod.cells(guests, hosts=hosts, evc=evc, migrate=migrate, masks=cpuid_mask, at=at, seed=seed,
                                 args=args, mounts=mount, stop_and_copy=stop_and_copy)
    cluster = None

    def run_them(progress=None):
        nonlocal cluster
        if scheduler is None:
            return matrix_mod.run_cells(cell_list, jobs, timeout, progress)
        from .testing.distributed import run_cells_on_dask
        outcomes, cluster = run_cells_on_dask(cell_list, scheduler, timeout, progress)
        return outcomes
    if as_json or not _stderr_console().is_terminal:  # a progress bar only for a person watching
        outcomes = run_them()
    else:
        outcomes = _with_progress(cell_list, run_them)
    data = matrix_mod.report(outcomes, guests=list(guests), hosts=hosts, evc=evc, masks=list(cpuid_mask),
                             migrate=migrate, at=at, seed=seed)
    if cluster is not None:
        data["distributed"] = cluster
    if junit_file:
        write_atomically(junit_file, matrix_mod.junit_xml(outcomes), "JUnit XML")
    if report_file:
        write_atomically(report_file, json.dumps(data, indent=2), "JSON report")
    if as_json:
        emit_json(data)
    else:
        _print_matrix(outcomes, data["summary"])
    sys.exit(1 if data["summary"]["failed"] else 0)


def _with_progress(cell_list, run_them):
    """Run the cells under a progress bar on stderr: cells done of all, failures by host."""
    from collections import Counter

    from rich.progress import Progress
    failed = Counter()

    def done(outcome):
        if outcome.status == "failed":
            failed[outcome.cell.host] += 1
        hosts = ", ".join(f"{host} {n}" for host, n in failed.most_common(3))
        bar.update(task, advance=1, description=f"{len(cell_list)} cells" + (f"; failed: {hosts}" if hosts else ""))
        bar.refresh()
    # No refresh thread: the worker processes are forked while the bar is shown.
    with Progress(transient=True, console=_stderr_console(), auto_refresh=False) as bar:
        task = bar.add_task(f"{len(cell_list)} cells", total=len(cell_list))
        return run_them(done)


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def _print_matrix(outcomes, summary) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    table = Table(title="minivmm matrix", title_justify="left")
    for column in ("guest", "cells", "passed", "failed", "skipped"):
        table.add_column(column, justify="left" if column == "guest" else "right")
    for guest in dict.fromkeys(o.cell.guest for o in outcomes):
        mine = [o for o in outcomes if o.cell.guest == guest]
        counts = [sum(o.status == s for o in mine) for s in ("passed", "failed", "skipped")]
        table.add_row(guest, str(len(mine)), str(counts[0]), f"[red]{counts[1]}[/]" if counts[1] else "0",
                      str(counts[2]))
    console = Console(highlight=False)
    console.print(table)
    for outcome in outcomes:
        if outcome.status == "failed":
            console.print(f"[red]FAILED[/] {escape(f'{outcome.cell.guest}[{outcome.cell.id}]: {outcome.message}')}",
                          soft_wrap=True)
            console.print(f"  replay: {escape(outcome.cell.command())}", soft_wrap=True)
    console.print(f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped")


def main():
    cli(prog_name="minivmm")
