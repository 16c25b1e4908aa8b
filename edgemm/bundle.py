"""Bundles: one directory of stage files, the tokenizer and the manifest `edgemm.json`.

Written to a temporary sibling directory and renamed at the end, so an interrupted export leaves no half
bundle. Loading verifies the manifest (format version, files inside the bundle, sha256) before anything runs.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path

from .checkpoint import atomic_dir, file_sha256
from .errors import EdgemmError

MANIFEST = "edgemm.json"
FORMAT = "edgemm-bundle"
FORMAT_VERSION = 1


def tool_versions(*extra: str) -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("edgemm", "torch", "numpy", *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def check_out(out: str | Path, force: bool) -> Path:
    """-o OUT: refused when it exists, unless --force (docs/architecture.md, Conventions); checked before any work."""
    out = Path(out)
    if out.exists() and not force:
        raise EdgemmError(f"{out} already exists; choose another -o or pass --force to replace it")
    return out


@contextlib.contextmanager
def bundle_writer(out: str | Path, force: bool = False):
    """Yields a temporary directory; on clean exit it is renamed to `out`, on error it is removed.

    The caller writes its files and finally `manifest` (a dict without `files`) via write_manifest(tmp, m).
    """
    out = Path(out)
    check_out(out, force)
    with atomic_dir(out) as tmp:
        yield tmp
        if not (tmp / MANIFEST).exists():
            raise RuntimeError("bundle_writer: the exporter wrote no manifest")


def write_json_atomic(path: str | Path, obj, indent: int = 2, default=None) -> None:
    """Write JSON to a temporary file beside `path`, then rename: a reader sees the old file or the new one."""
    import os
    import tempfile
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise EdgemmError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, default=default)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise EdgemmError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(bundle_dir: str | Path, manifest: dict, exclude=()) -> dict:
    """Add format fields, the sha256 of every file in the directory (but the relative paths in `exclude`: files
    about to be removed), and write edgemm.json atomically."""
    d = Path(bundle_dir)
    m = {"format": FORMAT, "format_version": FORMAT_VERSION,
         "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **manifest}
    skip = {str(x) for x in exclude}
    m["files"] = {str(p.relative_to(d)): file_sha256(p) for p in sorted(d.rglob("*"))
                  if p.is_file() and p.name != MANIFEST and str(p.relative_to(d)) not in skip}
    write_json_atomic(d / MANIFEST, m)
    return m


def read_manifest(bundle: str | Path) -> dict:
    """Parse edgemm.json and check the format version (no file checks: see verify_bundle)."""
    d = Path(bundle)
    if not d.is_dir():
        raise EdgemmError(f"bundle not found: {d} is not a directory")
    p = d / MANIFEST
    if not p.is_file():
        raise EdgemmError(f"{d} is not an edgemm bundle ({MANIFEST} is missing); export one with `edgemm export`")
    from .safety import unique_keys
    no_duplicates = unique_keys(lambda key: f"{p}: the key {key!r} appears twice; refusing an ambiguous manifest")
    try:
        if p.stat().st_size > MAX_MANIFEST_BYTES:
            raise EdgemmError(f"{p} is {p.stat().st_size} bytes, more than a manifest can be; refusing it")
        m = json.loads(p.read_text(), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EdgemmError(f"{p} is corrupt ({str(e)[:120]}); re-export the bundle") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EdgemmError(f"{p} is not an edgemm manifest; re-export the bundle")
    if m.get("format_version") != FORMAT_VERSION:
        raise EdgemmError(f"{d} has bundle format version {m.get('format_version')}, this edgemm reads "
                          f"version {FORMAT_VERSION}: re-export it with this edgemm, or install the edgemm that made it")
    stages = m.get("stages")
    if not isinstance(stages, dict) or not all(isinstance(v, dict) and isinstance(v.get("file"), str)
                                               for v in stages.values()):
        raise EdgemmError(f"{p}: 'stages' must map each stage to an entry with a 'file'; re-export the bundle")
    need = REQUIRED_STAGES.get(m.get("target"), ())
    if ((m.get("model") or {}).get("decoder") or {}).get("cross_attn_every") and "decoder_image" in need:
        need = ("decoder_text", "cross_kv")         # gated cross-attention: images are not decoder rows
    missing = [s for s in need if s not in stages]
    if missing:
        raise EdgemmError(f"{p}: a {m.get('target')} bundle needs the stages {', '.join(missing)}; re-export it")
    return m


MAX_MANIFEST_BYTES = 64 << 20
HEX = set("0123456789abcdef")
REQUIRED_STAGES = {"gguf": ("decoder", "vision"), "onnx": ("decoder_text", "decoder_image"),
                   "trt": ("decoder_text", "decoder_image")}    # + the input stage: vision or image_tokens


def bundle_path(bundle: str | Path, rel: str) -> Path:
    """A manifest-relative path, refused if it leaves the bundle directory."""
    root = Path(bundle).resolve()
    p = (root / rel).resolve()
    if not isinstance(rel, str) or os.path.isabs(rel) or not p.is_relative_to(root):
        raise EdgemmError(f"manifest of {bundle} names a path outside the bundle ({rel!r}); refusing it")
    return p


def read_verified(bundle: str | Path, rel: str, manifest: dict) -> bytes:
    """The bytes of a file the manifest lists, checked against its sha256 after they are read: the caller parses
    these bytes, so what is parsed is what was hashed (no window between a check and a later open in which the
    file could be swapped)."""
    import hashlib
    data = bundle_path(bundle, rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("files", {}).get(rel):
        raise EdgemmError(f"bundle {bundle}: {rel} does not match its sha256 (corrupt or tampered); re-export it")
    return data


def parsed_files(m: dict) -> set:
    """The files a backend parses from bytes it has read and hashed itself (see read_verified): the tokenizer
    and every stage graph without external data."""
    out = {m.get("tokenizer", "tokenizer.json")}
    if isinstance(m.get("qformer_tokenizer"), str):         # InstructBLIP (edgemm.qformer)
        out.add(m["qformer_tokenizer"])
    for st in m.get("stages", {}).values():
        if isinstance(st, dict) and isinstance(st.get("file"), str) and not st.get("extra_files"):
            out.add(st["file"])
    return out


def verify_bundle(bundle: str | Path, check_hashes: bool = True, defer_parsed: bool = False) -> dict:
    """read_manifest + every stage file present, inside the bundle, with the recorded sha256. defer_parsed: the
    files of parsed_files(manifest) are checked for presence here and hashed by the caller as it reads them
    (read_verified, stage_sources)."""
    m = read_manifest(bundle)
    deferred = parsed_files(m) if defer_parsed else set()
    files = m.get("files", {})
    if not isinstance(files, dict):
        raise EdgemmError(f"bundle {bundle}: the manifest's 'files' must map paths to sha256 digests; re-export it")
    root = Path(bundle).resolve()
    for rel, digest in files.items():
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= HEX):
            raise EdgemmError(f"bundle {bundle}: the digest of {rel!r} is not 64 hex characters; re-export it")
        q = Path(bundle) / rel
        bundle_path(bundle, rel)                                  # no absolute path, no .. out
        for part in [q, *q.parents]:
            if part.resolve() == root or not str(part).startswith(str(Path(bundle))):
                break
            if part.is_symlink():
                raise EdgemmError(f"bundle {bundle}: {rel} is (or lies under) a symbolic link; refusing it")
    listed = set(files) | {MANIFEST}
    extra = sorted(str(x.relative_to(bundle)) for x in Path(bundle).rglob("*")
                   if (x.is_file() or x.is_symlink()) and str(x.relative_to(bundle)) not in listed)
    if extra:
        raise EdgemmError(f"bundle {bundle}: {extra[0]} is in the bundle but not in its manifest"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + "; re-export it or remove it")
    stage_files = [s.get("file") for s in m.get("stages", {}).values()]
    for st in m.get("stages", {}).values():
        stage_files += st.get("extra_files", [])
    for rel in set(stage_files) | set(files):
        if rel is None:
            continue
        p = bundle_path(bundle, rel)
        if not p.is_file():
            raise EdgemmError(f"bundle {bundle} is incomplete: {rel} is missing; re-export it")
        if rel not in files:
            raise EdgemmError(f"bundle {bundle}: {rel} has no sha256 in the manifest; re-export it")
        if check_hashes and rel not in deferred and file_sha256(p) != files[rel]:
            raise EdgemmError(f"bundle {bundle}: {rel} does not match its sha256 (corrupt or tampered); re-export it")
    return m


def stage_sources(bundle: str | Path, m: dict, stages, verified: bool) -> dict:
    """{stage: bytes | path} to open each stage's ONNX graph from. verified (verify_bundle ran with
    defer_parsed): a graph without external data comes as its bytes, hashed as they were read; one with external
    data as its path (its files were hashed by verify_bundle). External-data locations are checked first."""
    from .safety import check_onnx_external
    out = {}
    for s in stages:
        st = m["stages"][s]
        p = bundle_path(bundle, st["file"])
        if verified and st["file"] in parsed_files(m):
            data = read_verified(bundle, st["file"], m)
            check_onnx_external(p, bundle, data=data)
            out[s] = data
        else:
            check_onnx_external(p, bundle)
            out[s] = str(p)
    return out


class PinnedFile:
    """A listed file opened once and hashed through that descriptor; `path` names the same open file
    (/proc/self/fd/N on Linux, /dev/fd/N elsewhere) for a library that opens files by name (llama.cpp): replacing
    the directory entry after the check no longer changes what it reads. Where neither exists, the plain path
    (the check then has the usual window). Keep it open while the library may (re)open the file."""

    def __init__(self, bundle: str | Path, rel: str, m: dict):
        import hashlib
        p = bundle_path(bundle, rel)
        try:
            self.fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise EdgemmError(f"bundle {bundle}: cannot open {rel} ({e.strerror}); re-export it") from None
        h = hashlib.sha256()
        while chunk := os.read(self.fd, 1 << 20):
            h.update(chunk)
        if h.hexdigest() != m.get("files", {}).get(rel):
            os.close(self.fd)
            raise EdgemmError(f"bundle {bundle}: {rel} does not match its sha256 (corrupt or tampered); re-export it")
        for d in ("/proc/self/fd", "/dev/fd"):
            if os.path.exists(f"{d}/{self.fd}"):
                self.path = f"{d}/{self.fd}"
                break
        else:
            self.path = str(p)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def load_tokenizer(bundle: str | Path, m: dict, verified: bool):
    """The bundle's tokenizer, parsed from the bytes that were hashed when `verified` (see stage_sources)."""
    from .tokenizer import Tokenizer
    rel = m.get("tokenizer", "tokenizer.json")
    p = bundle_path(bundle, rel)
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    tok = Tokenizer.load(p, read_verified(bundle, rel, m) if verified else None, tokens=model.get("tokens"))
    if isinstance(m.get("model"), dict) and (m["model"].get("adapter") or {}).get("qformer_text"):
        from .qformer import attach_bundle_tokenizer       # InstructBLIP: the Q-Former's own tokenizer too
        attach_bundle_tokenizer(tok, bundle, m, lambda f: (bundle_path(bundle, f),
                                                            read_verified(bundle, f, m) if verified else None))
    return tok
