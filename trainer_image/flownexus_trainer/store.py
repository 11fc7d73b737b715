"""The S3 artifact store, pod side: pull what a pod needs, run its command, push what it writes.

Pods always work on local POSIX paths under the artifact root (``/artifacts``); with an S3 store that
root is an emptyDir and this wrapper keeps it in step with the bucket (the "storage-initializer +
sync" pattern)::

    python -m flownexus_trainer.store --pull /artifacts/ns/run --push /artifacts/ns/run -- CMD ARGS...

``FLOWNEXUS_STORE`` (JSON, written by the operator) names the store; ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` hold the credentials (never printed). Local ``<root>/<rel>`` maps to the key
``<prefix>/<rel>``. Without ``FLOWNEXUS_STORE`` (or with type ``pvc``) the command just runs.

While the command runs, the push dirs are scanned every ``--interval`` seconds: new or changed files
are uploaded oldest first (a checkpoint never shows up before the state it depends on), files the
pod deleted are deleted from the bucket. ``model-store/`` archives are pushed only after the command
exits 0 (torch-model-archiver writes them in place), and never overwritten or deleted. Hidden files
(``.name.tmp-PID``) and ``*.part`` files are never pushed nor pulled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import posixpath
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TypeVar
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.datatypes import Object
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import HTTPError, MaxRetryError, NameResolutionError, NewConnectionError, SSLError

from .errors import ERROR_CHARS, TERMINATION_LOG, write_termination_message

log = logging.getLogger("flownexus_trainer.store")

ENV = "FLOWNEXUS_STORE"
STORE_FAILED = 2  # exit code: the store failed (before the command, or at the end of a successful one)
NOT_RUNNABLE = 127  # the command does not exist or cannot be executed (as in a shell)
IMMUTABLE_DIR = "model-store"
CHUNK = 1 << 20
CREDENTIAL_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
T = TypeVar("T")


class StoreError(Exception):
    """A store operation failed; the message names the URI (``s3://bucket/key``) and the reason in words.

    ``retryable``: whether a new attempt could succeed as it is (an endpoint down, a server error), as opposed to
    refused keys, a missing object or a path out of the store, which every attempt would meet again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


# --- pure path <-> key mapping -------------------------------------------------------------------


def clean_rel(rel: str) -> str:
    """``rel`` as a normalised relative path (``""`` is the root itself); a ``..`` segment is refused."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in rel:
        raise StoreError(f"{rel!r}: a path with a '..' segment (or a NUL) is refused")
    return "/".join(parts)


def rel_of(path: str, root: str) -> str:
    """The path of ``path`` relative to ``root``: ``path`` is absolute under ``root`` or relative to it."""
    if not path.startswith("/"):
        return clean_rel(path)
    clean_rel(path)  # refuse '..' before normalising it away
    base, norm = posixpath.normpath(root), posixpath.normpath(path)
    if norm == base:
        return ""
    if base == "/" or norm.startswith(base + "/"):
        return clean_rel(norm[len(base) :])
    raise StoreError(f"{path}: outside the artifact root {root}")


def key_for(prefix: str, rel: str) -> str:
    """The object key of ``<root>/<rel>``: ``<prefix>/<rel>``, or ``<rel>`` when the prefix is empty."""
    prefix, rel = clean_rel(prefix), clean_rel(rel)
    return "/".join(p for p in (prefix, rel) if p)


def rel_for_key(prefix: str, key: str) -> str:
    """The inverse of :func:`key_for`; a key outside the prefix (or with a ``..`` segment) is refused."""
    prefix = clean_rel(prefix)
    if prefix and not key.startswith(prefix + "/"):
        raise StoreError(f"{key}: outside the store's prefix {prefix!r}")
    return clean_rel(key[len(prefix) + 1 :] if prefix else key)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; the key is used as is but may not hold a ``..`` segment."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri}: not an s3://bucket/key URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise StoreError(f"{uri}: not an s3://bucket/key URI")
    if ".." in key.split("/"):
        raise StoreError(f"{uri}: a key with a '..' segment is refused")
    return bucket, key


def is_pushable(name: str) -> bool:
    """Temporary files (``.name.tmp-PID``, ``*.part``) are never pushed nor pulled."""
    return not name.startswith(".") and not name.endswith(".part")


def is_immutable(rel: str) -> bool:
    """Files under a ``model-store/`` directory are archives: never overwritten, never deleted."""
    return IMMUTABLE_DIR in rel.split("/")[:-1]


@dataclass(frozen=True)
class StoreConfig:
    endpoint: str  # scheme://host[:port]
    bucket: str
    prefix: str = ""
    region: str | None = None
    insecure_skip_tls_verify: bool = False
    ca_file: str | None = None
    root: str = "/artifacts"

    @staticmethod
    def parse(raw: str) -> StoreConfig | None:
        """The operator's ``FLOWNEXUS_STORE`` JSON; ``None`` for a PVC store (nothing to sync)."""
        try:
            spec = json.loads(raw)
            kind = spec.get("type")
        except (ValueError, AttributeError) as exc:
            raise StoreError(f"{ENV}: not a JSON object ({exc})") from exc
        if kind == "pvc":
            return None
        if kind != "s3":
            raise StoreError(f"{ENV}: unknown store type {kind!r} (expected 's3' or 'pvc')")
        url = urlsplit(str(spec.get("endpoint", "")))
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
            raise StoreError(f"{ENV}: endpoint {spec.get('endpoint')!r} is not http(s)://host[:port]")
        if not spec.get("bucket"):
            raise StoreError(f"{ENV}: no bucket")
        return StoreConfig(
            endpoint=f"{url.scheme}://{url.netloc}", bucket=str(spec["bucket"]),
            prefix=clean_rel(spec.get("prefix") or ""), region=spec.get("region") or None,
            insecure_skip_tls_verify=bool(spec.get("insecureSkipTLSVerify", False)),
            ca_file=spec.get("caFile") or None, root=str(spec.get("root") or "/artifacts"),
        )  # fmt: skip


def reason(exc: BaseException, config: StoreConfig) -> str:
    """What went wrong, in words (no credentials: neither minio nor urllib3 put them in messages)."""
    if isinstance(exc, S3Error):
        if exc.code in CREDENTIAL_CODES:
            return f"the credentials in the store's Secret were refused ({exc.code}: {exc.message})"
        if exc.code == "NoSuchBucket":
            return f"no such bucket {config.bucket!r} at {config.endpoint}"
        if exc.code in ("NoSuchKey", "ResourceNotFound"):
            return "no such object"
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, NameResolutionError):
        return f"cannot resolve the endpoint's host {config.endpoint} (DNS)"
    if isinstance(exc, SSLError):
        return f"TLS to {config.endpoint} failed ({exc}); check caFile / insecureSkipTLSVerify"
    if isinstance(exc, NewConnectionError | ConnectionError):
        return f"cannot connect to the endpoint {config.endpoint} (connection refused or unreachable)"
    if isinstance(exc, ServerError | InvalidResponseError | HTTPError):
        return f"the endpoint {config.endpoint} failed: {exc}"
    if isinstance(exc, OSError):
        return f"local file error: {exc}"
    if isinstance(exc, ValueError):
        return str(exc)  # minio's own checks, e.g. "invalid bucket name b"
    return f"{type(exc).__name__}: {exc}"


TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})


class S3Store:
    """One bucket + prefix, mapped onto the local artifact root."""

    def __init__(self, config: StoreConfig, access_key: str, secret_key: str) -> None:
        self.config = config
        self.root = Path(config.root)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=120), maxsize=4,
            cert_reqs="CERT_NONE" if config.insecure_skip_tls_verify else "CERT_REQUIRED",
            ca_certs=None if config.insecure_skip_tls_verify else config.ca_file,
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )  # fmt: skip
        if config.insecure_skip_tls_verify:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        host = urlsplit(config.endpoint)
        self.client = Minio(host.netloc, access_key, secret_key, secure=host.scheme == "https",
                            region=config.region, http_client=http)  # fmt: skip

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> S3Store | None:
        """The store the operator configured, or ``None`` when artifacts live on a PVC."""
        config = StoreConfig.parse(environ[ENV]) if environ.get(ENV) else None
        if config is None:
            return None
        key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise StoreError(f"s3://{config.bucket}/{config.prefix}: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY unset")
        return cls(config, key, secret)

    def uri(self, rel: str) -> str:
        return f"s3://{self.config.bucket}/{key_for(self.config.prefix, rel)}"

    def _key_uri(self, key: str) -> str:
        return f"s3://{self.config.bucket}/{key}"

    def _call(self, uri: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except StoreError:
            raise
        except (S3Error, ServerError, InvalidResponseError, HTTPError, OSError, ValueError) as exc:
            transient = isinstance(exc, ServerError | InvalidResponseError | HTTPError | ConnectionError) or (
                isinstance(exc, S3Error) and exc.code in TRANSIENT_CODES
            )
            raise StoreError(f"{uri}: {reason(exc, self.config)}", retryable=transient) from exc

    def rel(self, local: str | Path) -> str:
        return rel_of(str(local), self.config.root)

    def check(self) -> None:
        """Fail early (credentials, bucket, endpoint) before a command runs for hours: list the prefix.

        A list, not HEAD bucket: a key scoped to the prefix may list it without rights on the bucket itself."""
        prefix = key_for(self.config.prefix, "")
        found = self.client.list_objects(self.config.bucket, prefix=prefix + "/" if prefix else "")
        self._call(self.uri(""), lambda: next(iter(found), None))

    def _get(self, key: str, dest: Path) -> tuple[int, str]:
        """Download one object to ``dest`` atomically (temp file + rename); returns (size, sha256)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        digest, size = hashlib.sha256(), 0
        resp = self.client.get_object(self.config.bucket, key)
        try:
            with open(tmp, "wb") as fh:
                for chunk in resp.stream(CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            os.replace(tmp, dest)
        finally:
            resp.close()
            resp.release_conn()
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()

    def pull_dir(self, rel_dir: str, local_dir: Path | None = None) -> list[Path]:
        """Download every object under ``<prefix>/<rel_dir>/`` (recursively); returns the local files."""
        rel_dir = clean_rel(rel_dir)
        local_dir = local_dir if local_dir is not None else self.root / rel_dir
        base = key_for(self.config.prefix, rel_dir)
        base = base + "/" if base else ""
        listing = self._call(self.uri(rel_dir), lambda: list(self.client.list_objects(
            self.config.bucket, prefix=base, recursive=True)))  # fmt: skip
        pulled = []
        for obj in listing:
            key = str(obj.object_name)
            try:
                sub = rel_for_key(self.config.prefix, key)[len(rel_dir) :].lstrip("/")
            except StoreError as exc:
                raise StoreError(f"{self._key_uri(key)}: refused ({exc})") from exc
            if obj.is_dir or key.endswith("/") or not all(is_pushable(s) for s in sub.split("/")):
                continue
            dest = local_dir / sub
            self._call(self._key_uri(key), partial(self._get, key, dest))
            pulled.append(dest)
        return pulled

    def download_dir(self, rel_dir: str, local_dir: str | Path) -> int:
        return len(self.pull_dir(rel_dir, Path(local_dir)))

    def source_key(self, src: str) -> str:
        """``s3://bucket/key`` (this bucket only; the key as is) or a path relative to the root (prefixed)."""
        if not src.startswith("s3://"):
            return key_for(self.config.prefix, src)
        bucket, key = parse_s3_uri(src)
        if bucket != self.config.bucket:
            raise StoreError(f"{src}: outside the artifact store's bucket {self.config.bucket}")
        return key

    def download_file(self, src: str, dest: str | Path) -> tuple[int, str]:
        """Download one object to the local file ``dest``; returns (size, sha256 hex)."""
        key = self.source_key(src)
        return self._call(self._key_uri(key), lambda: self._get(key, Path(dest)))

    def _stat(self, key: str) -> Object | None:
        try:
            return self._call(self._key_uri(key), partial(self.client.stat_object, self.config.bucket, key))
        except StoreError as exc:
            if isinstance(exc.__cause__, S3Error) and exc.__cause__.code in ("NoSuchKey", "ResourceNotFound"):
                return None
            raise

    def exists(self, rel: str) -> bool:
        return self._stat(key_for(self.config.prefix, rel)) is not None

    def upload_file(self, local: str | Path, rel: str, *, immutable: bool = False) -> bool:
        """Upload ``local`` to ``<prefix>/<rel>``; an immutable object is never overwritten (False: identical)."""
        key, uri = key_for(self.config.prefix, rel), self.uri(rel)
        with open(local, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
            there = self._stat(key) if immutable else None
            if there is not None:
                theirs = there.metadata.get("x-amz-meta-sha256") if there.metadata else None
                if theirs is None and there.etag and "-" not in there.etag:  # not ours: a single-part etag is md5
                    fh.seek(0)
                    theirs = sha if hashlib.file_digest(fh, "md5").hexdigest() == there.etag.strip('"') else "?"
                if there.size == size and theirs in (None, sha):
                    return False
                raise StoreError(
                    f"{uri}: refusing to overwrite an immutable model-store archive with different "
                    f"content (bucket: {there.size} bytes, sha256 {theirs}; local: {size} bytes, {sha})"
                )
            fh.seek(0)
            self._call(uri, lambda: self.client.put_object(self.config.bucket, key, fh, size, metadata={"sha256": sha}))
        return True

    def delete(self, rel: str) -> None:
        key = key_for(self.config.prefix, rel)
        self._call(self._key_uri(key), lambda: self.client.remove_object(self.config.bucket, key))


Signature = tuple[int, int]  # (size, mtime_ns)


def _signature(path: Path) -> Signature:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class Pusher:
    """Mirrors the push dirs into the bucket: uploads what is new or changed, deletes what the pod deleted."""

    def __init__(self, store: S3Store, dirs: list[Path]) -> None:
        self.store, self.dirs = store, dirs
        self.known: dict[Path, Signature] = {}  # in the bucket as of this signature (uploaded or pulled)
        self.reported: dict[Path, str] = {}

    def mark(self, path: Path) -> None:
        self.known[path] = _signature(path)

    def _walk(self) -> dict[Path, Signature]:
        found: dict[Path, Signature] = {}
        for top in self.dirs:
            for here, subdirs, files in os.walk(top):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                for name in filter(is_pushable, files):
                    path = Path(here, name)
                    try:
                        found[path] = _signature(path)
                    except FileNotFoundError:
                        continue
        return found

    def scan(self, *, publish: bool = False) -> list[str]:
        """One pass; returns the errors (each naming its URI). Failed files are retried on the next pass.

        ``model-store/`` archives are pushed only with ``publish`` (the command has exited 0): the archiver
        writes them in place, and only a command that succeeded vouches for one."""
        errors: list[str] = []
        found = self._walk()
        for path, sig in sorted(found.items(), key=lambda item: (item[1][1], str(item[0]))):
            rel = self.store.rel(path)
            if self.known.get(path) == sig or (is_immutable(rel) and not publish):
                continue
            try:
                if self.store.upload_file(path, rel, immutable=is_immutable(rel)):
                    log.info("pushed %s (%d bytes)", self.store.uri(rel), sig[0])
                self.known[path] = sig
                self.reported.pop(path, None)
            except FileNotFoundError:
                continue  # deleted between the walk and the upload: handled as a deletion next pass
            except StoreError as exc:
                errors.append(str(exc))
                if self.reported.get(path) != str(exc):
                    log.error("%s", exc)
                    self.reported[path] = str(exc)
        for path in [p for p in self.known if p not in found and any(p.is_relative_to(d) for d in self.dirs)]:
            rel = self.store.rel(path)
            try:
                if not is_immutable(rel):
                    self.store.delete(rel)
                    log.info("deleted %s (gone locally)", self.store.uri(rel))
                del self.known[path]
            except StoreError as exc:
                errors.append(str(exc))
        return errors


def _pushes_here(condition: str | None) -> bool:
    """``--push-when-env NAME=VALUE``: only the pod whose NAME is VALUE pushes (one writer per run dir: the
    worker of index 0 among a gang's pods)."""
    if not condition:
        return True
    name, _, value = condition.partition("=")
    return os.environ.get(name) == value


def run(store: S3Store, args: argparse.Namespace) -> int:
    """Pull, run the command while pushing every ``args.interval`` seconds, push once more, exit like it."""
    try:
        pushes = args.push if _pushes_here(args.push_when_env) else []
        pusher = Pusher(store, [store.root / store.rel(d) for d in pushes])
        if not (args.pull or args.pull_optional or args.pull_file):
            store.check()  # a pull checks the store by itself
        for d in args.pull + args.pull_optional:
            for path in store.pull_dir(store.rel(d)):
                pusher.mark(path)
        for spec in args.pull_file:
            # DEST is normally absolute: split at the first "=/", so a key may hold "=" (Hive-style year=2026/).
            src, sep, dest = spec.partition("=/") if "=/" in spec else spec.rpartition("=")
            dest = "/" + dest if sep == "=/" else dest
            if not sep or not src or not dest:
                raise StoreError(f"--pull-file {spec!r}: expected SRC=DEST")
            key = store.source_key(src)
            size, sha = store.download_file(src, dest)
            print(f"store: pulled s3://{store.config.bucket}/{key} ({size} bytes, sha256 {sha})", flush=True)
            local = Path(dest).absolute()
            if local.is_relative_to(store.root) and key == key_for(store.config.prefix, store.rel(local)):
                pusher.mark(local)  # the object at its own key: not pushed again unless it changes
    except StoreError as exc:
        print(f"store: {exc}", file=sys.stderr, flush=True)
        # The pod's termination message, which the operator reads: the URI and the reason, and whether a restart
        # of the attempt could help.
        summary = {"error": f"store: {exc}"[:ERROR_CHARS], "retryable": exc.retryable}
        write_termination_message(summary, Path(args.termination_log))
        return STORE_FAILED
    for d in pusher.dirs:
        d.mkdir(parents=True, exist_ok=True)
    try:
        child = subprocess.Popen(args.command)
    except OSError as exc:
        print(f"store: cannot run {args.command[0]}: {exc}", file=sys.stderr, flush=True)
        return NOT_RUNNABLE

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            code = child.wait(timeout=args.interval)
            break
        except subprocess.TimeoutExpired:
            pusher.scan()
    code = 128 - code if code < 0 else code
    errors = pusher.scan(publish=code == 0)
    if errors:
        print(f"store: {len(errors)} push(es) failed; last: {errors[-1]}", file=sys.stderr, flush=True)
        return code or STORE_FAILED
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flownexus_trainer.store", description=__doc__.split("\n")[0])
    parser.add_argument("--pull", action="append", default=[], metavar="DIR")
    parser.add_argument("--pull-optional", action="append", default=[], metavar="DIR")
    parser.add_argument("--pull-file", action="append", default=[], metavar="SRC=DEST")
    parser.add_argument("--push", action="append", default=[], metavar="DIR")
    parser.add_argument("--push-when-env", default=None, metavar="NAME=VALUE")
    parser.add_argument("--termination-log", default=str(TERMINATION_LOG), metavar="PATH")
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command to run (after --)")
    logging.basicConfig(level=logging.INFO, format="store: %(message)s", stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retries end in one StoreError line
    try:
        store = S3Store.from_env()
    except StoreError as exc:
        print(f"store: {exc}", file=sys.stderr, flush=True)
        return STORE_FAILED
    if store is None:
        try:
            os.execvp(args.command[0], args.command)
        except OSError as exc:
            print(f"store: cannot run {args.command[0]}: {exc}", file=sys.stderr, flush=True)
            return NOT_RUNNABLE
    return run(store, args)


if __name__ == "__main__":
    sys.exit(main())
