"""Paths are URIs: a local path, file://..., or s3://bucket/key.

S3 goes through pyarrow's S3FileSystem with an explicit endpoint (pyarrow ignores
AWS_ENDPOINT_URL, so we read it here) and credentials from the environment, never logged:
    TTTE2E_S3_ENDPOINT or AWS_ENDPOINT_URL   e.g. http://127.0.0.1:8333 (unset: AWS)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

STORAGE_ENV_VARS = (
    "TTTE2E_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


class StorageError(OSError):
    """A storage operation failed; the message names the URI (never credentials)."""


def s3_options() -> dict:
    endpoint = os.environ.get("TTTE2E_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict = dict(
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    )
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
        opts.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        )
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return opts


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem; `uri` is what users and messages see."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p)
        return Location(self.fs, f"{self.path.rstrip('/')}/{rel}", f"{self.uri.rstrip('/')}/{rel}")

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.uri}: not found") from e
        except OSError as e:
            hint = (
                " (check the endpoint, the bucket and the credentials in the environment)"
                if self.is_s3
                else ""
            )
            raise StorageError(f"{what} {self.uri} failed: {e}{hint}") from e

    def info(self) -> pafs.FileInfo:
        return self._call("stat of", self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        return self.info().size

    def list_files(self) -> list[Location]:
        """Every file under this folder (recursive), sorted by path."""
        infos = self._call(
            "listing of", self.fs.get_file_info, pafs.FileSelector(self.path, recursive=True)
        )
        base = self.path.rstrip("/")
        return sorted(
            (self.join(i.path[len(base) + 1 :]) for i in infos if i.type == pafs.FileType.File),
            key=lambda loc: loc.path,
        )

    def open_input(self):
        """Raw bytes (no decompression by file extension: callers decide)."""
        return self._call(
            "opening", lambda p: self.fs.open_input_stream(p, compression=None), self.path
        )

    def open_random_access(self):
        return self._call("opening", self.fs.open_input_file, self.path)

    def read_bytes(self) -> bytes:
        with self.open_input() as f:
            return self._call("reading", f.read)

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file. Local: temp file + rename (atomic); S3: one PUT (atomic)."""
        parent = self.path.rsplit("/", 1)[0]
        if not self.is_s3:
            self._call(
                "creating the folder of", lambda p: self.fs.create_dir(p, recursive=True), parent
            )
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with self._call("writing", self._output_stream, tmp) as f:
                f.write(data)
            self._call("renaming into", self.fs.move, tmp, self.path)
            return
        with self._call("writing", self._output_stream, self.path) as f:
            f.write(data)

    def _output_stream(self, path: str):
        # compression=None: pyarrow would otherwise compress by file extension (.gz, .zst)
        return self.fs.open_output_stream(path, compression=None)

    def delete(self) -> None:
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self._call(
                "deleting", lambda p: self.fs.delete_dir_contents(p, missing_dir_ok=True), self.path
            )
            if not self.is_s3:
                self._call("deleting", self.fs.delete_dir, self.path)
        elif info.type == pafs.FileType.File:
            self._call("deleting", self.fs.delete_file, self.path)

    def write_files(self, write: Callable[[Path], list[Path]]) -> list[Path]:
        """Files made by local tools (plots, tables) into this folder: write(folder) writes them
        into a local folder (this one when local, a temporary one for S3, uploaded after) and
        returns their paths, which stay readable locally (e.g. to log them to MLflow)."""
        local = Path(self.path) if not self.is_s3 else Path(tempfile.mkdtemp(prefix="ttte2e-"))
        local.mkdir(parents=True, exist_ok=True)
        files = write(local)
        if self.is_s3:
            for f in files:
                self.join(f.name).write_bytes(f.read_bytes())
        return files

    def upload(self, folder: Path) -> None:
        """A local folder's files into this folder (created; same relative paths)."""
        if not self.is_s3:
            self._call("creating", lambda p: self.fs.create_dir(p, recursive=True), self.path)
        self._call(
            "copying into",
            lambda p: pafs.copy_files(
                str(folder),
                p,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            ),
            self.path,
        )

    def download(self, folder: Path) -> None:
        """This folder's files into a local folder (same relative paths)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._call(
            "copying from",
            lambda p: pafs.copy_files(
                p,
                str(folder),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            ),
            self.path,
        )

    def ensure_bucket(self) -> None:
        """S3 only: fail early with a clear message when the bucket cannot be reached."""
        if self.is_s3:
            bucket = self.path.split("/", 1)[0]
            info = self._call("stat of bucket of", self.fs.get_file_info, bucket)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"{self.uri}: bucket '{bucket}' does not exist")


def resolve(uri: str) -> Location:
    """A local path, file://path or s3://bucket/key -> Location."""
    if not uri:
        raise ValueError("empty path")
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"{uri}: an s3:// URI needs a bucket (s3://bucket/key)")
        fs = pafs.S3FileSystem(**s3_options())
        return Location(fs, f"{parsed.netloc}{parsed.path}".rstrip("/"), uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported scheme (use a local path, file:// or s3://)")
    path = os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)
    return Location(pafs.LocalFileSystem(), path, path)
