"""The demo family's committed weights, ``assets/demo/`` in the repository, and their way into a model store.

``assets/demo`` is laid out as the store's ``demo/`` folder (``base/``, ``controlnet-mask/``,
``lora-outline.safetensors``, ``ti-moon.safetensors``) plus ``manifest.json``: every file's size and sha256, written
by ``pack``. The manifest is the marker that the family is committed: ``install`` (``triptych models install-demo``)
and the tests refuse a folder whose files differ from it (a truncated copy, a Git LFS pointer, a file left out of a
commit) instead of serving or skipping it. No torch here except in ``pack``: installing is copying files.

``python -m triptych.demo.assets pack --work .cache/demo-train`` assembles the trained stages into ``assets/demo``;
``python -m triptych.demo.assets verify`` checks a folder against its manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from triptych.model_store import readable_by_all

FAMILY = "demo"  # the store folder the family lives in: demo/base, demo/controlnet-mask, ...
MANIFEST = "manifest.json"
MAX_BYTES = 25 * 10**6  # issue #20: the whole family in at most 25 MB
BASE = "base"  # the one part an install cannot do without
ADAPTERS = ("controlnet-mask", "lora-outline", "ti-moon")  # the parts a family may ship without (pack --leave-out)


class AssetsError(Exception):
    """The demo assets are absent or do not match their manifest; the message says what to do."""


def default_source() -> Path:
    """``assets/demo`` of the source checkout this package runs from (``scripts/setup`` installs it editable)."""
    return Path(__file__).resolve().parents[3] / "assets" / FAMILY


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but the manifest, as sorted relative paths."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict:
    """Writes ``folder/manifest.json`` (each file's bytes and sha256, and their total) and returns it."""
    folder = Path(folder)
    files = {
        path.as_posix(): {"bytes": (folder / path).stat().st_size, "sha256": _sha256(folder / path)}
        for path in _files(folder)
    }
    manifest = {"total_bytes": sum(f["bytes"] for f in files.values()), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def problems(folder: Path) -> list[str]:
    """What is wrong with ``folder`` as committed demo assets (empty: nothing): no manifest, a file missing, extra,
    of another size or digest, no base, over the size budget."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return [f"{folder / MANIFEST} is missing: write it with `python -m triptych.demo.assets pack`"]
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{folder / MANIFEST} does not read as a manifest ({exc!r})"]
    found = {path.as_posix() for path in _files(folder)}
    issues = [f"{name}: listed in {MANIFEST} but missing" for name in sorted(set(listed) - found)]
    issues += [f"{name}: present but not in {MANIFEST}" for name in sorted(found - set(listed))]
    for name in sorted(set(listed) & found):
        path, expected = folder / name, listed[name]
        if path.stat().st_size != expected["bytes"]:
            issues.append(f"{name}: {path.stat().st_size} bytes, {MANIFEST} says {expected['bytes']}")
        elif _sha256(path) != expected["sha256"]:
            issues.append(f"{name}: sha256 differs from {MANIFEST}")
    if not any(name.startswith(f"{BASE}/") for name in listed):
        issues.append(f"{MANIFEST} lists no {BASE}/ folder: the family needs demo/{BASE}")
    total = sum(entry["bytes"] for entry in listed.values())
    if total > MAX_BYTES:
        issues.append(f"the family is {total / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget (issue #20)")
    return issues


def _part(entry: Path) -> str:
    """The part a family folder's entry holds: ``base/`` and ``controlnet-mask/`` folders, ``lora-outline.safetensors``
    and ``ti-moon.safetensors`` files."""
    return entry.name.removesuffix(".safetensors")


def model_ids(folder: Path) -> list[str]:
    """The store ids the assets in ``folder`` install as: demo/base, demo/controlnet-mask, demo/lora-outline, ...
    (also of a store's ``demo/`` folder: what it holds of the family)."""
    entries = sorted(p for p in Path(folder).iterdir() if p.name != MANIFEST)
    return [f"{FAMILY}/{_part(p)}" for p in entries]


def install(source: Path, root: Path) -> list[str]:
    """Copies the assets in ``source`` into the store ``root`` as ``demo/...`` (each part replacing an older copy;
    other models under ``demo/`` are left alone), files 0644 and folders 0755; returns the installed ids.
    AssetsError if ``source`` is absent or differs from its manifest."""
    source, root = Path(source), Path(root)
    if not source.is_dir():
        raise AssetsError(
            f"no demo family at {source}: its trained weights are committed there once trained (docs/demo-model.md, "
            "'Committed weights'); a store without it serves the tiny family (`triptych models build-tiny`)"
        )
    issues = problems(source)
    if issues:
        raise AssetsError(f"the demo family at {source} is not usable:\n  " + "\n  ".join(issues))
    target = root / FAMILY
    target.mkdir(parents=True, exist_ok=True)
    # Stage the copy beside its target, then swap each part in: a failed copy never leaves a half-written model.
    with tempfile.TemporaryDirectory(prefix=".install-", dir=target) as staging:
        staged = Path(staging)
        for entry in source.iterdir():
            if entry.name == MANIFEST:
                continue
            copy = staged / entry.name
            if entry.is_dir():
                shutil.copytree(entry, copy)
            else:
                shutil.copyfile(entry, copy)
        readable_by_all(staged)
        for copy in sorted(staged.iterdir()):
            old = target / copy.name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
            copy.rename(old)
    return model_ids(source)


def _merged_work(work: Path, stages_from: dict[str, Path], into: Path) -> Path:
    """A work folder of links: each stage from ``stages_from`` where it names one, else from ``work`` (the ControlNet
    may train in a folder of its own beside a UNet snapshot, ``unet-snapshot``; a stage may be retrained elsewhere)."""
    into.mkdir()
    for stage in Path(work).iterdir():
        (into / stage.name).symlink_to(stage.resolve())
    for stage, folder in stages_from.items():
        link = into / stage
        if link.is_symlink():
            link.unlink()
        link.symlink_to((Path(folder) / stage).resolve())
    return into


def _forget_sources(folder: Path) -> None:
    """Drops ``_name_or_path`` (the folder each part was loaded from, a path on the packing machine) from every
    config: diffusers ignores it on load, and the same weights then pack to the same bytes wherever they were."""
    for config in folder.rglob("config.json"):
        values = json.loads(config.read_text(encoding="utf-8"))
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def pack(
    work: Path,
    out: Path,
    dtype: str = "float16",
    stages_from: dict[str, Path] | None = None,
    leave_out: tuple[str, ...] = (),
) -> dict:
    """Assembles the trained stages in ``work`` (``demo/train/assemble.py``; a stage named in ``stages_from`` from that
    work folder instead) into ``out`` (replacing what is there) with its manifest, without the adapters named in
    ``leave_out`` (parts that did not pass their check: docs/demo-model.md, "Status"); AssetsError, leaving ``out`` as
    it was, when the result breaks the budget or lacks a part not left out."""
    unknown = sorted(set(leave_out) - set(ADAPTERS))
    if unknown:
        raise AssetsError(f"cannot leave out {', '.join(unknown)}: only the adapters {', '.join(ADAPTERS)}")
    from .train.assemble import assemble

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=out.parent) as staging:
        if stages_from:
            work = _merged_work(work, stages_from, Path(staging) / "work")
        assemble(Path(work), Path(staging), dtype=dtype)
        built = Path(staging) / FAMILY
        for entry in [e for e in built.iterdir() if _part(e) in leave_out]:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        _forget_sources(built)
        readable_by_all(built)
        manifest = write_manifest(built)
        issues = problems(built)
        wanted = {f"{FAMILY}/{part}" for part in (BASE, *ADAPTERS) if part not in leave_out}
        issues += [
            f"{part} was not assembled: is its stage trained?" for part in sorted(wanted - set(model_ids(built)))
        ]
        if issues:
            raise AssetsError(f"not packed into {out}:\n  " + "\n  ".join(issues))
        if out.exists():
            shutil.rmtree(out)
        built.rename(out)
    return manifest


def _stage_folder(value: str) -> tuple[str, Path]:
    stage, sep, folder = value.partition("=")
    if not sep or not stage or not folder:
        raise AssetsError(f"--stage-from takes STAGE=DIR (got {value!r})")
    return stage, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triptych.demo.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    pack_parser = sub.add_parser("pack", help="assemble the trained stages into the assets folder, with its manifest")
    pack_parser.add_argument("--work", type=Path, default=Path(".cache/demo-train"), help="the training's WORK folder")
    pack_parser.add_argument("--out", type=Path, default=default_source(), help="default: the checkout's assets/demo")
    pack_parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    pack_parser.add_argument(
        "--stage-from",
        action="append",
        default=[],
        metavar="STAGE=DIR",
        help="take STAGE (controlnet, lora, ...) from the work folder it trained in, if not --work's (repeatable)",
    )
    pack_parser.add_argument(
        "--leave-out", action="append", default=[], choices=ADAPTERS, help="ship the family without this adapter"
    )
    verify_parser = sub.add_parser("verify", help="check an assets folder against its manifest")
    verify_parser.add_argument("folder", type=Path, nargs="?", default=default_source())
    args = parser.parse_args(argv)
    try:
        if args.action == "pack":
            stages_from = dict(_stage_folder(value) for value in args.stage_from)
            manifest = pack(args.work, args.out, args.dtype, stages_from, tuple(args.leave_out))
            print(f"packed {', '.join(model_ids(args.out))} into {args.out} ({manifest['total_bytes'] / 1e6:.1f} MB)")
            return 0
        issues = problems(args.folder) if args.folder.is_dir() else [f"{args.folder} does not exist"]
    except AssetsError as exc:
        print(f"triptych.demo.assets: {exc}", file=sys.stderr)
        return 1
    for issue in issues:
        print(f"{args.folder}: {issue}", file=sys.stderr)
    if not issues:
        print(f"{args.folder}: matches its manifest ({', '.join(model_ids(args.folder))})")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
