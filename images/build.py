"""Build Roost's local test images from this machine's Debian files, with no registry.

Images (both made with ``docker import`` of a rootfs streamed as a tar):

- ``roost-mimic:latest``: Debian's ``/usr/bin/python3.11``, the shared
  libraries ``ldd`` lists for it and for the kept extension modules, a trimmed
  ``/usr/lib/python3.11`` (no tests, idle, tkinter, ensurepip, lib2to3, config,
  TLS, sqlite, curses...; Debian's plain ``.pyc`` files stay because they cut
  the agent's start), busybox-static as ``/bin/busybox`` with ``/bin/sh`` and
  common applets, and ``/app/mimic.py`` as the command, exposing port 8000.
- ``roost-mimic-healthcheck:latest``: the same rootfs as ``roost-mimic`` with a
  Docker HEALTHCHECK of its own (every 2 s, one failure is unhealthy) that
  fails while ``/tmp/unhealthy`` exists or ``HEALTHCHECK_FAIL`` is set. Mimic's
  own ``GET /health`` stays 200 meanwhile, so a test sees Docker's verdict and
  nothing else (mimic's ``write_file`` command creates the file).
- ``roost-busybox:latest``: busybox-static with applet symlinks, for one-shot
  jobs; the command is ``/bin/sh``.
- ``roost-nginx:latest``: Debian's ``/usr/sbin/nginx`` (package ``nginx``, pulled
  in by ``nginx-light``) with the libraries ``ldd`` lists, its ``mime.types``,
  ``images/nginx/nginx.conf`` and the files under ``images/nginx/www``: an agent
  that answers with keep-alive and chunked bodies, for the conformance tests.

Invariants:

- An image is rebuilt only when the hash of its inputs changed: every file's
  content, every path, every ``--change`` line and this script's own source.
  The hash is stored in the image label ``roost.image-inputs``; a tag carrying
  the same hash is reported as cached and left alone.
- Nothing is pulled and nothing is pushed; no registry is involved.
- The image a rebuild replaces (and any earlier untagged one) is removed only
  when it carries our label and no container uses it (``docker rmi`` without
  force; failure is ignored, a later build retries).
- Every build is also imported as ``<repository>:inputs-<first 12 of its hash>``
  (printed as ``as TAG``), an image of its own: on a Docker engine shared by
  several checkouts, each one's tests name exactly the image built from its own
  files, whatever another checkout's build has done to ``:latest`` (and the image
  it replaced) since. Those images are never removed here (another checkout may
  be using its own); ``docker rmi`` them by hand.

Usage: ``python3 images/build.py [--force] [IMAGE ...]``; prints one line per
image saying ``built`` (with seconds and size) or ``cached``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

IMAGES_DIR = Path(__file__).resolve().parent
INPUT_HASH_LABEL = "roost.image-inputs"
PYTHON_BINARY = Path("/usr/bin/python3.11")
PYTHON_STDLIB = Path("/usr/lib/python3.11")
BUSYBOX_BINARY = Path("/bin/busybox")
MIMIC_SOURCE = IMAGES_DIR / "mimic" / "mimic.py"
NGINX_BINARY = Path("/usr/sbin/nginx")
NGINX_MIME_TYPES = Path("/etc/nginx/mime.types")
NGINX_DIR = IMAGES_DIR / "nginx"

# Top-level stdlib entries an agent never needs (or that need libraries we leave out).
STDLIB_EXCLUDED_NAMES = frozenset(
    {
        "EXTERNALLY-MANAGED",
        "LICENSE.txt",
        "config-3.11-x86_64-linux-gnu",
        "curses",
        "distutils",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "sitecustomize.py",  # Debian's links to /etc (apport hook); absent here
        "sqlite3",
        "tkinter",
        "turtle.py",
        "turtledemo",
        "unittest",
        "venv",
    }
)
# Directory names dropped at any depth.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test"})
# Extension modules left out: test helpers, terminals, databases, TLS (heavy libs).
DYNLOAD_EXCLUDED_PREFIXES = (
    "_test",
    "_ctypes_test",
    "_xx",
    "xx",
    "_curses",
    "readline",
    "_dbm",
    "nis",
    "ossaudiodev",
    "_ssl",
    "_hashlib",
    "_sqlite3",
    "_tkinter",
    "_crypt",
    "audioop",
)
BUSYBOX_APPLETS = (
    "[", "ash", "awk", "basename", "cat", "chmod", "cp", "cut", "date", "dd", "df", "diff",
    "dirname", "du", "echo", "env", "false", "find", "free", "grep", "gunzip", "gzip", "head",
    "hostname", "httpd", "id", "kill", "less", "ln", "ls", "md5sum", "mkdir", "mktemp", "mv",
    "nc", "nproc", "nslookup", "ping", "printf", "ps", "pwd", "readlink", "realpath", "rm",
    "rmdir", "sed", "seq", "sh", "sha256sum", "sleep", "sort", "stat", "tail", "tar", "tee",
    "test", "timeout", "top", "touch", "tr", "true", "uname", "uniq", "uptime", "usleep", "vi",
    "wc", "wget", "which", "whoami", "xargs", "yes",
)  # fmt: skip
ETC_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
ETC_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
BASE_PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin"


@dataclass
class Rootfs:
    """A rootfs described as entries, streamed to ``docker import`` as a tar."""

    files: dict[str, Path] = field(default_factory=dict)
    inline: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, int] = field(default_factory=dict)

    def add_file(self, dest: str | os.PathLike[str], source: Path) -> None:
        self.files[str(dest)] = source

    def add_bytes(self, dest: str, data: bytes, mode: int = 0o644) -> None:
        self.inline[dest] = (data, mode)

    def add_symlink(self, dest: str, target: str) -> None:
        self.symlinks[dest] = target

    def add_dir(self, dest: str, mode: int = 0o755) -> None:
        self.dirs[dest] = mode

    def _all_dirs(self) -> dict[str, int]:
        dirs = dict(self.dirs)
        for path in [*self.files, *self.inline, *self.symlinks, *self.dirs]:
            for parent in PurePosixPath(path).parents:
                if str(parent) != "/":
                    dirs.setdefault(str(parent), 0o755)
        return dirs

    def fingerprint(self, recipe: Iterable[str]) -> str:
        digest = hashlib.sha256()
        for line in recipe:
            digest.update(b"recipe\0" + line.encode() + b"\0")
        for path, mode in sorted(self._all_dirs().items()):
            digest.update(f"dir\0{path}\0{mode:o}\0".encode())
        for path, target in sorted(self.symlinks.items()):
            digest.update(f"link\0{path}\0{target}\0".encode())
        for path, (data, mode) in sorted(self.inline.items()):
            digest.update(f"bytes\0{path}\0{mode:o}\0".encode() + hashlib.sha256(data).digest())
        for path, source in sorted(self.files.items()):
            mode = source.stat().st_mode & 0o7777
            digest.update(f"file\0{path}\0{mode:o}\0".encode())
            digest.update(hashlib.sha256(source.read_bytes()).digest())
        return digest.hexdigest()

    def write_tar(self, stream: IO[bytes]) -> None:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for path, mode in sorted(self._all_dirs().items()):
                info = _tar_info(path, tarfile.DIRTYPE, mode)
                tar.addfile(info)
            for path, target in sorted(self.symlinks.items()):
                info = _tar_info(path, tarfile.SYMTYPE, 0o777)
                info.linkname = target
                tar.addfile(info)
            for path, (data, mode) in sorted(self.inline.items()):
                info = _tar_info(path, tarfile.REGTYPE, mode)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for path, source in sorted(self.files.items()):
                stat = source.stat()
                info = _tar_info(path, tarfile.REGTYPE, stat.st_mode & 0o7777)
                info.size = stat.st_size
                info.mtime = int(stat.st_mtime)
                with source.open("rb") as content:
                    tar.addfile(info, content)


def _tar_info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path.lstrip("/"))
    info.type = kind
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def _shared_libraries(binaries: Iterable[Path]) -> dict[str, Path]:
    """Map each library path the loader will look up to the file holding it."""
    output = subprocess.run(
        ["ldd", *map(str, binaries)], check=True, capture_output=True, text=True
    ).stdout
    libraries: dict[str, Path] = {}
    for line in output.splitlines():
        words = line.split()
        if "=>" in words:
            arrow = words.index("=>")
            if arrow + 1 < len(words) and words[arrow + 1].startswith("/"):
                libraries[words[arrow + 1]] = Path(words[arrow + 1]).resolve()
        elif words and words[0].startswith("/") and not words[0].endswith(":"):
            libraries[words[0]] = Path(words[0]).resolve()  # the dynamic loader itself
    return libraries


def _add_base(rootfs: Rootfs) -> None:
    rootfs.add_file("/bin/busybox", BUSYBOX_BINARY.resolve())
    available = set(
        subprocess.run(
            [str(BUSYBOX_BINARY), "--list"], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    for applet in BUSYBOX_APPLETS:
        if applet in available:
            rootfs.add_symlink(f"/bin/{applet}", "busybox")
    rootfs.add_bytes("/etc/passwd", ETC_PASSWD)
    rootfs.add_bytes("/etc/group", ETC_GROUP)
    rootfs.add_dir("/tmp", 0o1777)
    rootfs.add_dir("/root", 0o700)
    for mount_point in ("/proc", "/sys", "/dev", "/etc", "/usr/local/bin"):
        rootfs.add_dir(mount_point)


def _is_kept_stdlib_path(relative: Path) -> bool:
    if relative.parts[0] in STDLIB_EXCLUDED_NAMES:
        return False
    if any(part in STDLIB_EXCLUDED_DIRS for part in relative.parts[:-1]):
        return False
    if relative.parts[0] == "lib-dynload":
        return not relative.name.startswith(DYNLOAD_EXCLUDED_PREFIXES)
    if relative.parent.name == "__pycache__":
        # Only plain bytecode of kept sources: it cuts the agent's start by
        # ~135 ms (imports 165 -> 32 ms measured), optimised variants are unused.
        source = relative.parent.parent / (relative.name.split(".")[0] + ".py")
        is_plain_bytecode = relative.name.endswith(".pyc") and ".opt-" not in relative.name
        return is_plain_bytecode and _is_kept_stdlib_path(source)
    return True


def mimic_rootfs() -> Rootfs:
    rootfs = Rootfs()
    _add_base(rootfs)
    rootfs.add_file(PYTHON_BINARY, PYTHON_BINARY.resolve())
    rootfs.add_symlink("/usr/bin/python3", PYTHON_BINARY.name)
    extension_modules: list[Path] = []
    for directory, subdirs, names in os.walk(PYTHON_STDLIB):
        subdirs[:] = [name for name in subdirs if name not in STDLIB_EXCLUDED_DIRS]
        for name in names:
            source = Path(directory, name)
            relative = source.relative_to(PYTHON_STDLIB)
            if not _is_kept_stdlib_path(relative) or not source.exists():
                continue
            rootfs.add_file(PurePosixPath(PYTHON_STDLIB, relative), source.resolve())
            if name.endswith(".so"):
                extension_modules.append(source)
    for dest, source in _shared_libraries([PYTHON_BINARY, *extension_modules]).items():
        rootfs.add_file(dest, source)
    rootfs.add_file("/app/mimic.py", MIMIC_SOURCE)
    return rootfs


def busybox_rootfs() -> Rootfs:
    rootfs = Rootfs()
    _add_base(rootfs)
    return rootfs


def nginx_rootfs() -> Rootfs:
    rootfs = Rootfs()
    _add_base(rootfs)
    rootfs.add_file(NGINX_BINARY, NGINX_BINARY.resolve())
    for dest, source in _shared_libraries([NGINX_BINARY]).items():
        rootfs.add_file(dest, source)
    rootfs.add_file("/etc/nginx/mime.types", NGINX_MIME_TYPES.resolve())
    rootfs.add_file("/etc/nginx/nginx.conf", NGINX_DIR / "nginx.conf")
    www = NGINX_DIR / "www"
    for source in sorted(www.rglob("*")):
        if source.is_file():
            rootfs.add_file(PurePosixPath("/srv/www", source.relative_to(www)), source)
    rootfs.add_dir("/srv/www/dav", 0o777)  # PUT stores files here as nobody
    rootfs.add_dir("/var/log/nginx")
    rootfs.add_dir("/var/lib/nginx")
    return rootfs


@dataclass(frozen=True)
class ImageRecipe:
    tag: str
    make_rootfs: Callable[[], Rootfs]
    changes: tuple[str, ...]


MIMIC_CHANGES = (
    f"ENV {BASE_PATH_ENV}",
    "ENV PYTHONUNBUFFERED=1",
    "ENV PYTHONDONTWRITEBYTECODE=1",
    "WORKDIR /app",
    "EXPOSE 8000",
    'CMD ["/usr/bin/python3.11", "/app/mimic.py"]',
)
# Shell form: Docker runs it with /bin/sh -c in the container, so $HEALTHCHECK_FAIL
# is the container's own environment.
MIMIC_HEALTHCHECK = (
    "HEALTHCHECK --interval=2s --timeout=2s --retries=1 "
    'CMD test ! -e /tmp/unhealthy && test -z "$HEALTHCHECK_FAIL"'
)

RECIPES = (
    ImageRecipe(tag="roost-mimic:latest", make_rootfs=mimic_rootfs, changes=MIMIC_CHANGES),
    ImageRecipe(
        tag="roost-mimic-healthcheck:latest",
        make_rootfs=mimic_rootfs,
        changes=(*MIMIC_CHANGES, MIMIC_HEALTHCHECK),
    ),
    ImageRecipe(
        tag="roost-busybox:latest",
        make_rootfs=busybox_rootfs,
        changes=(f"ENV {BASE_PATH_ENV}", 'CMD ["/bin/sh"]'),
    ),
    ImageRecipe(
        tag="roost-nginx:latest",
        make_rootfs=nginx_rootfs,
        changes=(
            f"ENV {BASE_PATH_ENV}",
            "EXPOSE 8000",
            'CMD ["/usr/sbin/nginx", "-e", "stderr", "-c", "/etc/nginx/nginx.conf"]',
        ),
    ),
)


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=False)


def _current_image(tag: str) -> tuple[str, str] | None:
    """Return (image id, input hash label) of the tag, or None when it does not exist."""
    result = _docker(
        "image",
        "inspect",
        "--format",
        f'{{{{.Id}}}} {{{{index .Config.Labels "{INPUT_HASH_LABEL}"}}}}',
        tag,
    )
    if result.returncode != 0:
        return None
    image_id, _, input_hash = result.stdout.strip().partition(" ")
    return image_id, input_hash


def _remove_unused_superseded_images() -> None:
    """Remove untagged images of earlier builds once no container uses them."""
    dangling = _docker(
        "images", "--quiet", "--filter", "dangling=true", "--filter", f"label={INPUT_HASH_LABEL}"
    ).stdout.split()
    for image_id in dangling:
        _docker("rmi", image_id)  # best effort: an image in use stays until the next build


def _import(rootfs: Rootfs, recipe: ImageRecipe, tag: str, input_hash: str) -> str:
    """``docker import`` the rootfs as ``tag``; the new image's id."""
    command = ["docker", "import"]
    for change in (*recipe.changes, f"LABEL {INPUT_HASH_LABEL}={input_hash}"):
        command += ["--change", change]
    command += ["-", tag]
    importer = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert importer.stdin is not None
    # BrokenPipeError: docker import quit early; communicate() collects its error.
    with contextlib.suppress(BrokenPipeError):
        rootfs.write_tar(importer.stdin)
    stdout, stderr = importer.communicate()  # closes stdin: the end of the tar stream
    if importer.returncode != 0:
        raise SystemExit(f"{tag}: docker import failed: {stderr.decode().strip()}")
    return stdout.decode().strip()


def build(recipe: ImageRecipe, *, force: bool) -> str:
    """Build one image unless cached; return the line to print."""
    started = time.monotonic()
    rootfs = recipe.make_rootfs()
    input_hash = rootfs.fingerprint([*recipe.changes, Path(__file__).read_text()])
    pinned = f"{recipe.tag.rsplit(':', 1)[0]}:inputs-{input_hash[:12]}"
    current = _current_image(recipe.tag)
    latest_cached = current is not None and current[1] == input_hash and not force
    pinned_cached = _current_image(pinned) is not None and not force
    if latest_cached and pinned_cached:
        elapsed = time.monotonic() - started
        return (
            f"{recipe.tag}: cached (inputs {input_hash[:12]}, checked in {elapsed:.2f} s) "
            f"as {pinned}"
        )
    if not pinned_cached:
        # An image of its own, not a second tag of :latest's: a build elsewhere that
        # replaces :latest removes the image :latest had, never this one.
        _import(rootfs, recipe, pinned, input_hash)
    if not latest_cached:
        new_id = _import(rootfs, recipe, recipe.tag, input_hash)
        if current is not None and current[0] != new_id and current[1]:
            _docker("rmi", current[0])  # best effort: an image in use stays
        _remove_unused_superseded_images()
    size = _docker("image", "inspect", "--format", "{{.Size}}", recipe.tag).stdout.strip()
    size_mb = int(size or 0) / 1e6
    elapsed = time.monotonic() - started
    return (
        f"{recipe.tag}: built in {elapsed:.2f} s ({size_mb:.1f} MB, "
        f"{len(rootfs.files)} files, inputs {input_hash[:12]}) as {pinned}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("images", nargs="*", help="tags to build (default: all)")
    options = parser.parse_args(argv)
    known = {recipe.tag: recipe for recipe in RECIPES}
    unknown = [tag for tag in options.images if tag not in known]
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for recipe in RECIPES:
        if not options.images or recipe.tag in options.images:
            print(build(recipe, force=options.force), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
