"""minivmm's own /proc, /dev and /sys for a Linux program, made from the VM and the
process, never from the machine: /proc/cpuinfo from the CPUID view, one CPU, seeded
randomness."""

from __future__ import annotations

from .vfs import MemoryNode, device, directory, file, link

ONE_CPU = b"0\n"                  # the cpulist format of /sys/devices/system/cpu/online
# cpu0's place: package 0, die 0, core 0, alone in each of them (Documentation/ABI/
# stable/sysfs-devices-system-cpu: the *_list files are cpulists, the others hex masks).
TOPOLOGY = {**dict.fromkeys(("physical_package_id", "die_id", "cluster_id", "core_id"), b"0\n"),
            **dict.fromkeys(("thread_siblings_list", "core_siblings_list", "core_cpus_list", "die_cpus_list",
                             "cluster_cpus_list", "package_cpus_list"), ONE_CPU),
            **dict.fromkeys(("thread_siblings", "core_siblings", "core_cpus", "die_cpus", "cluster_cpus",
                             "package_cpus"), b"1\n")}


def own_trees(process, cpuinfo: str) -> dict[str, MemoryNode]:
    """Files whose contents are made when they are opened (as procfs does) read the
    process at that moment: /proc/self/maps lists the mappings of now, and after an
    execve exe, cmdline and auxv are the new image's."""
    def cmdline() -> bytes:
        return b"".join(arg.encode("utf-8", "surrogateescape") + b"\0" for arg in process.argv)
    me = directory({"exe": link(lambda: process.exe), "auxv": file(lambda: process.auxv), "cmdline": file(cmdline),
                    "maps": file(lambda: process.memory.text().encode())})
    cpu = directory({**{name: file(ONE_CPU) for name in ("online", "possible", "present")},
                     "cpu0": directory({"topology": directory({k: file(v) for k, v in TOPOLOGY.items()})})})
    return {
        "/proc": directory({"cpuinfo": file(cpuinfo.encode()), "self": me, str(process.tid): me}),
        "/dev": directory({name: device(name) for name in ("null", "zero", "random", "urandom", "tty")}),
        "/sys": directory({"devices": directory({"system": directory({"cpu": cpu})})}),
    }
