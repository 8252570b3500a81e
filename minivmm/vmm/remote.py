"""Live migration between minivmm processes over TCP: the destination that receives
VMs (``minivmm receive``) and the VM's move from its source. The conversation is
:mod:`~minivmm.vmm.wire`'s. The destination decides as VirtualCenter does, against
its own host and EVC mode, before any page crosses; what arrives is checked as a
snapshot file is before anything runs. Nothing that goes wrong before the source
sends GO moves the VM: it goes on at the source as if nothing had happened."""

from __future__ import annotations

import mmap
import queue
import socket
import threading
from dataclasses import dataclass, field

from ..errors import MinivmmError
from ..linux import state as process_state
from ..linux.scheduler import MAX_PROCESSES, MAX_VM_MEMORY
from ..masking.compat import presented
from ..masking.evc import evc_mode
from ..masking.view import GuestCpuidView
from . import wire
from .snapshot import Snapshot, check_meta, parse_json_section
from .wire import ACCEPT, GO, OFFER, PAGES, READY, STARTED, STATE, Channel, ProtocolError

PREFIX = "tcp:"


def is_remote(destination: str) -> bool:
    return destination.startswith(PREFIX)


# ---- the destination -----------------------------------------------------------------

@dataclass
class Destination:
    """What a receiver is: its host, the EVC mode its cluster presents, and how it
    resumes what arrives (``resume(snapshot) -> VM``: its mounts, --force)."""
    host: object
    evc: str | None
    secret: bytes
    resume: object
    nonce: bytes | None = None          # the tests' fixed nonce; fresh from os.urandom otherwise
    spaces: dict = field(default_factory=dict)

    def check_offer(self, offer) -> None:
        """Refuse (MinivmmError, the reason the source shows) a VM this host cannot take."""
        def bad(message):
            raise MinivmmError(f"the offer is malformed: {message}")
        if not isinstance(offer, dict):
            bad("not a JSON object")
        meta, cpuid = offer.get("meta"), offer.get("cpuid")
        check_meta(meta, cpuid, bad, meta.get("memory") if isinstance(meta, dict) else 0)
        probe = Snapshot(meta, {}, cpuid, b"", None)
        self.resume(probe)   # the check a resume makes: this host runs the VM's view (VirtualCenter's)
        if self.evc is not None:
            view = probe.view_table
            beyond = sorted(presented(GuestCpuidView.frozen(view)) -
                            presented(GuestCpuidView.for_host(self.host, self.evc)))
            if beyond:
                raise MinivmmError(f"the VM's CPUID view has {', '.join(beyond)}, beyond this cluster's EVC mode "
                                   f"{evc_mode(self.evc).key}")

    def receive(self, channel: Channel, turn=None):
        """One conversation: the VM that arrived (resumed, not yet run), or ProtocolError.
        Once the source is authenticated, it hears why it was refused. ``turn``: taken
        once it is (a lock: one VM arrives at a time; a source that finds it taken is
        refused, and keeps its VM)."""
        channel.greet(self.secret, self.nonce)
        taken = False
        try:
            if turn is not None:
                taken = turn.acquire(blocking=False)
                if not taken:
                    raise MinivmmError("this receiver is busy with another VM")
            return self._arrival(channel)
        except BaseException as e:
            if taken:
                turn.release()
            if isinstance(e, MinivmmError) and not isinstance(e, wire.Refused):
                try:   # (a ProtocolError too: the source may still hear it)
                    channel.send(wire.REFUSE, str(e).encode()[:wire.MAX_PAYLOAD[wire.REFUSE]])
                except ProtocolError:
                    pass
                raise ProtocolError(str(e)) from None
            raise

    def _arrival(self, channel: Channel):
        _, payload = channel.receive(OFFER)
        offer = parse_json_section("offer", payload, _protocol_error)
        self.check_offer(offer)
        channel.send(ACCEPT)
        memory = offer["meta"]["memory"]
        spaces: dict[int, mmap.mmap] = {}
        most = max(1, min(MAX_PROCESSES, MAX_VM_MEMORY // memory))
        try:
            while True:
                kind, payload = channel.receive(PAGES, STATE)
                if kind == STATE:
                    break
                space, pages = wire.unpack_pages(payload, memory // wire.PAGE)
                if space not in spaces:
                    if len(spaces) >= most:
                        raise ProtocolError(f"pages of more than {most} memory spaces, past the VM's bound")
                    spaces[space] = mmap.mmap(-1, memory)
                ram = spaces[space]
                for number, data in pages:
                    ram[number * wire.PAGE:(number + 1) * wire.PAGE] = data
            vm = self.resume(self._snapshot(offer, payload, spaces, memory))
            channel.send(READY)
            channel.receive(GO)
        except BaseException:
            for ram in spaces.values():
                ram.close()
            raise
        try:   # the VM is this receiver's from GO on: a source gone since loses only its confirmation
            channel.send(STARTED)
        except ProtocolError:
            pass
        return vm

    def _snapshot(self, offer: dict, payload: bytes, spaces: dict, memory: int) -> Snapshot:
        """The VM as a snapshot of the state and the pages that arrived, checked as a file is."""
        sections, console = wire.unpack_state(payload)
        if len(console) > 16 << 20:
            raise ProtocolError("a STATE message's console is longer than a snapshot's")
        meta, regs, cpuid, process = (parse_json_section(name, sections[name], _protocol_error)
                                      for name in wire.SECTIONS)
        if cpuid != offer["cpuid"] or not isinstance(meta, dict) or any(
                meta.get(key) != offer["meta"][key] for key in ("memory", "evc", "masks", "guest")):
            raise ProtocolError("the VM's state is not the VM offered")
        order = [0]
        if process is not None:   # which memory is whose: only once the state holds together
            try:
                process_state.validate(process, memory)
            except ValueError as e:
                raise ProtocolError(f"the VM's process state: {e}") from None
            order = [process["tid"]] + [p["tid"] for p in process.get("machine", {}).get("processes", [])]
        if set(spaces) - set(order):
            raise ProtocolError("pages arrived for a process the VM's state does not have")
        rams = [spaces.get(space) or mmap.mmap(-1, memory) for space in order]
        snapshot = Snapshot(meta, regs, cpuid, console, rams[0], process=process, others=rams[1:],
                            origin="the VM that arrived")
        snapshot.check("the VM that arrived")
        return snapshot


def _protocol_error(message: str):
    raise ProtocolError(message)


def listen(address: str):
    """A listening socket on ``ADDR:PORT`` (port 0: any free one)."""
    host, port = wire.parse_address(address, "--listen", any_port=True)
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((host, port))
    except OSError as e:
        server.close()
        raise MinivmmError(f"--listen {address}: cannot listen there ({e.strerror or e})") from None
    server.listen(8)
    return server


class Receiving:
    """A receiver's conversations: each connection in a thread of its own, so that peers
    that say nothing (wire.HANDSHAKE_SECONDS a message until they are authenticated)
    hold up no one; at most MAX_CONVERSATIONS at once (more are closed at once); one
    VM past authentication at a time, kept until it has run (``done``)."""

    MAX_CONVERSATIONS = 16
    MAX_TOLD = 1000

    def __init__(self, server, destination: Destination):
        self.destination = destination
        self.turn = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.MAX_CONVERSATIONS)
        # conversations that ended while a VM runs, waiting to be told: one VM arrives at a
        # time, and refusals past MAX_TOLD are counted, not kept (a flood grows nothing)
        self.events: queue.Queue = queue.Queue(self.MAX_TOLD)
        self.untold = 0
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server) -> None:
        while True:
            try:
                sock, (host, port, *_) = server.accept()
            except OSError:
                return   # the receiver closed its socket
            if not self.slots.acquire(blocking=False):
                sock.close()
                continue
            threading.Thread(target=self._converse, args=(sock, f"{host}:{port}"), daemon=True).start()

    def _converse(self, sock, peer: str) -> None:
        try:
            with sock:
                vm = self.destination.receive(Channel(sock, peer, is_source=False), self.turn)
            self.events.put(("arrived", peer, vm))
        except (ProtocolError, MinivmmError) as e:
            try:
                self.events.put_nowait(("refused", peer, str(e)))
            except queue.Full:
                self.untold += 1
        except BaseException as e:   # a fault of ours: the receiver's own thread raises it
            self.events.put(("error", peer, e))
        finally:
            self.slots.release()

    def next_vm(self, on_refused) -> tuple[object, str]:
        """The next VM that arrives and where from (call ``done()`` once it has run);
        ``on_refused(peer, reason)`` for each conversation that failed meanwhile."""
        while True:
            kind, peer, what = self.events.get()
            if kind == "arrived":
                return what, peer
            if kind == "error":
                raise what
            on_refused(peer, what)
            if self.untold and self.events.empty():
                on_refused("other peers", f"{self.untold} more conversations failed while a VM ran here")
                self.untold = 0

    def done(self) -> None:
        self.turn.release()


# ---- the source ----------------------------------------------------------------------

def connect(destination: str, secret: bytes) -> Channel:
    """An authenticated conversation with the receiver at ``tcp:ADDR:PORT``."""
    address = destination[len(PREFIX):]
    host, port = wire.parse_address(address, "--migrate")
    try:
        sock = socket.create_connection((host, port), timeout=wire.HANDSHAKE_SECONDS)
    except OSError as e:
        raise ProtocolError(f"cannot reach {address} ({e.strerror or e})") from None
    channel = Channel(sock, address, is_source=True)
    try:
        channel.authenticate(secret)
    except BaseException:
        sock.close()
        raise
    return channel


def send_pages(channel: Channel, space: int, addresses, ram) -> int:
    """The pages at ``addresses`` of ``ram``, in messages of PAGE_BATCH: how many."""
    pages = sorted(address // wire.PAGE for address in addresses)
    for at in range(0, len(pages), wire.PAGE_BATCH):
        batch = pages[at:at + wire.PAGE_BATCH]
        channel.send(PAGES, wire.pack_pages(space, batch, lambda p: bytes(ram[p * wire.PAGE:(p + 1) * wire.PAGE])))
    return len(pages)
