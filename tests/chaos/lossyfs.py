#!/usr/bin/env python3
"""lossyfs: a FUSE filesystem that simulates power loss (in the spirit of LazyFS).

Usage:
    python3 lossyfs.py [--discard-on-exit] BACKING_DIR MOUNTPOINT

Runs in the foreground. Once the mount is live it prints one line to stdout
(flushed):

    lossyfs: mounted BACKING_DIR on MOUNTPOINT

Requirements: libfuse2 (Debian: `libfuse2`, or `libfuse2t64` on newer
releases) and the `fusepy` module (`python3 -m pip install fusepy`). Run as
root: libfuse2 then mounts with mount(2) directly, no `fusermount` needed.

Simulating power loss ("crash"):

    kill -KILL <pid of this daemon>; umount -l MOUNTPOINT
    python3 lossyfs.py BACKING_DIR MOUNTPOINT     # a fresh daemon, same backing

Kill every process using the mount first (they would see ENOTCONN anyway),
and SIGKILL the daemon *before* unmounting: unmounting a live daemon (umount
or umount -l) is a clean shutdown that writes pending data back (see below).
A mountpoint whose daemon was killed stays a dead mount (ENOTCONN) until
`umount -l`; a new daemon cannot mount on it before that.

Semantics
---------
* BACKING_DIR holds the durable state; nothing but this daemon may touch it
  while mounted.
* Metadata operations -- create, mknod, mkdir, rmdir, unlink, rename, link,
  symlink, chmod, chown, utimens -- are applied to BACKING_DIR at once and are
  treated as durable (like a metadata-journaling filesystem that commits
  every metadata change before returning). A file created and never fsynced
  therefore survives a crash, but empty (or with whatever content was last
  synced).
* File *data* -- write, truncate/ftruncate, O_TRUNC -- is kept in this
  daemon's memory, per backing inode (st_dev, st_ino), never per path: a
  sorted list of coalesced extents plus a pending file size and a "valid
  prefix" of the backing file (bytes of the backing file beyond a pending
  truncation read as zeros). Reads overlay the pending extents on the backing
  data and are clipped/zero-extended to the pending size; getattr reports the
  pending size (and the time of the last pending change as mtime/ctime).
  Renaming a file keeps its pending data with it; hard links share it.
* fsync and fdatasync of a file (the FUSE `fsync` op; also what the kernel
  sends for O_SYNC/O_DSYNC writes and msync) apply the pending data of that
  inode to the backing file and then os.fsync/os.fdatasync it. fsync of a
  directory is a no-op (metadata is already durable).
* flush/close/release do NOT make data durable: a file closed without fsync
  keeps its pending data (visible when reopened) until it is fsynced,
  unlinked (last link) or renamed over, or the daemon crashes.
* Crash = SIGKILL of this daemon: every write that was not fsynced is lost.
  A *clean* exit (SIGTERM/SIGINT/SIGHUP, or `umount`/`umount -l` of a live
  daemon) is a clean shutdown and writes all pending data back, like a
  kernel flushing its page cache at unmount -- unless --discard-on-exit is
  given, in which case pending data is thrown away on any exit.
* Not simulated: torn or reordered writes within one fsync (an fsync applies
  all pending data of the file; a crash in the middle of an fsync call may
  keep any part of it), loss of metadata, lost directory entries of files
  whose directory was never fsynced, fallocate, xattrs (EOPNOTSUPP).
* A file unlinked while open keeps working through its fds (read, write,
  fsync), but fstat on such an fd fails with ENOENT: libfuse2's high-level
  API (with hard_remove) has no path for it and the kernel sends getattr
  without a file handle.
* Mount options: attr_timeout=0, entry_timeout=0, negative_timeout=0, no
  kernel_cache, no writeback cache (libfuse2 has none), hard_remove (no
  .fuse_hidden files in the backing dir), big_writes, use_ino.
* Thread-safe: one global lock for the inode table and metadata operations,
  one lock per inode for its data; the backing fsync runs outside the locks.
"""

import bisect
import errno
import logging
import os
import resource
import stat
import sys
import threading
import time

try:
    from fuse import FUSE, FuseOSError, Operations
except ImportError as e:  # pragma: no cover
    sys.stderr.write(
        "lossyfs: needs fusepy and libfuse2 "
        "(apt-get install libfuse2 (or libfuse2t64); python3 -m pip install fusepy): %s\n" % e
    )
    sys.exit(2)

log = logging.getLogger("lossyfs")

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class Inode:
    """Pending state of one backing inode. Holds its own O_RDWR backing fd."""

    __slots__ = ("key", "fd", "lock", "dirty", "size", "valid", "starts",
                 "bufs", "mtime", "opens", "orphan")

    def __init__(self, key, fd):
        self.key = key
        self.fd = fd
        self.lock = threading.Lock()
        self.dirty = False
        self.size = 0       # pending logical size (when dirty)
        self.valid = 0      # backing bytes [0, valid) still valid (when dirty)
        self.starts = []    # extent starts, sorted, non-overlapping, non-adjacent
        self.bufs = []      # extent data (bytearray), parallel to starts
        self.mtime = None   # ns of the last pending change, for getattr
        self.opens = 0      # open FUSE handles
        self.orphan = False  # removed from the table (last link gone)

    # All methods below: caller holds self.lock.

    def _begin(self):
        if not self.dirty:
            n = os.fstat(self.fd).st_size
            self.dirty = True
            self.size = n
            self.valid = n
            self.starts = []
            self.bufs = []

    def write(self, off, data):
        self._begin()
        n = len(data)
        if n == 0:
            return 0
        end = off + n
        starts, bufs = self.starts, self.bufs
        i = bisect.bisect_right(starts, off) - 1
        if i >= 0 and starts[i] + len(bufs[i]) >= off:
            first = i
        else:
            first = i + 1
        last = bisect.bisect_right(starts, end) - 1  # last extent starting <= end
        if first > last:
            starts.insert(first, off)
            bufs.insert(first, bytearray(data))
        elif first == last and starts[first] <= off:
            s = starts[first]
            # In place; extends the buffer when the write runs past its end
            # (the append case is amortised O(len(data))).
            bufs[first][off - s:off - s + n] = data
        else:
            ns = min(off, starts[first])
            ne = max(end, starts[last] + len(bufs[last]))
            nb = bytearray(ne - ns)
            for k in range(first, last + 1):
                s = starts[k]
                nb[s - ns:s - ns + len(bufs[k])] = bufs[k]
            nb[off - ns:end - ns] = data
            starts[first:last + 1] = [ns]
            bufs[first:last + 1] = [nb]
        if end > self.size:
            self.size = end
        self.mtime = time.time_ns()
        return n

    def truncate(self, length):
        self._begin()
        if length < self.size:
            if length < self.valid:
                self.valid = length
            starts, bufs = self.starts, self.bufs
            k = bisect.bisect_left(starts, length)  # first extent starting >= length
            del starts[k:]
            del bufs[k:]
            if starts:
                s = starts[-1]
                if s + len(bufs[-1]) > length:
                    del bufs[-1][length - s:]
        self.size = length
        self.mtime = time.time_ns()

    def read(self, size, off):
        if not self.dirty:
            return os.pread(self.fd, size, off)
        end = min(off + size, self.size)
        if off >= end:
            return b""
        starts, bufs = self.starts, self.bufs
        k = bisect.bisect_right(starts, off) - 1
        if k < 0 or starts[k] + len(bufs[k]) <= off:
            k += 1
        if (k >= len(starts) or starts[k] >= end) and end <= self.valid:
            return os.pread(self.fd, end - off, off)  # no overlap: backing only
        out = bytearray(end - off)
        if off < self.valid:
            got = os.pread(self.fd, min(end, self.valid) - off, off)
            out[:len(got)] = got
        while k < len(starts) and starts[k] < end:
            s = starts[k]
            b = bufs[k]
            lo = max(s, off)
            hi = min(s + len(b), end)
            if lo < hi:
                out[lo - off:hi - off] = memoryview(b)[lo - s:hi - s]
            k += 1
        return bytes(out)

    def apply(self):
        """Write the pending data to the backing file (no fsync)."""
        if not self.dirty:
            return
        fd = self.fd
        if self.valid < os.fstat(fd).st_size:
            os.ftruncate(fd, self.valid)
        for s, b in zip(self.starts, self.bufs):
            mv = memoryview(b)
            done = 0
            while done < len(b):
                done += os.pwrite(fd, mv[done:], s + done)
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        self.dirty = False
        self.starts = []
        self.bufs = []
        self.mtime = None


class Handle:
    __slots__ = ("inode", "flags")

    def __init__(self, inode, flags):
        self.inode = inode
        self.flags = flags


class LossyFS(Operations):
    use_ns = True
    flag_nullpath_ok = 1   # ops on unlinked-but-open files come with path None
    flag_utime_omit_ok = 1
    # Not implemented at all (libfuse answers ENOSYS, the kernel remembers and
    # stops asking): otherwise the kernel sends a getxattr(security.capability)
    # before every write, which costs a third of the append+fsync throughput.
    getxattr = None
    setxattr = None
    listxattr = None
    removexattr = None

    def __init__(self, backing, mountpoint, discard_on_exit=False):
        self.root = os.path.realpath(backing)
        self.backing_arg = backing
        self.mount_arg = mountpoint
        self.discard_on_exit = discard_on_exit
        self.glock = threading.Lock()
        self.inodes = {}    # (st_dev, st_ino) -> Inode
        self.handles = {}   # fh -> Handle
        self.next_fh = 1

    # ---- helpers -------------------------------------------------------

    def _b(self, path):
        return self.root + path  # FUSE paths are absolute, no '..'

    def _handle(self, fh):
        try:
            return self.handles[fh]
        except KeyError:
            raise FuseOSError(errno.EBADF)

    def _attach(self, fd, flags):
        """Caller holds glock. Takes ownership of fd; returns a new fh."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        ino = self.inodes.get(key)
        if ino is None:
            ino = Inode(key, fd)
            self.inodes[key] = ino
        else:
            os.close(fd)
        ino.opens += 1
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(ino, flags)
        return fh, ino

    def _drop_key(self, st):
        """Caller holds glock: the last link of a regular file is about to go."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            return
        ino = self.inodes.pop((st.st_dev, st.st_ino), None)
        if ino is None:
            return
        ino.orphan = True
        if ino.opens == 0:
            with ino.lock:
                os.close(ino.fd)
                ino.fd = -1

    @staticmethod
    def _attrs(st):
        return {
            "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns, "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize, "st_rdev": st.st_rdev,
        }

    @staticmethod
    def _overlay(attrs, ino):
        with ino.lock:
            if ino.dirty:
                attrs["st_size"] = ino.size
                attrs["st_blocks"] = max(attrs["st_blocks"], (ino.size + 511) // 512)
                if ino.mtime is not None:
                    attrs["st_mtime"] = max(attrs["st_mtime"], ino.mtime)
                    attrs["st_ctime"] = max(attrs["st_ctime"], ino.mtime)
        return attrs

    def _sync(self, ino, datasync):
        with ino.lock:
            ino.apply()
            fd = ino.fd
        # The fd stays open: the caller holds an open handle on this inode.
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    # ---- lifecycle -----------------------------------------------------

    def init(self, path):
        sys.stdout.write("lossyfs: mounted %s on %s\n" % (self.backing_arg, self.mount_arg))
        sys.stdout.flush()

    def destroy(self, path):
        with self.glock:
            inodes = list(self.inodes.values())
        n = 0
        for ino in inodes:
            with ino.lock:
                if ino.dirty and ino.fd >= 0:
                    n += 1
                    if not self.discard_on_exit:
                        ino.apply()
                        os.fsync(ino.fd)
        if n:
            log.warning("lossyfs: clean exit: %s pending data of %d file(s)",
                        "discarded" if self.discard_on_exit else "wrote back", n)

    # ---- attributes ----------------------------------------------------

    def getattr(self, path, fh=None):
        if fh is not None:
            ino = self._handle(fh).inode
            return self._overlay(self._attrs(os.fstat(ino.fd)), ino)
        st = os.lstat(self._b(path))
        attrs = self._attrs(st)
        if stat.S_ISREG(st.st_mode):
            with self.glock:
                ino = self.inodes.get((st.st_dev, st.st_ino))
            if ino is not None:
                attrs = self._overlay(attrs, ino)
        return attrs

    def chmod(self, path, mode):
        os.chmod(self._b(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._b(path), uid, gid, follow_symlinks=False)

    def utimens(self, path, times=None):
        p = self._b(path)
        if times is None:
            os.utime(p, follow_symlinks=False)
        else:
            now = time.time_ns()
            old = None
            ns = []
            for i, t in enumerate(times):
                if t == UTIME_NOW:
                    t = now
                elif t == UTIME_OMIT:
                    if old is None:
                        old = os.lstat(p)
                    t = old.st_atime_ns if i == 0 else old.st_mtime_ns
                ns.append(t)
            os.utime(p, ns=tuple(ns), follow_symlinks=False)
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            with self.glock:
                ino = self.inodes.get((st.st_dev, st.st_ino))
            if ino is not None:
                with ino.lock:
                    ino.mtime = None  # an explicit time wins over the pending one

    def statfs(self, path):
        sv = os.statvfs(self._b(path))
        return {k: getattr(sv, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
            "f_files", "f_flag", "f_frsize", "f_namemax")}

    # ---- namespace (durable at once) ------------------------------------

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._b(path))

    def readlink(self, path):
        return os.readlink(self._b(path))

    def mknod(self, path, mode, dev):
        os.mknod(self._b(path), mode, dev)

    def mkdir(self, path, mode):
        os.mkdir(self._b(path), mode)

    def rmdir(self, path):
        os.rmdir(self._b(path))

    def symlink(self, target, source):
        os.symlink(source, self._b(target))

    def link(self, target, source):
        os.link(self._b(source), self._b(target), follow_symlinks=False)

    def unlink(self, path):
        p = self._b(path)
        with self.glock:
            st = os.lstat(p)
            os.unlink(p)
            self._drop_key(st)

    def rename(self, old, new):
        po, pn = self._b(old), self._b(new)
        with self.glock:
            so = os.lstat(po)
            try:
                sn = os.lstat(pn)
            except FileNotFoundError:
                sn = None
            os.rename(po, pn)
            if sn is not None and (sn.st_dev, sn.st_ino) != (so.st_dev, so.st_ino):
                self._drop_key(sn)

    def fsyncdir(self, path, datasync, fh):
        return 0

    # ---- files -----------------------------------------------------------

    def create(self, path, mode, fi=None):
        fd = os.open(self._b(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        with self.glock:
            fh, _ = self._attach(fd, os.O_RDWR | os.O_CREAT)
        return fh

    def open(self, path, flags):
        fd = os.open(self._b(path), os.O_RDWR | os.O_CLOEXEC)
        with self.glock:
            fh, ino = self._attach(fd, flags)
        if flags & os.O_TRUNC:  # only with atomic_o_trunc; else a truncate op comes
            with ino.lock:
                ino.truncate(0)
        return fh

    def read(self, path, size, offset, fh):
        ino = self._handle(fh).inode
        with ino.lock:
            return ino.read(size, offset)

    def write(self, path, data, offset, fh):
        ino = self._handle(fh).inode
        with ino.lock:
            return ino.write(offset, data)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            ino = self._handle(fh).inode
            with ino.lock:
                ino.truncate(length)
            return
        p = self._b(path)
        with self.glock:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise FuseOSError(errno.EINVAL)
            key = (st.st_dev, st.st_ino)
            ino = self.inodes.get(key)
            if ino is None:
                fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
                ino = Inode(key, fd)
                self.inodes[key] = ino
            with ino.lock:
                ino.truncate(length)

    def flush(self, path, fh):
        return 0  # close() is not a sync

    def fsync(self, path, datasync, fh):
        self._sync(self._handle(fh).inode, datasync)

    def release(self, path, fh):
        with self.glock:
            h = self.handles.pop(fh, None)
            if h is None:
                return
            ino = h.inode
            ino.opens -= 1
            if ino.opens > 0:
                return
            with ino.lock:
                if ino.orphan:
                    if ino.fd >= 0:
                        os.close(ino.fd)
                        ino.fd = -1
                elif not ino.dirty and self.inodes.get(ino.key) is ino:
                    del self.inodes[ino.key]
                    os.close(ino.fd)
                    ino.fd = -1
                # dirty: keep the inode (and its fd) with its pending data


def main(argv):
    args = list(argv[1:])
    discard = False
    if "--discard-on-exit" in args:
        args.remove("--discard-on-exit")
        discard = True
    if len(args) != 2:
        sys.stderr.write("usage: lossyfs.py [--discard-on-exit] BACKING_DIR MOUNTPOINT\n")
        return 2
    backing, mountpoint = args
    if not os.path.isdir(backing):
        sys.stderr.write("lossyfs: backing dir %s does not exist\n" % backing)
        return 2
    try:
        if not stat.S_ISDIR(os.stat(mountpoint).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    except OSError as e:
        hint = " (a dead mount: umount -l it first)" if e.errno == errno.ENOTCONN else ""
        sys.stderr.write("lossyfs: bad mountpoint %s: %s%s\n" % (mountpoint, e.strerror, hint))
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0)  # the kernel already applied the caller's umask to modes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    FUSE(
        LossyFS(backing, mountpoint, discard_on_exit=discard),
        mountpoint,
        foreground=True,
        fsname="lossyfs",
        subtype="lossyfs",
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        hard_remove=True,
        big_writes=True,
        max_write=131072,
        use_ino=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
