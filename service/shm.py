"""Triton's system shared memory extension, protocol-neutral: a registry of client regions (a byte range of a POSIX
shared memory object) that inputs are read from in place and outputs written into, so a large tensor never crosses
the socket. Both front ends call it through the data plane.

Safety, because a region is memory another process controls:
- off unless the server was started with --allow-shared-memory: every call answers UNAVAILABLE;
- a key is a POSIX shared memory object name ("/name": one slash, then no slash, no NUL, not "." or ".."),
  opened as shm_open does (/dev/shm/<name>, O_NOFOLLOW, a regular file), never a path of the file system;
- register checks offset + byte_size against the object's size, and every use checks its own offset and size
  against the region, and the object's size again (fstat), so a read or write never leaves the mapping, and an
  object truncated since registration is refused instead of faulting (SIGBUS) on access;
- a region named by running requests may be unregistered, deferred as Triton defers it (server PR 7743, 2024;
  before it Triton refused): the name is free at once, the requests that hold it finish on the old mapping, which
  is closed when the last of them releases it (Triton keeps the name taken until then).
We open objects with os.open, not multiprocessing.shared_memory: on Python 3.11 its resource tracker would unlink,
at server exit, segments the client created."""

from __future__ import annotations

import mmap
import os
import re
import stat
from dataclasses import dataclass, field

import numpy as np

from service.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from service.protocol import REGION, REGION_OFFSET, REGION_SIZE, InputTensor, parameter_int

SHM_DIR = "/dev/shm"  # where Linux's shm_open keeps POSIX shared memory objects
MAX_REGIONS = 1024  # each holds a file descriptor and a mapping; a client looping on register must not exhaust fds
_KEY = re.compile(r"/[^/\x00]{1,250}")  # NAME_MAX 255 for /dev/shm entries, minus room
DISABLED = ("system shared memory is disabled on this server; start it with --allow-shared-memory "
            "(DEEPSERVE_ALLOW_SHARED_MEMORY=1) to let clients on this host register regions")


@dataclass(eq=False)
class Region:
    """One registered region: `byte_size` bytes at `offset` of the object `key`, mapped from the object's start
    (mmap offsets must be page aligned; the region's offset need not be)."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mapping: mmap.mmap
    users: int = 0  # requests holding it now
    unregistered: bool = False
    view: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def span(self, offset: int, byte_size: int, where: str) -> slice:
        """The bytes [offset, offset + byte_size) of the region as a slice of the mapping, checked."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument(f"{where}: shared_memory_offset must be an integer >= 0, got {offset!r}")
        if isinstance(byte_size, bool) or not isinstance(byte_size, int) or byte_size < 0:
            raise InvalidArgument(f"{where}: shared_memory_byte_size must be an integer >= 0, got {byte_size!r}")
        if offset + byte_size > self.byte_size:
            raise InvalidArgument(f"{where}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} = "
                                  f"{offset + byte_size} is past the end of region {self.name!r} "
                                  f"({self.byte_size} bytes)")
        size = os.fstat(self.fd).st_size
        if size < self.offset + self.byte_size:
            raise InvalidArgument(f"{where}: the shared memory object {self.key!r} of region {self.name!r} shrank to "
                                  f"{size} bytes since it was registered ({self.offset + self.byte_size} needed); "
                                  "register it again")
        start = self.offset + offset
        return slice(start, start + byte_size)

    def close(self) -> None:
        try:
            self.view.release()
            self.mapping.close()
        except BufferError:
            # a numpy view of an input still exists (a request cancelled while its batch runs): dropping our
            # reference is enough, the mapping goes when the last view does
            pass
        os.close(self.fd)


class SharedMemory:
    """The server's regions by name. Used from the event loop thread only, so it needs no lock."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.regions: dict[str, Region] = {}

    def _check_allowed(self) -> None:
        if not self.allowed:
            raise Unavailable(DISABLED)

    # --- control: Register / Unregister / Status ---------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_allowed()
        if not name:
            raise InvalidArgument("system shared memory register: the region needs a name")
        if name in self.regions:
            raise AlreadyExists(f"system shared memory region {name!r} is already registered (key "
                                f"{self.regions[name].key!r}); unregister it first")
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key in ("/.", "/.."):
            raise InvalidArgument(f"system shared memory region {name!r}: key {key!r} is not a POSIX shared memory "
                                  "object name; expected '/name' (one leading slash, no other slash), as shm_open "
                                  "takes it; file system paths are not accepted")
        if offset < 0 or byte_size <= 0:
            raise InvalidArgument(f"system shared memory region {name!r}: byte_size must be > 0 and offset >= 0, "
                                  f"got offset {offset}, byte_size {byte_size}")
        if len(self.regions) >= MAX_REGIONS:
            raise ResourceExhausted(f"system shared memory region {name!r}: {MAX_REGIONS} regions are registered, "
                                    "the server's limit; unregister some first")
        path = os.path.join(SHM_DIR, key[1:])
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(f"system shared memory region {name!r}: cannot open the shared memory object "
                                  f"{key!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"system shared memory region {name!r}: {key!r} is not a shared memory "
                                      "object")
            if offset + byte_size > st.st_size:
                raise InvalidArgument(f"system shared memory region {name!r}: offset {offset} + byte_size "
                                      f"{byte_size} = {offset + byte_size} is past the end of the shared memory "
                                      f"object {key!r} ({st.st_size} bytes)")
            mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.regions[name] = Region(name, key, offset, byte_size, fd, mapping)

    def unregister(self, name: str = "") -> None:
        """One region, or every region when `name` is empty. An unknown name is not an error (as in Triton).
        A region in use leaves the registry now and is closed when its last request releases it."""
        self._check_allowed()
        names = [name] if name else list(self.regions)
        for n in names:
            region = self.regions.pop(n, None)
            if region is None:
                continue
            region.unregistered = True
            if region.users == 0:
                region.close()

    def status(self, name: str = "") -> list[dict]:
        self._check_allowed()
        if name:
            if name not in self.regions:
                raise NotFound(f"system shared memory region {name!r} is not registered")
            return [self.regions[name].status()]
        return [r.status() for r in self.regions.values()]

    # --- data path ----------------------------------------------------------------------------------------------
    def lease(self) -> Lease:
        return Lease(self)

    def read(self, name: str, offset: int, byte_size: int, where: str = "read") -> memoryview:
        """A view of region bytes, no copy; for holding it across an await, use a Lease."""
        region = self._find(name, where)
        return region.view[region.span(offset, byte_size, where)]

    def write(self, name: str, offset: int, data, where: str = "write") -> None:
        region = self._find(name, where)
        _write(region, offset, data, len(data), where)

    def _find(self, name: str, where: str) -> Region:
        if not self.allowed:
            raise Unavailable(f"{where}: {DISABLED}")
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}: shared_memory_region must be a string, got {name!r}")
        region = self.regions.get(name)
        if region is None:
            raise InvalidArgument(f"{where}: system shared memory region {name!r} is not registered")
        return region

    def close(self) -> None:
        for region in self.regions.values():
            region.unregistered = True
            if region.users == 0:
                region.close()
        self.regions.clear()


def _write(region: Region, offset: int, data, size: int, where: str) -> None:
    span = region.span(offset, size, where)
    region.view[span] = data


class Lease:
    """The regions one request uses, held from the decode of its inputs until its outputs are written: while held,
    unregistering a region only takes its name away (see the module docstring)."""

    __slots__ = ("held", "shm")

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm
        self.held: dict[str, Region] = {}

    def _region(self, name: str, where: str) -> Region:
        region = self.held.get(name)
        if region is None:
            region = self.shm._find(name, where)
            region.users += 1
            self.held[name] = region
        return region

    def read(self, name: str, offset: int, byte_size: int, where: str) -> memoryview:
        region = self._region(name, where)
        return region.view[region.span(offset, byte_size, where)]

    def check(self, name: str, offset: int, byte_size: int, where: str) -> None:
        """Before the model runs: an output's region is named, registered and large enough as requested."""
        self._region(name, where).span(offset, byte_size, where)

    def write(self, name: str, offset: int, byte_size: int, data: bytes | np.ndarray, where: str) -> int:
        """Copy one output's bytes (bytes, or a flat uint8 array) into the region: the single copy they get.
        Returns the bytes written."""
        region = self._region(name, where)
        if len(data) > byte_size:
            raise InvalidArgument(f"{where}: the output needs {len(data)} bytes, more than the "
                                  f"shared_memory_byte_size {byte_size} given for region {name!r}")
        _write(region, offset, data, len(data), where)
        return len(data)

    def read_input(self, tensor: InputTensor, where: str) -> None:
        """Point an input's raw contents at its region's bytes, in place: the decode then checks them as any raw."""
        if tensor.raw is not None or tensor.values is not None:
            raise InvalidArgument(f"{where}: names shared memory region {tensor.parameters[REGION]!r} and also "
                                  "carries contents; send one")
        tensor.raw = self.read(*region_args(tensor.parameters, where), where)

    def write_output(self, params: dict, data: bytes | np.ndarray, where: str) -> dict:
        """Write an output into the region its parameters name; the reply's parameters for it."""
        name, offset, size = region_args(params, where)
        written = self.write(name, offset, size, data, where)
        return {REGION: name, REGION_SIZE: written, REGION_OFFSET: offset}

    def release(self) -> None:
        for region in self.held.values():
            region.users -= 1
            if region.users == 0 and region.unregistered:
                region.close()
        self.held.clear()


def region_args(params: dict, where: str) -> tuple[str, int, int]:
    """(region, offset, byte_size) of an input or output that names a shared memory region."""
    name = params[REGION]
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{where}: parameter {REGION} must be a region name (string), got {name!r}")
    if REGION_SIZE not in params:
        raise InvalidArgument(f"{where}: parameter {REGION} needs {REGION_SIZE} too")
    return name, parameter_int(params, REGION_OFFSET, where), parameter_int(params, REGION_SIZE, where)
