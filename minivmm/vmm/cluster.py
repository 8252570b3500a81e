"""A cluster of hosts under one EVC mode, and the VMs powered on in it (VirtualCenter's view)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MinivmmError
from ..masking.evc import EvcMode, evc_mode, require_supported
from .vm import VM


@dataclass
class Cluster:
    """Hosts that share an EVC mode, and the VMs powered on in it.

    A VM's view is frozen at power-on: raising the mode reaches it only when it is
    powered on again (VMware: "the EVC mode of a virtual machine")."""
    mode: EvcMode | None = None
    hosts: list = field(default_factory=list)
    vm_modes: dict[str, str | None] = field(default_factory=dict)

    def add_host(self, profile) -> None:
        if self.mode:
            require_supported(self.mode, profile)
        elif self.hosts and profile.vendor != self.hosts[0].vendor:
            raise MinivmmError(f"{profile.name} is {profile.vendor.upper()}, the cluster is "
                               f"{self.hosts[0].vendor.upper()}: mixed vendors cannot share a cluster")
        self.hosts.append(profile)

    def set_mode(self, key: str | None) -> None:
        """Any mode every host supports; lowering is how a weaker host gets in."""
        mode = evc_mode(key) if key else None
        if mode:
            for host in self.hosts:
                require_supported(mode, host)
        self.mode = mode

    def power_on(self, name: str, guest, host=None, **options):
        """A VM of this cluster (on its first host unless told), under the current mode."""
        if not self.hosts:
            raise MinivmmError("the cluster has no hosts")
        host = host or self.hosts[0]
        if host not in self.hosts:
            raise MinivmmError(f"{host.name} is not a host of this cluster")
        self.vm_modes[name] = self.mode.key if self.mode else None
        return VM(guest, host, evc=self.vm_modes[name], **options)

    def vm_mode(self, name: str) -> str | None:
        return self.vm_modes[name]
