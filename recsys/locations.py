"""Data locations: a local folder or an `s3://bucket/prefix` URI, and fetching remote input to a local folder.

Steps read and write local files (pyarrow, NVTabular and Great Expectations stream from disk), so a run
whose raw CSV files (and the gateway's extracts under `interactions/`) are in S3 first copies them into a
folder of its own with `fetch_input`; a local location is used where it is. boto3 finds credentials,
region and endpoint the standard way (`AWS_ACCESS_KEY_ID` / `AWS_PROFILE` / `~/.aws` / an instance role;
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for an S3-compatible store), the same way MLflow's S3
artifact store finds them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from recsys.errors import InputDataError
from recsys.outputs import atomic_write_text

log = logging.getLogger(__name__)

CSV_FILES = ("*.csv",)
# The gateway's daily extracts (tasks/extract_interactions.py's partition_path), read next to the CSV files.
INTERACTION_FILES = ("interactions/day=*/*.parquet",)
# What was fetched into a destination folder (name -> source, ETag and size): a rerun skips those files.
MANIFEST = ".fetched.json"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ACCESS_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                  "AccountProblem", "InvalidToken", "ExpiredToken"}  # fmt: skip
_NO_BUCKET = {"NoSuchBucket"}


class LocationError(InputDataError):
    """A remote input location that cannot be read (no bucket, no files, access denied); retrying does not help."""


def is_remote(location: str | Path) -> bool:
    """Whether `location` is a URI of a remote store (`s3://...`); local paths and `file://` URIs are not."""
    if isinstance(location, Path):
        return False
    return bool(_URI.match(location)) and urlsplit(location).scheme.lower() != "file"


def local_path(location: str | Path) -> Path:
    """A local location as a Path (`file:///data/csv` -> /data/csv); a remote one is refused."""
    if isinstance(location, Path):
        return location
    if is_remote(location):
        raise ValueError(f"{location} is not a local path (fetch it with recsys.locations.fetch_input)")
    if _URI.match(location):  # file://
        return Path(unquote(urlsplit(location).path))
    return Path(location)


def as_uri(location: str | Path) -> str:
    """`location` as a URI: a URI stays as it is, a local path becomes an absolute `file://` URI."""
    if isinstance(location, str) and _URI.match(location):
        return location
    return Path(location).absolute().as_uri()


def split_s3_uri(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix names a folder (empty: the bucket)."""
    parts = urlsplit(location)
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise ValueError(f"{location} is not an s3://bucket/prefix URI")
    prefix = parts.path.lstrip("/")
    return parts.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def fetched_input_dir(location: str | Path, destination: Path) -> Path:
    """Where the input files of `location` are read from locally: `destination` if remote, else the location."""
    return Path(destination) if is_remote(location) else local_path(location)


def fetch_input(location: str | Path, destination: Path, patterns: Iterable[str] = CSV_FILES, *,
                optional_patterns: Iterable[str] = INTERACTION_FILES, endpoint_url: str | None = None
                ) -> Path:  # fmt: skip
    """The local folder holding the input files of `location`; remote files are downloaded there first.

    A local path (or `file://` URI) is returned as it is, and `destination` is not touched. For
    `s3://bucket/prefix`, the objects under the prefix whose names (relative to it) match one of
    `patterns` or `optional_patterns` are downloaded into `destination` (meant to be run-scoped:
    `<run>/landing`), keeping their relative paths. Patterns match folder by folder, as a shell's do: a
    `*` never matches a `/`, so `*.csv` means the CSV files directly under the prefix and
    `interactions/day=*/*.parquet` the gateway's daily extracts. Each file is written aside and renamed
    into place, so a file there is always whole; a rerun skips files already fetched with the same ETag
    and size, and removes files it fetched before that are gone from the prefix.
    `endpoint_url` is an S3-compatible store's endpoint (None: boto3's own configuration).
    Raises LocationError, naming bucket and key, for a missing bucket, no files matching `patterns` (the
    `optional_patterns` may match none) or access denied.
    """
    if not is_remote(location):
        return local_path(location)
    location = str(location)
    bucket, prefix = split_s3_uri(location)
    patterns, optional_patterns = tuple(patterns), tuple(optional_patterns)
    client = s3_client(endpoint_url)
    objects = _list_matching(client, location, bucket, prefix, patterns)
    if optional_patterns:
        objects.update(_list_matching(client, location, bucket, prefix, optional_patterns, required=False))
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for leftover in destination.rglob(".*.part"):  # a download killed before its rename
        leftover.unlink()
    manifest = _read_manifest(destination)
    gone = sorted(set(manifest) - set(objects))  # removed from the prefix since the last fetch
    for name in gone:
        (destination / name).unlink(missing_ok=True)
        del manifest[name]
    fetched = skipped = 0
    for name, listed in sorted(objects.items()):
        target = destination / name
        record = {"source": f"s3://{bucket}/{listed['Key']}", "etag": listed["ETag"], "size": listed["Size"]}
        if manifest.get(name) == record and target.is_file() and target.stat().st_size == listed["Size"]:
            skipped += 1
            continue
        with _error_context(location, bucket, f"key {listed['Key']!r}"):
            _download(client, bucket, listed["Key"], target, listed["Size"])
        manifest[name] = record
        atomic_write_text(destination / MANIFEST, _manifest_text(manifest))  # a killed fetch keeps what it has
        fetched += 1
    if gone and not fetched:
        atomic_write_text(destination / MANIFEST, _manifest_text(manifest))
    log.info("fetched %d file(s) of %s into %s (%d already there)", fetched, location, destination, skipped)
    return destination


def s3_client(endpoint_url: str | None = None) -> Any:
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint_url)


def _matches(name: str, pattern: str) -> bool:
    """Whether a relative key matches a pattern folder by folder (a `*` never matches a `/`)."""
    names, parts = name.split("/"), pattern.split("/")
    if any(part in ("", ".", "..") for part in names):  # never a path outside the destination
        return False
    return len(names) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts, strict=True))


def _listing_prefix(pattern: str) -> str:
    """The pattern's leading folders without wildcards (`interactions/` of `interactions/day=*/*.parquet`)."""
    folders = []
    for part in pattern.split("/")[:-1]:
        if any(character in part for character in "*?["):
            break
        folders.append(part + "/")
    return "".join(folders)


def _list_matching(client: Any, location: str, bucket: str, prefix: str, patterns: tuple[str, ...], *,
                   required: bool = True) -> dict[str, dict]:  # fmt: skip
    """Objects under `prefix` whose relative names match a pattern, by name; none is an error if `required`."""
    names: list[str] = []
    matching: dict[str, dict] = {}
    # Patterns of files directly under the prefix list one folder level; deeper ones list their folders' keys.
    listings = {(_listing_prefix(pattern), "/" not in pattern[len(_listing_prefix(pattern)):]) for pattern in patterns}
    for folder, one_level in sorted(listings):
        options = {"Delimiter": "/"} if one_level else {}
        with _error_context(location, bucket, f"key prefix {prefix + folder!r}"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + folder,
                                                                         **options):  # fmt: skip
                for listed in page.get("Contents", []):
                    name = listed["Key"][len(prefix):]
                    names.append(name)
                    if name and any(_matches(name, pattern) for pattern in patterns):
                        matching[name] = listed
    if not matching and required:
        found = f"it holds {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names else "it is empty"
        raise LocationError(
            f"{location}: no files matching {', '.join(patterns)} under key prefix {prefix!r} of bucket {bucket} "
            f"({found})"
        )
    return matching


@contextlib.contextmanager
def _error_context(location: str, bucket: str, where: str) -> Iterator[None]:
    """Turn S3's errors that retries do not fix into LocationError naming the bucket and `where` (key or prefix)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError as error:
        raise LocationError(
            f"{location}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, or use an instance role) to read bucket {bucket}, {where}"
        ) from error
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = error.response.get("Error", {}).get("Message", "")
        if code in _NO_BUCKET:
            raise LocationError(f"{location}: bucket {bucket} does not exist") from error
        if code in _ACCESS_DENIED:
            raise LocationError(
                f"{location}: access denied to bucket {bucket}, {where} ({code}: {message}); "
                "check the AWS credentials and the bucket's policy"
            ) from error
        if code in ("NoSuchKey", "404"):
            raise LocationError(f"{location}: {where} of bucket {bucket} disappeared while fetching") from error
        raise


def _download(client: Any, bucket: str, key: str, target: Path, size: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.part"
    try:
        client.download_file(bucket, key, str(partial))
        if partial.stat().st_size != size:  # replaced while it was being listed and fetched
            raise LocationError(
                f"s3://{bucket}/{key}: fetched {partial.stat().st_size} bytes, listed as {size}; "
                "the object changed during the fetch"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _read_manifest(destination: Path) -> dict[str, dict]:
    path = destination / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _manifest_text(manifest: dict[str, dict]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
